//! Timely's cluster over localhost: `distillery embed` as 2 processes x 1 worker writes
//! the same file, byte for byte, as 1 process with 1 worker and with 2 workers, the
//! follower embedding a share of the texts on its own device, and a rerun with nothing
//! to compute ends the follower at once; `score` likewise; `run` with 1 worker, 2
//! workers and 2 processes x 1 worker writes the same retrieval lists, candidates,
//! examples and model, the follower running its share of every embedding and
//! cross-encoder stage; a 2-process `label` whose process 0, or whose follower, was
//! killed with SIGKILL mid-run (process 0 then stops by itself, never hangs), then
//! started again, ends as one process does.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use distillery_operators::tiny::{write_tiny_bert, TinyBertSpec};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use recipe::stage_bytes;

#[path = "support/recipe.rs"]
mod recipe;

/// Passages embedded: more than one chunk of 2,048, so several timestamps travel.
const PASSAGES: usize = 2500;

/// How long a two-process run may take before the test calls it hung.
const DEADLINE: Duration = Duration::from_secs(300);

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `corpus.jsonl` (scifact-mini's passages, repeated with new ids up to [`PASSAGES`])
/// and a tiny model trained on them.
fn fixture() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let corpus =
        std::fs::read_to_string(root().join("datasets/scifact-mini/corpus.jsonl")).unwrap();
    let records: Vec<serde_json::Value> = corpus
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut out = String::new();
    let mut texts = Vec::new();
    for i in 0..PASSAGES {
        let mut r = records[i % records.len()].clone();
        r["_id"] = format!("p{i}").into();
        r["text"] = format!("{} ({i})", r["text"].as_str().unwrap()).into();
        texts.push(format!(
            "{} {}",
            r["title"].as_str().unwrap_or(""),
            r["text"]
        ));
        out.push_str(&r.to_string());
        out.push('\n');
    }
    std::fs::write(dir.path().join("corpus.jsonl"), out).unwrap();
    write_tiny_bert(
        &dir.path().join("model"),
        texts.iter().take(500),
        &TinyBertSpec::default(),
    )
    .unwrap();
    dir
}

fn embed(dir: &Path, output: &str, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_distillery"));
    c.args([
        "embed",
        "--model",
        "model",
        "--input",
        "corpus.jsonl",
        "--output",
        output,
        "--quiet",
    ])
    .args(extra)
    .current_dir(dir)
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    c
}

