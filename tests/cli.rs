//! The `distillery` binary as a user runs it: `embed` writes a whole Parquet file, a bad
//! record stops it with the file and line (exit status 1) or, with
//! `--on-bad-record skip`, lands in the quarantine and is counted; `eval` on a missing
//! split names the missing file; `doctor` says what the build can use, and a `--device`
//! it cannot use stops a command before any work, saying why.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::fs::File;
use std::path::Path;
use std::process::{Command, Output};

use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

fn distillery(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_distillery"))
        .args(args)
        .current_dir(cwd)
        // No real model for these tests: the tiny model is built and announced.
        .env_remove("DISTILLERY_MODEL")
        .env("HF_HUB_CACHE", cwd.join("no-hub-cache"))
        .output()
        .unwrap()
}

fn parquet_rows(path: &Path) -> usize {
    let reader = ParquetRecordBatchReaderBuilder::try_new(File::open(path).unwrap())
        .unwrap()
        .build()
        .unwrap();
    reader.map(|b| b.unwrap().num_rows()).sum()
}

const GOOD: &str = "{\"_id\":\"a\",\"title\":\"Cats\",\"text\":\"Cats sleep a lot.\"}\n\
{\"_id\":\"b\",\"title\":\"\",\"text\":\"Dogs bark at night.\"}\n\
{\"_id\":\"c\",\"title\":\"Birds\",\"text\":\"Birds sing in the morning and fly south.\"}\n";

#[test]
fn embed_writes_every_text_and_says_which_model() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("corpus.jsonl"), GOOD).unwrap();
    let out = distillery(
        &[
            "embed",
            "--input",
            "corpus.jsonl",
            "--output",
            "emb.parquet",
            "--json",
            "t.json",
            "--quiet",
        ],
        dir.path(),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(parquet_rows(&dir.path().join("emb.parquet")), 3);
    let t: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("t.json")).unwrap()).unwrap();
    assert_eq!(t["passages"], 3);
    assert_eq!(t["dim"], 32);
}

#[test]
fn a_bad_record_fails_with_its_location_or_is_quarantined() {
    let dir = tempfile::tempdir().unwrap();
    let bad = format!("{GOOD}{{\"_id\":\"d\",\"title\":\"x\"}}\n{{not json\n");
    std::fs::write(dir.path().join("corpus.jsonl"), bad).unwrap();
    // Default: stop at the first bad record, name it, leave no output file.
    let out = distillery(
        &[
            "embed",
            "--input",
            "corpus.jsonl",
            "--output",
            "emb.parquet",
            "--quiet",
        ],
        dir.path(),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("corpus.jsonl:4"), "{stderr}");
    assert!(stderr.contains("`text`"), "{stderr}");
    assert!(!dir.path().join("emb.parquet").exists());

    // Skip: both bad records go to the quarantine with their reasons; three rows out.
    let out = distillery(
        &[
            "embed",
            "--input",
            "corpus.jsonl",
            "--output",
            "emb.parquet",
            "--quiet",
            "--on-bad-record",
            "skip",
            "--run-dir",
            "run",
        ],
        dir.path(),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("skipped 2 bad record(s)"), "{stderr}");
    assert_eq!(parquet_rows(&dir.path().join("emb.parquet")), 3);
    let q = std::fs::read_to_string(dir.path().join("run/quarantine.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = q
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["line"], 4);
    assert_eq!(lines[0]["field"], "text");
    assert_eq!(lines[1]["line"], 5);
}

#[test]
fn eval_names_a_missing_qrels_file() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ds");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("corpus.jsonl"), GOOD).unwrap();
    std::fs::write(
        data.join("queries.jsonl"),
        "{\"_id\":\"q\",\"text\":\"cats\"}\n",
    )
    .unwrap();
    let out = distillery(
        &["eval", "--dataset", "ds", "--split", "dev", "--quiet"],
        dir.path(),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("qrels/dev.tsv"), "{stderr}");
}

#[test]
fn doctor_reports_the_build_and_a_device_it_lacks_stops_commands() {
    let dir = tempfile::tempdir().unwrap();
    let out = distillery(&["doctor"], dir.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("cpu path: "), "{stdout}");
    assert!(stdout.contains("  cpu: available"), "{stdout}");
    let out = distillery(&["doctor", "--device", "cpu"], dir.path());
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("cpu: a matrix product ran"));
    let out = distillery(&["doctor", "--device", "gpu"], dir.path());
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected `cpu`, `cuda:N`"));

    if cfg!(feature = "cuda") {
        return;
    }
    assert!(stdout.contains("features: cuda=no"), "{stdout}");
    assert!(stdout.contains("cuda: unavailable: this build has no CUDA support"));
    std::fs::write(dir.path().join("corpus.jsonl"), GOOD).unwrap();
    for args in [
        &["embed", "--input", "corpus.jsonl", "--output", "e.parquet"][..],
        &[
            "score",
            "--model",
            "m",
            "--input",
            "p.jsonl",
            "--output",
            "s.parquet",
        ][..],
    ] {
        let mut args = args.to_vec();
        args.extend(["--device", "cuda:0"]);
        let out = distillery(&args, dir.path());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("--device cuda:0: this build has no CUDA support"),
            "{stderr}"
        );
    }
    assert!(!dir.path().join("e.parquet").exists());
    assert!(!dir.path().join("s.parquet").exists());
}

/// `bench` on the demo: a sample of 100 of its 500 passages runs the whole recipe, and
/// the estimate is each part scaled by 5 (mine's exact retrieval by 25), summed.
#[test]
fn bench_runs_a_sample_and_scales_each_part() {
    let dir = tempfile::tempdir().unwrap();
    let out = distillery(
        &["bench", "--sample", "100", "--quiet", "--json", "b.json"],
        dir.path(),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("estimated wall time for 500 passages: "),
        "{stdout}"
    );
    let b: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("b.json")).unwrap()).unwrap();
    assert_eq!(b["sample_passages"], 100);
    assert_eq!(b["corpus_passages"], 500);
    assert_eq!(b["target_passages"], 500);
    // The demo's queries are generated: their number grows with the corpus.
    assert_eq!(b["human_queries"], false);
    assert!(!stdout.contains("(rough: "));
    let parts = b["parts"].as_array().unwrap();
    let names: Vec<&str> = parts.iter().map(|p| p["part"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "generate",
            "mine",
            "label",
            "check teachers",
            "train",
            "evaluate"
        ]
    );
    let mut total = 0.0;
    for p in parts {
        let s = p["sample_seconds"].as_f64().unwrap();
        let r = p["retrieval_seconds"].as_f64().unwrap();
        let e = p["estimated_seconds"].as_f64().unwrap();
        assert!(s > 0.0 && r >= 0.0 && r <= s, "{p}");
        if p["part"] != "mine" {
            assert_eq!(r, 0.0);
        }
        assert!((e - ((s - r) * 5.0 + r * 25.0)).abs() < 1e-9, "{p}");
        total += e;
    }
    assert!((b["estimated_seconds"].as_f64().unwrap() - total).abs() < 1e-9);
    // Every device stage of the sample ran on sample-sized inputs.
    let passages = b["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["label"] == "retriever 0: r0-passages")
        .unwrap();
    assert_eq!(passages["run"], 100);
    // The sample run is a run: its summary is in its own directory.
    let run_dir = std::path::PathBuf::from(b["run_dir"].as_str().unwrap());
    assert!(dir.path().join(run_dir).join("run-summary.json").is_file());
}
