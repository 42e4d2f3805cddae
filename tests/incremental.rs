//! A changed corpus, end to end: `label` run again in the same run directory after
//! passages were edited, added and removed embeds only the new and edited texts, and
//! ends with the candidates and the examples of a run from scratch, byte for byte.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::collections::HashSet;
use std::path::Path;

#[path = "support/recipe.rs"]
mod recipe;
use recipe::{files, fixture, ok, stage_bytes};

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

/// Lines of the run's device journal so far.
fn journal_len(run: &Path) -> usize {
    std::fs::read_to_string(run.join("device-stages.jsonl"))
        .unwrap()
        .lines()
        .count()
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
    let journal_lines = journal_len(&run);
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

/// The corpus's records, in file order.
fn records(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("corpus.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn write_records(dir: &Path, records: &[serde_json::Value]) {
    let lines: Vec<String> = records.iter().map(|r| r.to_string()).collect();
    std::fs::write(dir.join("corpus.jsonl"), lines.join("\n") + "\n").unwrap();
}

/// (title, text) of each passage id: what a teacher and an embedder see of it.
fn texts(records: &[serde_json::Value]) -> std::collections::HashMap<String, (String, String)> {
    records
        .iter()
        .map(|r| {
            let s = |f: &str| r[f].as_str().unwrap_or_default().to_string();
            (s("_id"), (s("title"), s("text")))
        })
        .collect()
}

/// The (query text, passage title and text) pairs the candidates stage of `run` asks
/// the teachers to score, over the corpus `records`.
fn pairs(run: &Path, records: &[serde_json::Value]) -> HashSet<(String, (String, String))> {
    let texts = texts(records);
    let store = distillery::store::StageStore::open(run).unwrap();
    let mut out = HashSet::new();
    for batch in store.read("candidates").unwrap() {
        for row in distillery::schema::candidates_from_batch(&batch.unwrap()).unwrap() {
            for c in row.candidate_ids {
                out.insert((row.query_text.clone(), texts[&c].clone()));
            }
        }
    }
    out
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &target);
        } else {
            std::fs::copy(&path, &target).unwrap();
        }
    }
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// What a change must cost: passages embedded, and passages new to and gone from
/// retrieval's passage list.
struct Touches {
    embedded: u64,
    added: u64,
    removed: u64,
    /// The change plan's passages: added, removed, text edited, title edited, and
    /// duplicates formed (passages repeating another's title and text).
    plan: [i64; 5],
}

/// A change of the corpus, given the fixture's original corpus.
type Change = fn(&mut Vec<serde_json::Value>, &[serde_json::Value]);

