//! Test-only fault injection. With the `failpoints` feature and `FLEET_FAILPOINT_DIR` set, the process aborts
//! at a named point when the file `<dir>/<name>` exists, and removes the file first, so each armed point fires
//! once in whichever replica reaches it. Tests use it to kill a leader at an exact step. Without the feature,
//! every check compiles to nothing.

/// Between storing a launch intent and sending the cloud call.
pub const AFTER_INTENT: &str = "after-intent";
/// After the cloud call returned, before the launched instances are recorded.
pub const AFTER_LAUNCH: &str = "after-launch";

/// Aborts the process when failpoint `name` is armed.
#[cfg(feature = "failpoints")]
pub fn hit(name: &str) {
    let Some(dir) = std::env::var_os("FLEET_FAILPOINT_DIR") else {
        return;
    };
    let armed = std::path::Path::new(&dir).join(name);
    if std::fs::remove_file(&armed).is_ok() {
        eprintln!("failpoint {name} hit; aborting");
        std::process::abort();
    }
}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_name: &str) {}
