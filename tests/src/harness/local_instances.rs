//! The process groups of the local provider's instances, found through the `instance.json` in each instance
//! directory. Dropping the guard kills them all, so no local instance outlives a test or the demo.

use std::path::PathBuf;

/// The local instances under one provider's `base_dir`.
pub struct LocalInstances {
    base_dir: PathBuf,
}

impl LocalInstances {
    pub fn new(base_dir: impl Into<PathBuf>) -> LocalInstances {
        LocalInstances {
            base_dir: base_dir.into(),
        }
    }

    /// Returns the process group ids of every instance the provider started under `base_dir`.
    pub fn process_groups(&self) -> Vec<i32> {
        let Ok(entries) = std::fs::read_dir(&self.base_dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|entry| std::fs::read_to_string(entry.path().join("instance.json")).ok())
            .filter_map(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
            .filter_map(|file| file["pid"].as_i64())
            .filter_map(|pid| i32::try_from(pid).ok())
            .collect()
    }

    /// Counts the instances whose leading process still runs; a zombie counts as ended.
    pub fn running(&self) -> usize {
        self.process_groups()
            .into_iter()
            .filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                    let state = stat
                        .rfind(')')
                        .and_then(|end| stat[end + 1..].split_whitespace().next());
                    !matches!(state, Some("Z") | Some("X") | None)
                })
            })
            .count()
    }

    /// Sends `signal` to every instance's process group.
    pub fn signal(&self, signal: libc::c_int) {
        for pid in self.process_groups() {
            // SAFETY: kill(2) on the process group of a local instance that this process's coordinator started.
            unsafe {
                libc::kill(-pid, signal);
            }
        }
    }
}

impl Drop for LocalInstances {
    fn drop(&mut self) {
        self.signal(libc::SIGKILL);
    }
}