/// Runs `train` on the fixture, applies each of `changes` with `train` run again after
/// each in the same directory, and checks the last rerun against `train` from scratch on
/// the final corpus: the same retrieval lists, candidates, examples and model, byte for
/// byte; the rerun embedded, retrieved and scored exactly what the last change touches.
fn check_change(base: &Path, name: &str, changes: &[Change], touches: Touches) {
    let args = ["train", "--config", "pipeline.toml", "--quiet"];
    let work = tempfile::tempdir().unwrap();
    copy_dir(base, work.path());
    let dir = work.path();
    let run = dir.join("run");
    // Every pair any earlier run scored: the model teachers' caches.
    let original = records(dir);
    let mut seen = pairs(&run, &original);
    let mut corpus = original.clone();
    let mut last = original.clone();
    for (i, change) in changes.iter().enumerate() {
        if i > 0 {
            ok(&args, dir);
            seen.extend(pairs(&run, &corpus));
        }
        last = corpus.clone();
        change(&mut corpus, &original);
        write_records(dir, &corpus);
    }
    let before = retrieved(&run);
    let journal = journal_len(&run);
    ok(&args, dir);

    let fresh = fixture(false);
    write_records(fresh.path(), &corpus);
    ok(&args, fresh.path());
    let fresh_run = fresh.path().join("run");
    for stage in [
        "r0-passages",
        "r0-queries",
        "r0-retrieved-passages",
        "r0-retrieved",
        "candidates",
        "examples",
    ] {
        assert!(
            stage_bytes(&run, stage) == stage_bytes(&fresh_run, stage),
            "{name}: stage {stage} differs from a run from scratch"
        );
    }
    let (model, fresh_model) = (
        files(&run.join("train/best-model")),
        files(&fresh_run.join("train/best-model")),
    );
    let differ: Vec<_> = model
        .iter()
        .zip(&fresh_model)
        .filter(|(a, b)| a != b)
        .map(|(a, _)| a.0.display().to_string())
        .collect();
    assert!(
        model.len() == fresh_model.len() && differ.is_empty(),
        "{name}: the model differs from a run from scratch in {differ:?}"
    );

    let embedded: u64 = embedded_since(&run, journal)
        .iter()
        .filter(|(label, _, _)| label == "retriever 0: r0-passages")
        .map(|(_, rows, _)| rows)
        .sum();
    assert_eq!(embedded, touches.embedded, "{name}: passages embedded");
    // The change plan (differential dataflow over the last finished version): what the
    // last change did to the corpus, per id.
    let change = &json(&run.join("generate-report.json"))["change"];
    let p = &change["passages"];
    assert_eq!(change["last_version"], true, "{name}: {change}");
    assert_eq!(
        [
            &p["added"],
            &p["removed"],
            &p["text_edited"],
            &p["title_edited"],
            &p["duplicates_formed"]
        ]
        .map(|v| v.as_i64().unwrap()),
        touches.plan,
        "{name}: {change}"
    );
    assert_eq!(p["read"], corpus.len() as u64, "{name}: {change}");
    let q = &change["queries"];
    let n = |v: &serde_json::Value| v.as_u64().unwrap();
    assert_eq!(
        n(&q["unchanged"]) + n(&q["added"]) + n(&q["rewritten"]),
        n(&q["queries"]),
        "{name}: {change}"
    );
    let label = &json(&run.join("train-report.json"))["label"];
    let retrieval = &label["mine"]["retrievals"][0];
    let queries = retrieval["queries"].as_u64().unwrap();
    if changes.is_empty() {
        assert_eq!(retrieval["reused"], true, "{name}: {retrieval}");
        assert_eq!(label["scored_now"], serde_json::json!([0, 0, 0]), "{name}");
        assert_eq!(
            label["reused"], true,
            "{name}: the examples were labelled again"
        );
        assert_eq!(
            json(&run.join("generate-report.json"))["generated_now"],
            0,
            "{name}"
        );
        return;
    }
    assert_eq!(
        retrieval["passages_added"], touches.added,
        "{name}: {retrieval}"
    );
    assert_eq!(
        retrieval["passages_removed"], touches.removed,
        "{name}: {retrieval}"
    );
    // Lists retrieved again: queries the last version lacked, or whose list held a
    // passage that is gone (an id whose title and text are not what they were).
    let old_texts = texts(&last);
    let now = texts(&corpus);
    let gone = |id: &String| now.get(id) != old_texts.get(id);
    let old: std::collections::HashMap<u128, &Vec<String>> =
        before.iter().map(|(q, l)| (*q, l)).collect();
    let must = retrieved(&run)
        .iter()
        .filter(|(q, _)| old.get(q).is_none_or(|l| l.iter().any(gone)))
        .count() as u64;
    assert_eq!(retrieval["lists_retrieved"], must, "{name}: {retrieval}");
    assert_eq!(
        retrieval["lists_repaired"].as_u64().unwrap() + must,
        queries,
        "{name}: {retrieval}"
    );
    assert_eq!(label["reused"], false, "{name}");
    // The model teachers scored exactly the pairs no earlier run had; BM25 every pair
    // (a changed corpus moves every document frequency).
    let new_pairs = pairs(&run, &corpus);
    let unseen = new_pairs.difference(&seen).count() as u64;
    let scored = label["scored_now"].as_array().unwrap();
    assert_eq!(scored[0], new_pairs.len() as u64, "{name}: bm25");
    assert_eq!(scored[1], unseen, "{name}: bi-encoder");
    assert_eq!(scored[2], unseen, "{name}: cross-encoder");
}

fn set(record: &mut serde_json::Value, field: &str, value: &str) {
    record[field] = value.into();
}

