//! Ports, the Python venv and per-test directories.

use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};

use super::HarnessError;

/// Returns a TCP port on 127.0.0.1 that was free when this function ran.
///
/// The port is released before returning, so another process can take it in between. Tests that start a server
/// of their own should prefer binding port 0 and reading the address back.
pub fn free_port() -> u16 {
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("binding 127.0.0.1:0 must succeed");
    listener
        .local_addr()
        .expect("a bound listener has a local address")
        .port()
}

/// Returns the Python venv with the real `clearml` SDK and `clearml-agent`: `$FLEET_VENV`, else
/// `$HOME/.cache/clearml-fleet/venv`.
pub fn venv_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("FLEET_VENV") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    Path::new(&home).join(".cache/clearml-fleet/venv")
}

/// Returns the path of an executable in the venv's `bin/` directory, for example `venv_bin("clearml-agent")`.
pub fn venv_bin(name: &str) -> PathBuf {
    venv_dir().join("bin").join(name)
}

/// A temporary directory for one test, removed on drop unless `FLEET_KEEP_TEST_DIRS` is set.
///
/// Process logs, generated config files and the `HOME` of child processes go here, so a test never touches the
/// real home directory.
pub struct TestDir {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl TestDir {
    /// Creates a directory named after the test under the system temporary directory.
    pub fn new(test: &str) -> Result<TestDir, HarnessError> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("fleet-{test}-"))
            .tempdir()
            .map_err(|source| HarnessError::TempDir {
                test: test.to_owned(),
                source,
            })?;
        let path = dir.path().to_path_buf();
        Ok(TestDir {
            dir: Some(dir),
            path,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Returns `path()/relative`.
    pub fn join(&self, relative: impl AsRef<Path>) -> PathBuf {
        self.path.join(relative)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::env::var_os("FLEET_KEEP_TEST_DIRS").is_some()
            && let Some(dir) = self.dir.take()
        {
            let kept = dir.keep();
            eprintln!("kept test directory {}", kept.display());
        }
    }
}
