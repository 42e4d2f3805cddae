//! The pipeline fixture of the end-to-end tests (`#[path]`-included): a run directory
//! with a corpus cut from the shipped SciFact subset, human queries, a BEIR copy of
//! them for `[eval]`, a tiny random model as retriever, teacher and student, and
//! `pipeline.toml`; and the binary, run in it.

#![allow(dead_code)] // each test file uses its own part of it

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use distillery_operators::tiny::{write_tiny_bert, TinyBertSpec};

/// Passages of the shipped SciFact subset the fixture keeps: enough for every query to
/// find 20 candidates, few enough that a whole `train` takes seconds.
const PASSAGES: usize = 60;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn distillery(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_distillery"))
        .args(args)
        .current_dir(cwd)
        .env_remove("DISTILLERY_MODEL")
        .env("HF_HUB_CACHE", cwd.join("no-hub-cache"))
        // A user error must read the same with backtraces on: no trace, just the cause.
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap()
}

/// Runs a command that must succeed; returns its stderr.
pub fn ok(args: &[&str], cwd: &Path) -> String {
    let out = distillery(args, cwd);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "distillery {}: {stderr}\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout)
    );
    stderr
}

/// A bad corpus line, a bad query line and a bad qrels row, each once.
pub const BAD_PASSAGE: &str = "{\"_id\": 3.5, \"text\": \"an id must be a string\"}";
pub const BAD_QUERY: &str = "{\"_id\": \"q-bad\"}";
pub const BAD_QREL: &str = "q1\tsome-passage\tmany";

/// A run directory's fixture: the first [`PASSAGES`] passages of scifact-mini (with
/// [`BAD_PASSAGE`] among them when `bad`), human queries for a few of them, a tiny
/// random model as retriever, bi-encoder teacher and student, and `pipeline.toml`.
pub fn fixture(bad: bool) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let corpus =
        std::fs::read_to_string(root().join("datasets/scifact-mini/corpus.jsonl")).unwrap();
    let mut lines: Vec<&str> = corpus.lines().take(PASSAGES).collect();
    if bad {
        lines.insert(7, BAD_PASSAGE);
    }
    std::fs::write(d.join("corpus.jsonl"), lines.join("\n") + "\n").unwrap();
    let ids: Vec<String> = corpus
        .lines()
        .take(PASSAGES)
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["_id"].to_string())
        .collect();
    let mut queries = String::new();
    let mut qrels = String::from("query-id\tcorpus-id\tscore\n");
    for (i, id) in ids.iter().take(10).enumerate() {
        let text: serde_json::Value = serde_json::from_str(corpus.lines().nth(i).unwrap()).unwrap();
        let title = text["title"].as_str().unwrap_or("passage");
        queries.push_str(&serde_json::json!({"_id": format!("q{i}"), "text": title}).to_string());
        queries.push('\n');
        qrels.push_str(&format!("q{i}\t{}\t1\n", id.trim_matches('"')));
    }
    if bad {
        queries.push_str(BAD_QUERY);
        queries.push('\n');
        qrels.push_str(BAD_QREL);
        qrels.push('\n');
    }
    std::fs::write(d.join("queries.jsonl"), &queries).unwrap();
    std::fs::write(d.join("qrels.tsv"), &qrels).unwrap();
    // The same, laid out as a BEIR dataset for `[eval]`.
    std::fs::create_dir_all(d.join("beir/qrels")).unwrap();
    std::fs::write(d.join("beir/corpus.jsonl"), lines.join("\n") + "\n").unwrap();
    std::fs::write(d.join("beir/queries.jsonl"), &queries).unwrap();
    std::fs::write(d.join("beir/qrels/test.tsv"), &qrels).unwrap();
    let texts: Vec<String> = corpus
        .lines()
        .take(PASSAGES)
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            format!(
                "{} {}",
                v["title"].as_str().unwrap_or(""),
                v["text"].as_str().unwrap()
            )
        })
        .collect();
    write_tiny_bert(&d.join("model"), texts.iter(), &TinyBertSpec::default()).unwrap();
    write_config(d, "model", if bad { "skip" } else { "fail" });
    dir
}

pub fn write_config(dir: &Path, teacher_model: &str, on_bad_record: &str) {
    // The third teacher, the fixtures' tiny BERT cross-encoder, makes scoring a device
    // stage of its own (the bi-encoder takes the retriever's vectors, BM25 runs no model).
    // `stream_queries` cuts the candidates into several chunks that stream to it while
    // the next is retrieved, as a large corpus's would be (one chunk by default here).
    let cross_encoder = root().join("tests/fixtures/cross_encoders/bert");
    let cross_encoder = cross_encoder.display();
    let text = format!(
        r#"
run_dir = "run"
corpus = "corpus.jsonl"
[held_out]
count = 5
[queries]
path = "queries.jsonl"
qrels = "qrels.tsv"
[generate]
generator = "extractive"
[[retrievers]]
model = "model"
[candidates]
retrieve_top = 20
source_in_top = 20
fused_top = 20
[[teachers]]
kind = "bm25"
[[teachers]]
kind = "bi-encoder"
model = "{teacher_model}"
[[teachers]]
kind = "cross-encoder"
model = "{cross_encoder}"
max_length = 64
[teacher]
require_source_first = false
keep_top = 5
[student]
model = "model"
query_max_length = 16
passage_max_length = 48
[train]
micro_batch = 4
accumulation = 2
max_epochs = 2
checkpoint_every = 2
list_len = 5
[eval]
dataset = "beir"
[engine]
threads = 2
stream_queries = 16
# Over several processes every retrieval is shared, however small (tests/cluster.rs).
min_shared_scores = 0
on_bad_record = "{on_bad_record}"
"#
    );
    std::fs::write(dir.join("pipeline.toml"), text).unwrap();
}

/// Every file under `dir`, by path relative to it, with its bytes, sorted.
pub fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let bytes = std::fs::read(&path).unwrap();
                out.push((path.strip_prefix(dir).unwrap().to_path_buf(), bytes));
            }
        }
    }
    out.sort();
    out
}

/// The bytes of every part of a run directory's stage, in order.
pub fn stage_bytes(run: &Path, stage: &str) -> Vec<Vec<u8>> {
    let mut parts: Vec<_> = std::fs::read_dir(run.join("stages").join(stage))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    parts.sort();
    parts.iter().map(|p| std::fs::read(p).unwrap()).collect()
}