/// Runs `child` to its end within the deadline; its stdout.
fn finish(mut child: Child, what: &str, started: Instant) -> String {
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if started.elapsed() > DEADLINE {
            child.kill().unwrap();
            panic!("{what}: still running after {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{what}: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Two free localhost ports.
fn hostfile(dir: &Path) -> PathBuf {
    let a = TcpListener::bind("127.0.0.1:0").unwrap();
    let b = TcpListener::bind("127.0.0.1:0").unwrap();
    let text = format!(
        "# process 0, then process 1\n127.0.0.1:{}\n127.0.0.1:{}\n",
        a.local_addr().unwrap().port(),
        b.local_addr().unwrap().port()
    );
    drop((a, b));
    let path = dir.join("hosts");
    std::fs::write(&path, text).unwrap();
    path
}

/// Starts `command` (given the extra arguments) as process 1, then process 0, of a
/// 2-process cluster on fresh localhost ports: (follower, leader).
fn spawn_two(command: impl Fn(&[&str]) -> Command, dir: &Path) -> (Child, Child) {
    let hosts = hostfile(dir);
    let hosts = hosts.to_str().unwrap();
    let follower = command(&["-n", "2", "-p", "1", "--hostfile", hosts])
        .spawn()
        .unwrap();
    let leader = command(&["-n", "2", "-p", "0", "--hostfile", hosts])
        .spawn()
        .unwrap();
    (follower, leader)
}

/// Runs `command` as 2 processes to their end; the follower's stdout.
fn two_processes(command: impl Fn(&[&str]) -> Command, dir: &Path, started: Instant) -> String {
    let (follower, leader) = spawn_two(command, dir);
    finish(leader, "process 0", started);
    finish(follower, "process 1", started)
}

/// The number after `word` in what the follower printed ("ran N items on this device in
/// S stage(s)").
fn number_after(stdout: &str, word: &str) -> usize {
    let words: Vec<&str> = stdout.split_whitespace().collect();
    let at = words.iter().position(|w| *w == word).unwrap();
    words[at + 1].parse().unwrap()
}

fn number_before(stdout: &str, word: &str) -> usize {
    let words: Vec<&str> = stdout.split_whitespace().collect();
    let at = words.iter().position(|w| *w == word).unwrap();
    words[at - 1].parse().unwrap()
}

/// The items the follower says it ran on its device.
fn followed(stdout: &str) -> usize {
    number_after(stdout, "ran")
}

#[test]
fn two_processes_write_what_one_process_writes_and_share_the_work() {
    let fixture = fixture();
    let dir = fixture.path();
    let started = Instant::now();
    finish(
        embed(dir, "one.parquet", &["-w", "1"]).spawn().unwrap(),
        "1 worker",
        started,
    );
    finish(
        embed(dir, "two-workers.parquet", &["-w", "2"])
            .spawn()
            .unwrap(),
        "2 workers",
        started,
    );
    let two = |extra: &[&str]| embed(dir, "two-processes.parquet", extra);
    let stdout = two_processes(two, dir, started);
    let one = std::fs::read(dir.join("one.parquet")).unwrap();
    let rows: usize = ParquetRecordBatchReaderBuilder::try_new(
        std::fs::File::open(dir.join("one.parquet")).unwrap(),
    )
    .unwrap()
    .build()
    .unwrap()
    .map(|b| b.unwrap().num_rows())
    .sum();
    assert_eq!(rows, PASSAGES);
    assert!(std::fs::read(dir.join("two-workers.parquet")).unwrap() == one);
    assert!(
        std::fs::read(dir.join("two-processes.parquet")).unwrap() == one,
        "2 processes wrote another file than 1 process"
    );
    // The follower ran a share of the texts on its own device (items are exchanged by
    // position: half of them each).
    let share = followed(&stdout);
    assert!(
        share > PASSAGES / 4 && share < PASSAGES * 3 / 4,
        "the follower embedded {share} of {PASSAGES}: {stdout}"
    );
    // Nothing to embed the second time: the leader announces no stage, only its end.
    let stdout = two_processes(two, dir, started);
    assert_eq!(followed(&stdout), 0, "{stdout}");
    assert!(std::fs::read(dir.join("two-processes.parquet")).unwrap() == one);
}

/// The stages every layout must write alike.
const STAGES: [&str; 5] = [
    "r0-passages",
    "r0-queries",
    "r0-retrieved",
    "candidates",
    "examples",
];

/// `b`'s run directory holds [`STAGES`] byte for byte as `a`'s.
fn assert_same_stages(a: &Path, b: &Path, what: &str) {
    for stage in STAGES {
        let parts = stage_bytes(&a.join("run"), stage);
        assert!(!parts.is_empty(), "{stage}: no parts");
        assert!(
            parts == stage_bytes(&b.join("run"), stage),
            "stage {stage}: {what} wrote another stage"
        );
    }
}

/// Waits until process 0 has begun a device stage's memo table in `dir`'s run (so that
/// a kill lands mid-run), `leader` still running.
fn wait_for_a_memo_table(dir: &Path, leader: &mut Child, started: Instant) {
    let stages = dir.join("run/stages");
    while !std::fs::read_dir(&stages).is_ok_and(|d| {
        d.filter_map(Result::ok)
            .any(|e| e.file_name().to_string_lossy().starts_with("memo-"))
    }) {
        assert!(
            leader.try_wait().unwrap().is_none(),
            "process 0 ended before any memo table was begun"
        );
        assert!(started.elapsed() < DEADLINE, "no memo table begun");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `label` on a fresh fixture with 1 process: what the 2-process runs must end as.
fn label_one_process(started: Instant) -> tempfile::TempDir {
    let one = recipe::fixture(false);
    finish(
        label(one.path(), &[]).spawn().unwrap(),
        "1 process",
        started,
    );
    one
}

fn label(dir: &Path, extra: &[&str]) -> Command {
    pipeline_command("label", dir, extra)
}

fn pipeline_command(command: &str, dir: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_distillery"));
    c.args([command, "--config", "pipeline.toml", "--quiet"])
        .args(extra)
        .current_dir(dir)
        .env_remove("DISTILLERY_MODEL")
        .env("HF_HUB_CACHE", dir.join("no-hub-cache"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

#[test]
fn run_with_one_worker_two_workers_and_two_processes_writes_the_same_examples_and_model() {
    let started = Instant::now();
    let one = recipe::fixture(false);
    finish(
        pipeline_command("run", one.path(), &["-w", "1"])
            .spawn()
            .unwrap(),
        "1 worker",
        started,
    );
    let workers = recipe::fixture(false);
    finish(
        pipeline_command("run", workers.path(), &["-w", "2"])
            .spawn()
            .unwrap(),
        "2 workers",
        started,
    );
    let two = recipe::fixture(false);
    let stdout = two_processes(
        |extra| {
            let mut c = pipeline_command("run", two.path(), &["-w", "1"]);
            c.args(extra);
            c
        },
        two.path(),
        started,
    );
    assert_same_stages(one.path(), workers.path(), "2 workers");
    assert_same_stages(one.path(), two.path(), "2 processes");
    let runs = [one.path(), workers.path(), two.path()].map(|d| d.join("run"));
    // Every layout trains on what it labelled alike; over 2 processes each step's
    // micro-batches are shared, and their gradients summed in the same fixed tree as
    // one process sums them: the same model, byte for byte.
    let model = recipe::files(&runs[0].join("train/best-model"));
    assert!(!model.is_empty());
    for (run, what) in runs[1..].iter().zip(["2 workers", "2 processes"]) {
        assert!(
            model == recipe::files(&run.join("train/best-model")),
            "{what}: another model than 1 worker's"
        );
    }
    // The follower ran its share of the passage, query, cross-encoder and evaluation
    // stages, scored passage blocks of the retrievals (hard negatives, teacher check,
    // evaluations), and its share of every training step and dev loss.
    assert!(followed(&stdout) > 0, "{stdout}");
    assert!(number_before(&stdout, "retrieval") > 0, "{stdout}");
    assert!(number_after(&stdout, "in") >= 3, "{stdout}");
    let steps = std::fs::read_to_string(runs[0].join("train/loss-log.csv")).unwrap();
    let steps = steps.lines().skip(1).count();
    assert!(steps > 0);
    assert!(number_before(&stdout, "training") > steps, "{stdout}");
}

#[test]
fn a_run_whose_leader_is_killed_ends_as_one_process_when_both_start_again() {
    let started = Instant::now();
    let one = label_one_process(started);
    let two = recipe::fixture(false);
    let dir = two.path();
    let (mut follower, mut leader) = spawn_two(|extra| label(dir, extra), dir);
    // SIGKILL process 0 mid-run.
    wait_for_a_memo_table(dir, &mut leader, started);
    leader.kill().unwrap();
    leader.wait().unwrap();
    // The follower either failed with the lost connection or waits for a process 0 that
    // is gone: stopped too, as a person would.
    let _ = follower.kill();
    follower.wait().unwrap();

    // Both started again: process 0 resumes from its run directory.
    two_processes(|extra| label(dir, extra), dir, started);
    assert_same_stages(one.path(), dir, "the resumed 2-process run");
    // No temporary files left behind by the kill.
    let mut stack = vec![dir.join("run")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            assert!(!name.contains(".tmp"), "left behind: {}", p.display());
            if p.is_dir() {
                stack.push(p);
            }
        }
    }
}

fn score(dir: &Path, output: &str, extra: &[&str]) -> Command {
    let model = root().join("tests/fixtures/cross_encoders/bert");
    let mut c = Command::new(env!("CARGO_BIN_EXE_distillery"));
    c.args(["score", "--model", model.to_str().unwrap()])
        .args(["--input", "pairs.jsonl", "--output", output, "--quiet"])
        .args(extra)
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

#[test]
fn score_over_two_processes_writes_what_one_process_writes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Pairs of the shipped SciFact subset: each passage with its title as the query.
    let corpus =
        std::fs::read_to_string(root().join("datasets/scifact-mini/corpus.jsonl")).unwrap();
    let mut pairs = String::new();
    for (i, line) in corpus.lines().take(300).enumerate() {
        let r: serde_json::Value = serde_json::from_str(line).unwrap();
        let pair = serde_json::json!({"id": format!("pair{i}"), "query": r["title"],
            "passage": r["text"]});
        pairs.push_str(&pair.to_string());
        pairs.push('\n');
    }
    std::fs::write(d.join("pairs.jsonl"), pairs).unwrap();
    let started = Instant::now();
    finish(
        score(d, "one.parquet", &[]).spawn().unwrap(),
        "1 process",
        started,
    );
    let stdout = two_processes(|extra| score(d, "two.parquet", extra), d, started);
    assert!(
        std::fs::read(d.join("one.parquet")).unwrap()
            == std::fs::read(d.join("two.parquet")).unwrap(),
        "2 processes scored other bytes than 1 process"
    );
    let share = followed(&stdout);
    assert!(share > 75 && share < 225, "{stdout}");
}

#[test]
fn a_run_whose_follower_is_killed_stops_and_ends_as_one_process_when_both_start_again() {
    let started = Instant::now();
    let one = label_one_process(started);
    let two = recipe::fixture(false);
    let dir = two.path();
    let (mut follower, mut leader) = spawn_two(|extra| label(dir, extra), dir);
    // SIGKILL the follower mid-run.
    wait_for_a_memo_table(dir, &mut leader, started);
    follower.kill().unwrap();
    follower.wait().unwrap();
    // Process 0 does not wait forever: it stops (with an error naming the lost process,
    // or done, had the follower finished its part), within the deadline.
    let (ok, stderr) = ends_by_itself(leader, "process 0 after its follower was killed", started);
    assert!(
        ok || stderr.contains("a process of the cluster was lost")
            || stderr.contains("did not join"),
        "{stderr}"
    );

    two_processes(|extra| label(dir, extra), dir, started);
    assert_same_stages(one.path(), dir, "the resumed 2-process run");
}

/// `run` of the recipe fixture over 2 processes with `-w 1`.
fn run_command(dir: &Path) -> impl Fn(&[&str]) -> Command + '_ {
    move |extra| {
        let mut c = pipeline_command("run", dir, &["-w", "1"]);
        c.args(extra);
        c
    }
}

/// A 1-process `run` of the recipe fixture, its crash points traced: (the run, the
/// 1-based index of its second training step's point among all its points).
fn run_one_process_traced(started: Instant) -> (tempfile::TempDir, usize) {
    let one = recipe::fixture(false);
    let trace = one.path().join("points.txt");
    let mut c = pipeline_command("run", one.path(), &["-w", "1"]);
    c.env("DISTILLERY_CRASH_TRACE", &trace);
    finish(c.spawn().unwrap(), "1 process", started);
    let points = std::fs::read_to_string(&trace).unwrap();
    let steps: Vec<usize> = points
        .lines()
        .enumerate()
        .filter(|(_, p)| p.split_whitespace().next() == Some("train.step"))
        .map(|(i, _)| i + 1)
        .collect();
    assert!(
        steps.len() >= 2,
        "the fixture trains {} step(s)",
        steps.len()
    );
    (one, steps[1])
}

/// Both runs exported the same model, byte for byte.
fn assert_same_model(a: &Path, b: &Path, what: &str) {
    let model = recipe::files(&a.join("run/train/best-model"));
    assert!(!model.is_empty());
    assert!(
        model == recipe::files(&b.join("run/train/best-model")),
        "{what}: another model than 1 process's"
    );
}

/// Waits for `child` to end by itself within the deadline: whether it succeeded, and its
/// stderr.
fn ends_by_itself(mut child: Child, what: &str, started: Instant) -> (bool, String) {
    while child.try_wait().unwrap().is_none() {
        assert!(started.elapsed() < DEADLINE, "{what} still running");
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn a_run_whose_leader_dies_while_training_stops_and_ends_with_one_processs_model() {
    let started = Instant::now();
    let (one, second_step) = run_one_process_traced(started);
    let two = recipe::fixture(false);
    let dir = two.path();
    // Process 0 SIGKILLs itself at its second training step (its points before training
    // are the 1-process run's: it alone writes).
    let (follower, leader) = spawn_two(
        |extra| {
            let mut c = run_command(dir)(extra);
            if extra.windows(2).any(|w| w == ["-p", "0"]) {
                c.env("DISTILLERY_CRASH_AT", second_step.to_string());
            }
            c
        },
        dir,
    );
    ends_by_itself(leader, "process 0", started);
    assert!(dir.join("run/train/loss-log.csv").exists());
    // The follower, mid-training, stops by itself: its rounds lost their connection.
    let (_, stderr) = ends_by_itself(follower, "process 1", started);
    assert!(
        stderr.contains("a process of the cluster was lost")
            || stderr.contains("process 0 stopped training"),
        "{stderr}"
    );
    // Both started again: process 0 resumes, and the model is one process's.
    two_processes(run_command(dir), dir, started);
    assert_same_stages(one.path(), dir, "the resumed 2-process run");
    assert_same_model(one.path(), dir, "the resumed 2-process run");
}

#[test]
fn a_run_whose_follower_dies_while_training_stops_and_ends_with_one_processs_model() {
    let started = Instant::now();
    let (one, _) = run_one_process_traced(started);
    let two = recipe::fixture(false);
    let dir = two.path();
    let (mut follower, leader) = spawn_two(run_command(dir), dir);
    // SIGKILL the follower once process 0 has logged a training step.
    let log = dir.join("run/train/loss-log.csv");
    while !std::fs::read_to_string(&log).is_ok_and(|l| l.lines().count() >= 2) {
        assert!(started.elapsed() < DEADLINE, "no training step logged");
        std::thread::sleep(Duration::from_millis(5));
    }
    follower.kill().unwrap();
    follower.wait().unwrap();
    // Process 0 stops by itself with an error that names the loss (or ends, had the
    // follower's last share already been sent back).
    let (ok, stderr) = ends_by_itself(leader, "process 0", started);
    assert!(
        ok || stderr.contains("a process of the cluster was lost")
            || stderr.contains("sent no answer")
            || stderr.contains("did not join"),
        "{stderr}"
    );
    two_processes(run_command(dir), dir, started);
    assert_same_stages(one.path(), dir, "the resumed 2-process run");
    assert_same_model(one.path(), dir, "the resumed 2-process run");
}
