//! Who owns a run directory: one process (the exclusive lock on [`LOCK_FILE`]) and, in
//! that process, one handle ([`OPEN_RUNS`]: opening a directory that is open returns the
//! live handle). See the store's "One owner" contract.

use std::collections::HashMap;
use std::fs::{File, TryLockError};
use std::path::{Path, PathBuf};
use std::sync::{LazyLock, Mutex, Weak};
use std::time::{Duration, Instant};

use super::error::StoreError;
use super::Shared;

/// The lock file of a run directory: held exclusively by the process that has it open.
pub const LOCK_FILE: &str = "run.lock";

/// How long [`super::StageStore::open`] waits for the run directory's lock before it reports the
/// directory busy. A handle of this process that was just dropped releases the lock as
/// its file closes, a moment after the last clone goes; another process's run holds it
/// for as long as it runs, so waiting longer would only delay the error.
const LOCK_WAIT: Duration = Duration::from_secs(2);

/// The run directories this process has open, by canonical path: [`super::StageStore::open`]
/// hands out the live handle of a directory instead of a second one.
pub(crate) static OPEN_RUNS: LazyLock<Mutex<HashMap<PathBuf, Weak<Shared>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// Takes the exclusive lock on `run_dir`'s [`LOCK_FILE`], waiting up to [`LOCK_WAIT`].
pub(crate) fn lock_run_dir(run_dir: &Path) -> Result<File, StoreError> {
    let path = run_dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(StoreError::io("open", &path))?;
    let start = Instant::now();
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(TryLockError::WouldBlock) if start.elapsed() < LOCK_WAIT => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(TryLockError::WouldBlock) => {
                return Err(StoreError::RunLocked {
                    run_dir: run_dir.to_path_buf(),
                })
            }
            Err(TryLockError::Error(source)) => {
                return Err(StoreError::Io {
                    op: "lock",
                    path,
                    source,
                })
            }
        }
    }
}
