//! `generate` end to end: the extractive baseline on the shipped SciFact subset, the
//! in-process LLM on the tiny Qwen2 fixture, the query cache (a rerun generates
//! nothing, an edited passage regenerates only its own queries), reproducibility, and
//! generated queries flowing into `mine`.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use distillery::config::{GenerateFile, HeldOutFile, Pipeline, PipelineFile};
use distillery::corpus::ReadOptions;
use distillery::jobs::generate::{run_generate, GenerateJob, GenerateOutcome};
use distillery::jobs::mine::{held_out_passages, run_mine, CANDIDATES_STAGE};
use distillery::jobs::passage_texts;
use distillery::schema::candidates_from_batch;
use distillery::store::StageStore;
use distillery_operators::tiny::{write_tiny_bert, TinyBertSpec};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn scifact_mini() -> PathBuf {
    root().join("datasets/scifact-mini/corpus.jsonl")
}

/// The first `n` lines of the SciFact subset, with line `edit` (if any) given a new text.
fn corpus_head(dir: &Path, n: usize, edit: Option<usize>) -> PathBuf {
    let text = std::fs::read_to_string(scifact_mini()).unwrap();
    let path = dir.join(format!("corpus-{n}-{edit:?}.jsonl"));
    let mut out = std::fs::File::create(&path).unwrap();
    for (i, line) in text.lines().take(n).enumerate() {
        if Some(i) == edit {
            let mut v: serde_json::Value = serde_json::from_str(line).unwrap();
            v["text"] = serde_json::Value::String(
                "An edited passage. Its second sentence is new as well.".into(),
            );
            writeln!(out, "{v}").unwrap();
        } else {
            writeln!(out, "{line}").unwrap();
        }
    }
    path
}

fn job(file: &GenerateFile, corpus: &Path, run: &Path, held_out: usize) -> GenerateJob {
    let held = HeldOutFile {
        count: held_out,
        ..HeldOutFile::default()
    };
    let mut job = GenerateJob::from_file(file, corpus, run, &held, None).unwrap();
    job.quiet = true;
    job
}

fn texts(o: &GenerateOutcome) -> Vec<(String, String)> {
    o.rows
        .iter()
        .map(|r| (r.query_id.clone(), r.query_text.clone()))
        .collect()
}

#[test]
fn extractive_queries_are_the_passages_own_words_and_cached() {
    let corpus = scifact_mini();
    let run = tempfile::tempdir().unwrap();
    let file = GenerateFile::with_generator("extractive");
    let first = run_generate(&job(&file, &corpus, run.path(), 10)).unwrap();
    assert_eq!(first.prepare.read, 500);
    assert_eq!(first.passages, 500);
    // title, claim, keywords per passage; every SciFact passage has a title and sentences.
    assert_eq!(first.requests, 1500);
    assert_eq!(first.queries, 1500);
    assert_eq!(first.failed, 0);
    assert_eq!(first.generated_now, 1500);
    assert_eq!(first.prepare.held_out.len(), 10);

    // The first passage of the file: its title is its title query; its claim is one of
    // its sentences; its keywords are five words of it.
    let line = std::fs::read_to_string(&corpus).unwrap();
    let p: serde_json::Value = serde_json::from_str(line.lines().next().unwrap()).unwrap();
    let id = p["_id"].as_str().unwrap();
    let get = |t: &str| {
        first
            .rows
            .iter()
            .find(|r| r.query_id == format!("{id}#{t}"))
            .unwrap()
    };
    assert_eq!(get("title").query_text, p["title"].as_str().unwrap());
    assert_eq!(get("title").source_id, id);
    assert!(p["text"]
        .as_str()
        .unwrap()
        .contains(get("claim").query_text.as_str()));
    let lower = format!("{} {}", p["title"], p["text"]).to_lowercase();
    let keywords: Vec<&str> = get("keywords").query_text.split(", ").collect();
    assert_eq!(keywords.len(), 5);
    assert!(keywords.iter().all(|k| lower.contains(k)), "{keywords:?}");

    // Held-out passages are the ones `mine` holds out with the same count and seed.
    let ids: Vec<String> = passage_texts(&corpus, &ReadOptions::default())
        .unwrap()
        .map(|r| r.unwrap().0)
        .collect();
    let held: HashSet<String> = held_out_passages(&ids, 10, 42)
        .into_iter()
        .map(|i| ids[i as usize].clone())
        .collect();
    let marked: HashSet<String> = first
        .rows
        .iter()
        .filter(|r| r.held_out)
        .map(|r| r.source_id.clone())
        .collect();
    assert_eq!(marked, held);

    // A rerun generates nothing and gives the same queries.
    let again = run_generate(&job(&file, &corpus, run.path(), 10)).unwrap();
    assert_eq!(again.generated_now, 0);
    assert_eq!(again.cached, 1500);
    assert_eq!(texts(&again), texts(&first));
}

