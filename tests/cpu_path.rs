//! `distillery cpu` reports the CPU path the hand-written kernels take, and
//! `DISTILLERY_CPU` forces it: every path this CPU runs can be forced and is reported; a
//! value naming no path is refused with a message naming the variable and the accepted
//! values (exit status 1, no panic), by `cpu` and by a command that loads a model.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::path::Path;
use std::process::{Command, Output};

use distillery_operators::{CpuPath, CPU_ENV};

/// `distillery args` in `cwd`, with `DISTILLERY_CPU` set to `forced` (or removed).
fn distillery(args: &[&str], forced: Option<&str>, cwd: &Path) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_distillery"));
    command
        .args(args)
        .current_dir(cwd)
        // No real model: the tiny model is built and announced.
        .env_remove("DISTILLERY_MODEL")
        .env("HF_HUB_CACHE", cwd.join("no-hub-cache"));
    match forced {
        Some(value) => command.env(CPU_ENV, value),
        None => command.env_remove(CPU_ENV),
    };
    command.output().unwrap()
}

/// The `cpu path:` line of a report.
fn reported_path(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("cpu path: "))
        .unwrap_or_else(|| panic!("no `cpu path:` line in {stdout}"))
        .to_string()
}

#[test]
fn cpu_reports_the_forced_generic_path() {
    let dir = tempfile::tempdir().unwrap();
    let out = distillery(&["cpu"], Some("generic"), dir.path());
    assert!(out.status.success(), "{out:?}");
    assert_eq!(reported_path(&out), "generic");
    let stdout = String::from_utf8_lossy(&out.stdout);
    for line in ["cpu: ", "features: avx2=", "paths supported: generic"] {
        assert!(stdout.contains(line), "{line:?} missing from {stdout}");
    }
}

#[test]
fn cpu_reports_every_path_this_cpu_runs_when_forced_and_the_best_unforced() {
    let dir = tempfile::tempdir().unwrap();
    for path in CpuPath::supported() {
        let out = distillery(&["cpu"], Some(path.name()), dir.path());
        assert!(out.status.success(), "{path}: {out:?}");
        assert_eq!(reported_path(&out), path.name());
    }
    let out = distillery(&["cpu"], None, dir.path());
    assert!(out.status.success(), "{out:?}");
    assert_eq!(reported_path(&out), CpuPath::best().name());
    // Empty is unset.
    let out = distillery(&["cpu"], Some(""), dir.path());
    assert_eq!(reported_path(&out), CpuPath::best().name());
}

#[test]
fn an_unknown_or_unsupported_path_is_refused_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let out = distillery(&["cpu"], Some("bogus"), dir.path());
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("DISTILLERY_CPU=\"bogus\"") && stderr.contains("generic, avx2, avx512"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    // A path this CPU lacks (where there is one): refused, naming the missing features.
    for path in CpuPath::ALL.into_iter().filter(|p| !p.is_supported()) {
        let out = distillery(&["cpu"], Some(path.name()), dir.path());
        assert_eq!(out.status.code(), Some(1), "{path}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("this CPU lacks"), "{stderr}");
    }
}

#[test]
fn a_command_that_loads_a_model_refuses_an_unknown_path() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("corpus.jsonl"),
        "{\"_id\":\"a\",\"title\":\"\",\"text\":\"Cats sleep a lot.\"}\n",
    )
    .unwrap();
    let args = [
        "embed",
        "--input",
        "corpus.jsonl",
        "--output",
        "emb.parquet",
        "--quiet",
    ];
    let out = distillery(&args, Some("avx9000"), dir.path());
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("DISTILLERY_CPU=\"avx9000\""), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!dir.path().join("emb.parquet").exists());
    // The same command on the generic path runs.
    let out = distillery(&args, Some("generic"), dir.path());
    assert!(out.status.success(), "{out:?}");
}
