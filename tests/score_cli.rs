//! `distillery score` as a user runs it, on the committed tiny BERT cross-encoder: the
//! Parquet scores equal transformers' logits for the fixture's eight pairs (to 1e-4, in
//! input order, from JSONL and from TSV); a bad record stops the run with its file, line
//! and field (exit status 1, no output) or, with `--on-bad-record skip`, is quarantined
//! and counted.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use arrow::array::{Float32Array, StringArray};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde_json::{json, Value};

/// The fixture scores were computed by transformers at this max_length
/// (`expected.json`'s `max_length`; the tokenizer's own default is 100).
const MAX_LENGTH: &str = "64";
/// float32 on two implementations of the same layers differs in the last bits.
const TOLERANCE: f32 = 1e-4;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cross_encoders/bert")
}

/// The fixture's (query, passage, expected score) triples, in its order.
fn expected() -> Vec<(String, String, f32)> {
    let text = std::fs::read_to_string(fixture().join("expected.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["max_length"].as_u64(), Some(64));
    let pairs = v["pairs"].as_array().unwrap();
    assert_eq!(pairs.len(), 8);
    pairs
        .iter()
        .map(|p| {
            (
                p["query"].as_str().unwrap().to_string(),
                p["passage"].as_str().unwrap().to_string(),
                p["score"].as_f64().unwrap() as f32,
            )
        })
        .collect()
}

fn distillery(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_distillery"))
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap()
}

fn score(input: &str, extra: &[&str], cwd: &Path) -> Output {
    let model = fixture();
    let mut args = vec![
        "score",
        "--model",
        model.to_str().unwrap(),
        "--input",
        input,
        "--output",
        "scores.parquet",
        "--max-length",
        MAX_LENGTH,
        "--threads",
        "2",
        "--quiet",
    ];
    args.extend_from_slice(extra);
    distillery(&args, cwd)
}

fn read_scores(path: &Path) -> Vec<(String, f32)> {
    let reader = ParquetRecordBatchReaderBuilder::try_new(File::open(path).unwrap())
        .unwrap()
        .build()
        .unwrap();
    let mut rows = Vec::new();
    for batch in reader {
        let batch = batch.unwrap();
        let ids = batch.column_by_name("id").unwrap();
        let ids = ids.as_any().downcast_ref::<StringArray>().unwrap();
        let scores = batch.column_by_name("score").unwrap();
        let scores = scores.as_any().downcast_ref::<Float32Array>().unwrap();
        for i in 0..batch.num_rows() {
            rows.push((ids.value(i).to_string(), scores.value(i)));
        }
    }
    rows
}

fn assert_scores(got: &[(String, f32)], ids: &[String], want: &[f32]) {
    let got_ids: Vec<&str> = got.iter().map(|(id, _)| id.as_str()).collect();
    let want_ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    assert_eq!(got_ids, want_ids);
    for ((id, g), w) in got.iter().zip(want) {
        assert!((g - w).abs() <= TOLERANCE, "pair {id}: got {g}, want {w}");
    }
}

#[test]
fn scores_equal_the_transformers_logits_in_input_order() {
    let dir = tempfile::tempdir().unwrap();
    let pairs = expected();
    // Reversed, so input order differs from the fixture's; even lines carry an id,
    // odd lines take their line number.
    let mut body = String::new();
    let mut ids = Vec::new();
    let mut want = Vec::new();
    for (i, (query, passage, s)) in pairs.iter().rev().enumerate() {
        let line = i + 1;
        let id = if line % 2 == 0 {
            format!("pair-{line}")
        } else {
            line.to_string()
        };
        let mut record = json!({"query": query, "passage": passage});
        if line % 2 == 0 {
            record["id"] = json!(id);
        }
        body.push_str(&format!("{record}\n"));
        ids.push(id);
        want.push(*s);
    }
    std::fs::write(dir.path().join("pairs.jsonl"), body).unwrap();
    let out = score("pairs.jsonl", &["--json", "t.json"], dir.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("scored 8 pairs in "), "{stdout}");
    assert_scores(
        &read_scores(&dir.path().join("scores.parquet")),
        &ids,
        &want,
    );
    let t: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("t.json")).unwrap()).unwrap();
    assert_eq!(t["pairs"], 8);
    assert_eq!(t["reused"], false);
    assert_eq!(t["skipped_records"], 0);
    assert!(t["pairs_per_second"].as_f64().unwrap() > 0.0, "{t}");

    // The same pairs as TSV with an id column and a header: the same scores.
    let mut tsv = String::from("id\tquery\tpassage\n");
    for (i, (query, passage, _)) in pairs.iter().enumerate() {
        tsv.push_str(&format!("t{i}\t{query}\t{passage}\n"));
    }
    std::fs::write(dir.path().join("pairs.tsv"), tsv).unwrap();
    let out = score("pairs.tsv", &["--run-dir", "tsv-run"], dir.path());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ids: Vec<String> = (0..8).map(|i| format!("t{i}")).collect();
    let want: Vec<f32> = pairs.iter().map(|p| p.2).collect();
    assert_scores(
        &read_scores(&dir.path().join("scores.parquet")),
        &ids,
        &want,
    );
}

#[test]
fn a_bad_pair_fails_with_its_location_or_is_quarantined() {
    let dir = tempfile::tempdir().unwrap();
    let pairs = expected();
    let mut body = String::new();
    for (i, (query, passage, _)) in pairs.iter().enumerate() {
        body.push_str(&format!(
            "{}\n",
            json!({"query": query, "passage": passage})
        ));
        if i == 1 {
            // Line 3: the passage is not a string.
            body.push_str("{\"query\":\"q\",\"passage\":[\"not\",\"text\"]}\n");
        }
    }
    std::fs::write(dir.path().join("pairs.jsonl"), body).unwrap();

    // Default: stop, name the file, line and field, leave no output file.
    let out = score("pairs.jsonl", &[], dir.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("pairs.jsonl:3"), "{stderr}");
    assert!(stderr.contains("`passage`"), "{stderr}");
    assert!(
        stderr.contains("expected a string, found an array"),
        "{stderr}"
    );
    assert!(!dir.path().join("scores.parquet").exists());

    // Skip: the pair is quarantined with its reason and counted; the other eight are
    // scored, ids being their line numbers (3 is the bad one).
    let out = score(
        "pairs.jsonl",
        &[
            "--on-bad-record",
            "skip",
            "--run-dir",
            "run",
            "--json",
            "t.json",
        ],
        dir.path(),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("skipped 1 bad record(s)"), "{stderr}");
    let ids: Vec<String> = [1, 2, 4, 5, 6, 7, 8, 9].map(|n| n.to_string()).to_vec();
    let want: Vec<f32> = pairs.iter().map(|p| p.2).collect();
    assert_scores(
        &read_scores(&dir.path().join("scores.parquet")),
        &ids,
        &want,
    );
    let q = std::fs::read_to_string(dir.path().join("run/quarantine.jsonl")).unwrap();
    let lines: Vec<Value> = q
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["line"], 3);
    assert_eq!(lines[0]["field"], "passage");
    let t: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("t.json")).unwrap()).unwrap();
    assert_eq!(t["pairs"], 8);
    assert_eq!(t["skipped_records"], 1);
}