#[test]
fn an_edited_passage_regenerates_only_its_own_queries() {
    let dir = tempfile::tempdir().unwrap();
    let run = tempfile::tempdir().unwrap();
    let file = GenerateFile::with_generator("extractive");
    let before = run_generate(&job(
        &file,
        &corpus_head(dir.path(), 30, None),
        run.path(),
        0,
    ))
    .unwrap();
    assert_eq!(before.generated_now, 90);
    let after = run_generate(&job(
        &file,
        &corpus_head(dir.path(), 30, Some(4)),
        run.path(),
        0,
    ))
    .unwrap();
    // Passage 5's three queries, nothing else.
    assert_eq!(after.generated_now, 3);
    assert_eq!(after.cached, 87);
    let changed: Vec<usize> = (0..90)
        .filter(|&i| before.rows[i] != after.rows[i])
        .collect();
    // Its title query is unchanged; its claim and keywords come from the new text.
    assert_eq!(changed, vec![13, 14]);
    assert!(
        ["An edited passage.", "Its second sentence is new as well."]
            .contains(&after.rows[13].query_text.as_str())
    );
}

#[test]
fn the_llm_generator_is_reproducible_whatever_the_batching() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = corpus_head(dir.path(), 4, None);
    let mut file = GenerateFile::with_generator("llm");
    file.model = Some(
        root()
            .join("tests/fixtures/llm/tiny-qwen2")
            .display()
            .to_string(),
    );
    file.types = Some(vec!["question".into(), "keywords".into()]);
    file.max_new_tokens = 12;
    let run_with = |batch: usize, seed: u64| {
        let run = tempfile::tempdir().unwrap();
        let mut f = file.clone();
        f.batch_size = batch;
        f.seed = seed;
        run_generate(&job(&f, &corpus, run.path(), 0)).unwrap()
    };
    let one = run_with(1, 42);
    assert_eq!(one.requests, 8);
    assert_eq!(one.generated_now, 8);
    assert!(one.tokens > 0 && one.tokens <= 8 * 12);
    assert!(one.generator.starts_with("llm-v1:tiny-qwen2:"));
    // Each request is sampled from its own seed: batching changes nothing.
    let eight = run_with(8, 42);
    assert_eq!(texts(&one), texts(&eight));
    assert_eq!(one.tokens, eight.tokens);
    // Another run seed, other queries.
    let other = run_with(8, 7);
    assert_ne!(texts(&one), texts(&other));
}

/// A pipeline whose queries are all generated (no `[queries]`).
fn generated_pipeline(run: &Path, retriever: &Path) -> Pipeline {
    let text = format!(
        r#"
run_dir = "{run}"
corpus = "{corpus}"
[held_out]
count = 25
[generate]
generator = "extractive"
[[retrievers]]
model = "{retriever}"
[candidates]
retrieve_top = 50
source_in_top = 50
fused_top = 50
[engine]
threads = 2
"#,
        run = run.display(),
        corpus = scifact_mini().display(),
        retriever = retriever.display(),
    );
    let file: PipelineFile = toml::from_str(&text).unwrap();
    Pipeline::resolve(file, Path::new("/"), Path::new("test.toml")).unwrap()
}

#[test]
fn generated_queries_feed_mining_with_their_source_as_positive() {
    let model = tempfile::tempdir().unwrap();
    let texts: Vec<String> = passage_texts(&scifact_mini(), &ReadOptions::default())
        .unwrap()
        .map(|r| r.unwrap().1)
        .collect();
    write_tiny_bert(model.path(), texts.iter(), &TinyBertSpec::default()).unwrap();
    let run = tempfile::tempdir().unwrap();
    let p = generated_pipeline(run.path(), model.path());
    let mined = run_mine(&p).unwrap();
    // 475 passages outside the held-out 25, three queries each.
    assert_eq!(mined.queries, 475 * 3);
    assert_eq!(mined.stats.queries_in, 475 * 3);
    assert!(mined.stats.kept > 0);
    let store = StageStore::open(run.path()).unwrap();
    let mut rows = Vec::new();
    for b in store.read(CANDIDATES_STAGE).unwrap() {
        rows.extend(candidates_from_batch(&b.unwrap()).unwrap());
    }
    assert_eq!(rows.len(), mined.stats.kept as usize);
    let types: HashSet<&str> = rows.iter().map(|r| r.query_type.as_str()).collect();
    assert!(types.is_subset(&HashSet::from(["title", "claim", "keywords"])));
    for r in &rows {
        let (source, qtype) = r.query_id.split_once('#').unwrap();
        assert_eq!(r.query_type, qtype);
        assert_eq!(r.source_ids, vec![source.to_string()]);
        assert!(r.candidate_ids.iter().any(|c| c == source));
    }
    // A rerun reuses the generated queries and the candidates.
    let again = run_mine(&p).unwrap();
    assert!(again.reused);
}
