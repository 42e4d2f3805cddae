//! A changed corpus, end to end: `label` run again in the same run directory after
//! passages were edited, added and removed embeds only the new and edited texts, and
//! ends with the candidates and the examples of a run from scratch, byte for byte.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::path::Path;

#[path = "support/recipe.rs"]
mod recipe;
use recipe::{fixture, ok};

/// The fixture's corpus with passage 12's text replaced, passage 40 removed and one
/// passage added at the end.
fn edit_corpus(dir: &Path) {
    let path = dir.join("corpus.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut lines: Vec<String> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        match i {
            12 => {
                let mut v: serde_json::Value = serde_json::from_str(line).unwrap();
                v["text"] = "Ribosomes translate messenger RNA into proteins in every cell.".into();
                lines.push(v.to_string());
            }
            40 => {}
            _ => lines.push(line.to_string()),
        }
    }
    lines.push(
        serde_json::json!({"_id": "added-1", "title": "Chaperones",
            "text": "Heat shock proteins help other proteins fold under stress."})
        .to_string(),
    );
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
}

/// The bytes of every part of a stage, in order.
fn stage_bytes(run: &Path, stage: &str) -> Vec<Vec<u8>> {
    let mut parts: Vec<_> = std::fs::read_dir(run.join("stages").join(stage))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    parts.sort();
    parts.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

/// Rows the device journal says each stage label ran and took from its memo table, from
/// line `from` on.
fn embedded_since(run: &Path, from: usize) -> Vec<(String, u64, u64)> {
    std::fs::read_to_string(run.join("device-stages.jsonl"))
        .unwrap()
        .lines()
        .skip(from)
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["label"].as_str().unwrap().to_string(),
                v["rows"].as_u64().unwrap(),
                v["memoised"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn a_changed_corpus_recomputes_only_what_it_touches_and_ends_as_a_fresh_run() {
    let args = ["label", "--config", "pipeline.toml", "--quiet"];
    let again = fixture(false);
    ok(&args, again.path());
    let run = again.path().join("run");
    let journal_lines = std::fs::read_to_string(run.join("device-stages.jsonl"))
        .unwrap()
        .lines()
        .count();
    edit_corpus(again.path());
    ok(&args, again.path());
    let ran = embedded_since(&run, journal_lines);
    let passages: Vec<(u64, u64)> = ran
        .iter()
        .filter(|(label, _, _)| label == "retriever 0: r0-passages")
        .map(|(_, rows, memoised)| (*rows, *memoised))
        .collect();
    // The edited passage and the added one; the other 58 come from the memo table.
    assert_eq!(passages, [(2, 58)], "{ran:?}");

    let fresh = fixture(false);
    edit_corpus(fresh.path());
    ok(&args, fresh.path());
    let fresh_run = fresh.path().join("run");
    for stage in ["r0-passages", "candidates", "examples"] {
        assert!(
            stage_bytes(&run, stage) == stage_bytes(&fresh_run, stage),
            "stage {stage} differs from a run from scratch"
        );
    }
    assert_eq!(
        std::fs::read_to_string(run.join("candidates-stats.json")).unwrap(),
        std::fs::read_to_string(fresh_run.join("candidates-stats.json")).unwrap(),
    );
    // label-stats.json says what each run did: the same funnel and examples, but the
    // rerun scored only the pairs it had never scored (BM25 rescored every pair: a
    // changed corpus moves every document frequency).
    let stats = |run: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(run.join("label-stats.json")).unwrap())
            .unwrap()
    };
    let (rerun, scratch) = (stats(&run), stats(&fresh_run));
    for field in ["stats", "examples", "train", "dev", "pairs"] {
        assert_eq!(rerun[field], scratch[field], "label-stats.json {field}");
    }
    assert_eq!(rerun["mine"]["stats"], scratch["mine"]["stats"]);
    let pairs = scratch["pairs"].as_u64().unwrap();
    let scored: Vec<u64> = rerun["scored_now"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_u64().unwrap())
        .collect();
    assert_eq!(scored[0], pairs, "bm25 rescores every pair");
    assert!(
        scored[1..].iter().all(|&n| 0 < n && n < pairs / 2),
        "the model teachers score only new pairs: {scored:?} of {pairs}"
    );
}
