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

/// The ids of the corpus lines `lines` (0-based).
fn ids_of_lines(dir: &Path, lines: &[usize]) -> Vec<String> {
    let text = std::fs::read_to_string(dir.join("corpus.jsonl")).unwrap();
    let all: Vec<&str> = text.lines().collect();
    lines
        .iter()
        .map(|&i| {
            let v: serde_json::Value = serde_json::from_str(all[i]).unwrap();
            v["_id"].as_str().unwrap().to_string()
        })
        .collect()
}

/// Retriever 0's lists as the run directory holds them: per query, its identity and the
/// ids of its passages.
fn retrieved(run: &Path) -> Vec<(u128, Vec<String>)> {
    let store = distillery::store::StageStore::open(run).unwrap();
    let (mut ids, mut identities) = (Vec::new(), Vec::new());
    for batch in store.read("r0-retrieved-passages").unwrap() {
        distillery::schema::passage_list_from_batch(&batch.unwrap(), &mut ids, &mut identities)
            .unwrap();
    }
    let mut lists = Vec::new();
    for batch in store.read("r0-retrieved").unwrap() {
        for (query, hits) in distillery::schema::retrieved_from_batch(&batch.unwrap()).unwrap() {
            lists.push((
                query,
                hits.iter()
                    .map(|h| ids[h.passage as usize].clone())
                    .collect(),
            ));
        }
    }
    lists
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
    let before = retrieved(&run);
    let gone = ids_of_lines(again.path(), &[12, 40]);
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
    for stage in [
        "r0-passages",
        "r0-retrieved-passages",
        "r0-retrieved",
        "candidates",
        "examples",
    ] {
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
    // Retrieval repaired the last version's lists: the edited and the added passage
    // scored against every query, the edited and the removed one gone; only lists that
    // held one of those two, and queries whose text is new, retrieved again.
    let retrieval = &rerun["mine"]["retrievals"][0];
    let queries = retrieval["queries"].as_u64().unwrap();
    assert_eq!(retrieval["reused"], false);
    assert_eq!(retrieval["passages_added"], 2, "{retrieval}");
    assert_eq!(retrieval["passages_removed"], 2, "{retrieval}");
    let (repaired, again) = (
        retrieval["lists_repaired"].as_u64().unwrap(),
        retrieval["lists_retrieved"].as_u64().unwrap(),
    );
    assert_eq!(repaired + again, queries, "{retrieval}");
    // Which lists must be retrieved again, from the two versions' stored lists: a query
    // the last version did not have, or whose list held the edited or removed passage.
    let old: std::collections::HashMap<u128, &Vec<String>> =
        before.iter().map(|(q, l)| (*q, l)).collect();
    let must = retrieved(&run)
        .iter()
        .filter(|(q, _)| {
            old.get(q)
                .is_none_or(|l| l.iter().any(|id| gone.contains(id)))
        })
        .count() as u64;
    assert_eq!(again, must, "{retrieval}");
    assert!(again < queries, "{retrieval}");
    assert_eq!(scratch["mine"]["retrievals"][0]["lists_retrieved"], queries);
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
