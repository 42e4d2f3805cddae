//! `distillery run` killed with SIGKILL anywhere, then started again, ends with the same
//! outputs as a run that was never killed, byte for byte, and leaves no temporary file.
//!
//! An uninterrupted run with `DISTILLERY_CRASH_TRACE` lists every crash point it passes
//! (`src/crash.rs`: a part written and renamed in every stage, each manifest rewrite, each
//! device batch, each generated batch, each training step, each checkpoint write and
//! swap). The test then kills a fresh run at a spread of those points
//! (`DISTILLERY_CRASH_AT`: the process SIGKILLs itself there, as `kill -9` would), starts
//! it again (every third time killing that restart too, early in its own work) and
//! compares what the run that finishes produced.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::collections::BTreeSet;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;

#[path = "support/recipe.rs"]
mod recipe;
use recipe::{files, fixture, ok};

/// Runs `distillery run` in `dir` with the crash environment `env`.
fn run_with(dir: &Path, env: &[(&str, String)]) -> std::process::Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_distillery"));
    command
        .args(["run", "--config", "pipeline.toml", "--quiet"])
        .current_dir(dir)
        .env_remove("DISTILLERY_MODEL")
        .env("HF_HUB_CACHE", dir.join("no-hub-cache"));
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().unwrap()
}

/// What a run produces for its user: the generated queries, the candidates, the
/// examples, the loss log, the model, and the evaluation's metrics.
fn outputs(run: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for file in ["generated-queries.parquet", "train/loss-log.csv"] {
        out.push((PathBuf::from(file), std::fs::read(run.join(file)).unwrap()));
    }
    for dir in ["stages/candidates", "stages/examples", "train/best-model"] {
        for (path, bytes) in files(&run.join(dir)) {
            out.push((Path::new(dir).join(path), bytes));
        }
    }
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("run-summary.json")).unwrap())
            .unwrap();
    out.push((
        PathBuf::from("evaluations"),
        summary["evaluations"].to_string().into_bytes(),
    ));
    out
}

/// Temporary files and directories a killed writer can leave: `.<name>.tmp`, and the
/// checkpoint's `checkpoint.tmp` / `checkpoint.old`.
fn leftovers(run: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![run.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if name.ends_with(".tmp") || name.ends_with(".old") || name.ends_with(".partial") {
                found.push(path.clone());
            }
            if path.is_dir() {
                stack.push(path);
            }
        }
    }
    found
}

#[test]
fn a_run_killed_anywhere_resumes_to_the_same_outputs_and_leaves_no_temporary_file() {
    let whole = fixture(false);
    let trace = whole.path().join("crash-trace.txt");
    let out = run_with(
        whole.path(),
        &[("DISTILLERY_CRASH_TRACE", trace.display().to_string())],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let expected = outputs(&whole.path().join("run"));
    let points: Vec<String> = std::fs::read_to_string(&trace)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();

    // Where to kill: the first time the run reaches each kind of point in each stage,
    // and points spread evenly over the whole run.
    let mut chosen = BTreeSet::new();
    let mut kinds = BTreeSet::new();
    for (i, p) in points.iter().enumerate() {
        if kinds.insert(p.clone()) {
            chosen.insert(i + 1);
        }
    }
    // More with DISTILLERY_KILL_SPREAD=N (a sweep of every point: the trace's length).
    let spread: usize = std::env::var("DISTILLERY_KILL_SPREAD")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    for k in 1..=spread {
        chosen.insert(k * points.len() / (spread + 1));
    }
    chosen.remove(&0);
    let named: BTreeSet<&str> = chosen
        .iter()
        .map(|&i| points[i - 1].split(' ').next().unwrap())
        .collect();
    for kind in [
        "generate.batch",
        "device.batch",
        "store.part-written",
        "store.part-renamed",
        "store.manifest-written",
        "train.step",
        "train.checkpoint-written",
        "train.checkpoint-swapping",
        "file.before-rename",
    ] {
        assert!(
            named.contains(kind),
            "the run never reached {kind}: {points:?}"
        );
    }
    // Among the parts: the candidates', the examples writer's, and the cross-encoder's
    // scores (its device stage, `teacher-<hash>-pending`).
    for stage in ["examples", "candidates"] {
        assert!(
            chosen
                .iter()
                .any(|&i| points[i - 1] == format!("store.part-renamed {stage}")),
            "no kill while writing {stage}"
        );
    }
    assert!(
        chosen.iter().any(
            |&i| points[i - 1].starts_with("store.part-renamed teacher-")
                && points[i - 1].ends_with("-pending")
        ),
        "no kill while scoring pairs"
    );
    assert!(chosen.len() >= 10, "{} kill points", chosen.len());

    for (n, &at) in chosen.iter().enumerate() {
        let dir = fixture(false);
        let killed = run_with(dir.path(), &[("DISTILLERY_CRASH_AT", at.to_string())]);
        assert_eq!(
            killed.status.signal(),
            Some(9),
            "kill at point {at} ({}): {}",
            points[at - 1],
            String::from_utf8_lossy(&killed.stderr)
        );
        // Every third time the restarted run is killed too, early in its own work (a
        // resume of a resume), before the run that finishes.
        if n % 3 == 2 {
            let again = run_with(
                dir.path(),
                &[("DISTILLERY_CRASH_AT", (at / 2 + 1).to_string())],
            );
            assert!(
                again.status.signal() == Some(9) || again.status.success(),
                "second kill at {}: {}",
                at / 2 + 1,
                String::from_utf8_lossy(&again.stderr)
            );
        }
        ok(&["run", "--config", "pipeline.toml", "--quiet"], dir.path());
        let run = dir.path().join("run");
        let got = outputs(&run);
        let names: Vec<&PathBuf> = expected.iter().map(|(p, _)| p).collect();
        assert_eq!(
            got.iter().map(|(p, _)| p).collect::<Vec<_>>(),
            names,
            "killed at {at} ({})",
            points[at - 1]
        );
        for ((path, want), (_, have)) in expected.iter().zip(&got) {
            assert!(
                want == have,
                "{} differs after a kill at point {at} ({})",
                path.display(),
                points[at - 1]
            );
        }
        assert_eq!(leftovers(&run), Vec::<PathBuf>::new(), "killed at {at}");
    }
}