#[test]
fn every_kind_of_change_ends_as_a_fresh_run_and_costs_what_it_touches() {
    let base = fixture(false);
    ok(
        &["train", "--config", "pipeline.toml", "--quiet"],
        base.path(),
    );
    let base = base.path();
    check_change(
        base,
        "unchanged",
        &[],
        Touches {
            embedded: 0,
            added: 0,
            removed: 0,
            plan: [0, 0, 0, 0, 0],
        },
    );
    check_change(
        base,
        "additions",
        &[|c, _| {
            c.insert(
                17,
                serde_json::json!({"_id": "new-a", "title": "Telomeres",
                    "text": "Telomerase extends the ends of chromosomes in stem cells."}),
            );
            c.push(serde_json::json!({"_id": "new-b", "title": "",
                "text": "Mitochondria carry their own circular genome."}));
        }],
        Touches {
            embedded: 2,
            added: 2,
            removed: 0,
            plan: [2, 0, 0, 0, 0],
        },
    );
    check_change(
        base,
        "deletions",
        &[|c, _| {
            c.remove(33);
            c.remove(5);
        }],
        Touches {
            embedded: 0,
            added: 0,
            removed: 2,
            plan: [0, 2, 0, 0, 0],
        },
    );
    check_change(
        base,
        "text edit",
        &[|c, _| {
            set(
                &mut c[12],
                "text",
                "Ribosomes translate messenger RNA into proteins.",
            )
        }],
        Touches {
            embedded: 1,
            added: 1,
            removed: 1,
            plan: [0, 0, 1, 0, 0],
        },
    );
    check_change(
        base,
        "title edit",
        &[|c, _| set(&mut c[20], "title", "A title no passage had before")],
        Touches {
            embedded: 1,
            added: 1,
            removed: 1,
            plan: [0, 0, 0, 1, 0],
        },
    );
    check_change(
        base,
        "a new passage duplicating an old one",
        &[|c, _| {
            let mut copy = c[7].clone();
            set(&mut copy, "_id", "copy-of-7");
            c.push(copy);
        }],
        // Its text is embedded already; its id is a new passage for retrieval.
        Touches {
            embedded: 0,
            added: 1,
            removed: 0,
            plan: [1, 0, 0, 0, 1],
        },
    );
    check_change(
        base,
        "a passage removed, then added back",
        &[
            |c, _| {
                c.remove(9);
            },
            |c, original| c.insert(9, original[9].clone()),
        ],
        Touches {
            embedded: 0,
            added: 1,
            removed: 0,
            plan: [1, 0, 0, 0, 0],
        },
    );
}

#[test]
fn warm_start_previous_continues_from_the_last_model_and_is_stable_across_reruns() {
    let args = ["train", "--config", "pipeline.toml", "--quiet"];
    let warm = |dir: &Path| {
        let path = dir.join("pipeline.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(
            &path,
            text.replace("[train]\n", "[train]\nwarm_start = \"previous\"\n"),
        )
        .unwrap();
    };
    let w = fixture(false);
    warm(w.path());
    ok(&args, w.path());
    let run = w.path().join("run");
    let first = std::fs::read(run.join("train/best-model/model.safetensors")).unwrap();
    // No earlier model: the first run started from the base, as a run from scratch.
    assert!(!run.join("train/warm-start").exists());

    edit_corpus(w.path());
    ok(&args, w.path());
    // The changed inputs started from a copy of the last run's model...
    assert_eq!(
        std::fs::read(run.join("train/warm-start/model.safetensors")).unwrap(),
        first
    );
    let report = json(&run.join("train-report.json"));
    assert!(report["started_from"]
        .as_str()
        .unwrap()
        .ends_with("warm-start"));
    let second = std::fs::read(run.join("train/best-model/model.safetensors")).unwrap();
    // ...so the model is not a run from scratch's on the new corpus (which starts from
    // the base model: nothing earlier to continue from).
    let fresh = fixture(false);
    warm(fresh.path());
    edit_corpus(fresh.path());
    ok(&args, fresh.path());
    let scratch =
        std::fs::read(fresh.path().join("run/train/best-model/model.safetensors")).unwrap();
    assert_ne!(second, scratch);
    assert_ne!(second, first);

    // Unchanged inputs: nothing trains again, the model stays.
    ok(&args, w.path());
    assert_eq!(
        std::fs::read(run.join("train/best-model/model.safetensors")).unwrap(),
        second
    );
    let report = json(&run.join("train-report.json"));
    assert_eq!(
        report["report"]["resumed_from"],
        report["report"]["state"]["global_step"]
    );
}
