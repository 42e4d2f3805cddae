//! Crash points: the places where a run can die with the most to lose (a part renamed but
//! not yet in the manifest, a checkpoint half swapped, a batch generated but not yet
//! written), named, so that a test can kill the process exactly there and check that
//! the run started again ends as if nothing had happened.
//!
//! Off unless the environment asks (one relaxed atomic load per point):
//! - `DISTILLERY_CRASH_TRACE=FILE` appends each point's name to `FILE` as it is reached,
//!   so a test can see the points of a whole run in order;
//! - `DISTILLERY_CRASH_AT=N` kills the process with SIGKILL (as `kill -9` does: no
//!   unwinding, no destructor, no flush) on reaching the `N`-th point (1-based).
//!
//! Neither variable is read by anything but this module, and neither changes what a run
//! computes before the kill.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// The environment variable naming the point to die at.
pub const CRASH_AT_ENV: &str = "DISTILLERY_CRASH_AT";
/// The environment variable naming the file the points are traced to.
pub const CRASH_TRACE_ENV: &str = "DISTILLERY_CRASH_TRACE";

struct Plan {
    kill_at: Option<u64>,
    trace: Option<std::path::PathBuf>,
}

static PLAN: OnceLock<Option<Plan>> = OnceLock::new();
static REACHED: AtomicU64 = AtomicU64::new(0);

fn plan() -> Option<&'static Plan> {
    PLAN.get_or_init(|| {
        let kill_at = std::env::var(CRASH_AT_ENV)
            .ok()
            .and_then(|v| v.parse().ok());
        let trace = std::env::var_os(CRASH_TRACE_ENV).map(std::path::PathBuf::from);
        (kill_at.is_some() || trace.is_some()).then_some(Plan { kill_at, trace })
    })
    .as_ref()
}

/// A crash point named `name` (`area.what`, e.g. `train.step`).
pub fn point(name: &'static str) {
    point_in(name, "");
}

/// A crash point named `name` in `context` (the stage a part belongs to), which the
/// trace records beside the name.
pub fn point_in(name: &'static str, context: &str) {
    let Some(plan) = plan() else {
        return;
    };
    let n = REACHED.fetch_add(1, Ordering::SeqCst) + 1;
    if let Some(path) = &plan.trace {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{name} {context}");
        }
    }
    if plan.kill_at == Some(n) {
        kill_self();
    }
}

/// Dies as `kill -9` kills: at once, with nothing flushed or dropped.
fn kill_self() -> ! {
    #[cfg(unix)]
    {
        /// SIGKILL on Linux, macOS and the BSDs.
        const SIGKILL: i32 = 9;
        unsafe extern "C" {
            fn kill(pid: i32, sig: i32) -> i32;
        }
        // SAFETY: kill(2) with this process's own pid and a valid signal number.
        unsafe {
            kill(std::process::id() as i32, SIGKILL);
        }
    }
    std::process::abort()
}
