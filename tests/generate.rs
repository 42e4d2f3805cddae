//! `generate` end to end: the extractive baseline on the shipped SciFact subset, the
//! in-process LLM on the tiny Qwen2 fixture, the query cache (a rerun generates
//! nothing, an edited passage regenerates only its own queries), reproducibility, and
//! generated queries flowing into `mine`.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use distillery::config::{GenerateFile, HeldOutFile, Pipeline, PipelineFile};
use distillery::corpus::ReadOptions;
use distillery::dataflow::candidates::CANDIDATES_STAGE;
use distillery::dataflow::generate::{
    run_generate, run_generate_with, GenerateJob, GenerateOutcome,
};
use distillery::dataflow::passage_index::{load_retrievers, retriever_stage};
use distillery::dataflow::{passage_texts, read_device_journal, run_embed_stage};
use distillery::driver;
use distillery::error::EngineError;
use distillery::generate::extractive::ExtractiveGenerator;
use distillery::generate::prepare::SampledPassage;
use distillery::generate::queries_table::queries_from_batch;
use distillery::generate::{Generated, GenerationRequest, PreparedPassage, QueryGenerator};
use distillery::mining::held_out_passages;
use distillery::schema::candidates_from_batch;
use distillery::store::StageStore;
use distillery_operators::tiny::{write_tiny_bert, TinyBertSpec};
use distillery_operators::TextKind;

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
fn an_edited_passage_gives_the_queries_of_a_run_from_scratch() {
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
    let edited_dir = tempfile::tempdir().unwrap();
    let edited = corpus_head(edited_dir.path(), 30, Some(4));
    let after = run_generate(&job(&file, &edited, run.path(), 0)).unwrap();
    // The edited passage's three queries are generated again, and the keyword queries
    // of the passages whose terms' document frequencies the edit moved; titles and
    // claims of the others come from the cache...
    assert_eq!(after.generator, before.generator);
    assert!(
        (3..3 + 29).contains(&after.generated_now),
        "{}",
        after.generated_now
    );
    // ...to exactly the queries of a run from scratch on the edited corpus.
    let fresh_run = tempfile::tempdir().unwrap();
    let fresh = run_generate(&job(&file, &edited, fresh_run.path(), 0)).unwrap();
    assert_eq!(after.rows, fresh.rows);
    let changed: Vec<usize> = (0..90)
        .filter(|&i| before.rows[i] != after.rows[i])
        .collect();
    // Passage 5's title query is unchanged; its claim and keywords come from the new
    // text (other keyword queries may move with the frequencies; titles never do).
    assert!(
        changed.contains(&13) && changed.contains(&14),
        "{changed:?}"
    );
    assert!(!changed.contains(&12), "{changed:?}");
    assert!(changed
        .iter()
        .all(|&i| i == 13 || before.rows[i].query_type == "keywords"));
    assert!(
        ["An edited passage.", "Its second sentence is new as well."]
            .contains(&after.rows[13].query_text.as_str())
    );
    // The same corpus again: nothing to generate.
    let again = run_generate(&job(&file, &edited, run.path(), 0)).unwrap();
    assert_eq!((again.generated_now, again.cached), (0, 90));
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
    assert!(one.generator.starts_with("llm-v2:tiny-qwen2:"));
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

/// Writes `(id, title, text)` records as a BEIR corpus.
fn write_corpus(path: &Path, records: &[(&str, &str, &str)]) {
    let mut out = std::fs::File::create(path).unwrap();
    for (id, title, text) in records {
        let record = serde_json::json!({"_id": id, "title": title, "text": text});
        writeln!(out, "{record}").unwrap();
    }
}

#[test]
fn a_change_regenerates_what_it_touches_and_no_more() {
    let dir = tempfile::tempdir().unwrap();
    let run = tempfile::tempdir().unwrap();
    let file = GenerateFile::with_generator("extractive");
    let corpus = dir.path().join("corpus.jsonl");
    let mut records = vec![
        ("p0", "Alpha", "Zebras graze on the savanna grass."),
        ("p1", "Beta", "Lions hunt zebras at dawn."),
        ("p2", "Gamma", "Whales sing in deep oceans."),
        ("p3", "Delta", "Deep roots anchor old trees."),
        ("p4", "Epsilon", "Cold winds cross the northern sea."),
        ("p5", "Zeta", "Bees visit flowers for nectar."),
    ];
    write_corpus(&corpus, &records);
    let first = run_generate(&job(&file, &corpus, run.path(), 0)).unwrap();
    assert_eq!(first.generated_now, 18);

    // p2 trades `deep` for `cold`: its own three queries are generated again, and the
    // keyword queries of the passages holding either word (p3 `deep`, p4 `cold`), whose
    // frequencies moved (`deep` 2 -> 1, `cold` 1 -> 2). The corpus size is the same.
    records[2].2 = "Whales sing in cold oceans.";
    write_corpus(&corpus, &records);
    let edited = run_generate(&job(&file, &corpus, run.path(), 0)).unwrap();
    assert_eq!(edited.generated_now, 3 + 2);
    let fresh = tempfile::tempdir().unwrap();
    let scratch = run_generate(&job(&file, &corpus, fresh.path(), 0)).unwrap();
    assert_eq!(edited.rows, scratch.rows);

    // A title-only edit of p5 touches its title and claim (the passage's text as the
    // generator sees it changed) and the keyword queries holding `zeta` or `omega`: p5's.
    records[5].1 = "Omega";
    write_corpus(&corpus, &records);
    let retitled = run_generate(&job(&file, &corpus, run.path(), 0)).unwrap();
    assert_eq!(retitled.generated_now, 3);

    // A new passage changes the corpus size, on which every keyword score depends: every
    // keyword query is generated again, and the new passage's title and claim.
    records.push(("p6", "Eta", "Owls hunt mice at night."));
    write_corpus(&corpus, &records);
    let added = run_generate(&job(&file, &corpus, run.path(), 0)).unwrap();
    assert_eq!(added.generated_now, 7 + 2);
    let fresh = tempfile::tempdir().unwrap();
    let scratch = run_generate(&job(&file, &corpus, fresh.path(), 0)).unwrap();
    assert_eq!(added.rows, scratch.rows);
}

/// A tiny retriever built from the shipped SciFact subset, a fresh run directory and
/// the extractive pipeline over them (the model's directory must outlive the pipeline).
fn mining_fixture() -> (tempfile::TempDir, tempfile::TempDir, Pipeline) {
    let model = tempfile::tempdir().unwrap();
    let texts: Vec<String> = passage_texts(&scifact_mini(), &ReadOptions::default())
        .unwrap()
        .map(|r| r.unwrap().1)
        .collect();
    write_tiny_bert(model.path(), texts.iter(), &TinyBertSpec::default()).unwrap();
    let run = tempfile::tempdir().unwrap();
    let p = generated_pipeline(run.path(), model.path());
    (model, run, p)
}

#[test]
fn generated_queries_feed_mining_with_their_source_as_positive() {
    let (_model, run, p) = mining_fixture();
    let mined = driver::mine(&p).unwrap();
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
    let again = driver::mine(&p).unwrap();
    assert!(again.reused);
}

#[test]
fn generated_queries_are_embedded_ahead_and_the_query_stage_keeps_its_bytes() {
    let (_model, run, p) = mining_fixture();
    driver::mine(&p).unwrap();

    // The training queries (held-out passages' queries are the synthetic test set).
    let file = std::fs::File::open(run.path().join("generated-queries.parquet")).unwrap();
    let mut queries = Vec::new();
    for batch in
        parquet::arrow::arrow_reader::ParquetRecordBatchReader::try_new(file, 1024).unwrap()
    {
        queries.extend(queries_from_batch(&batch.unwrap()).unwrap());
    }
    queries.retain(|q| !q.held_out);
    assert_eq!(queries.len(), 475 * 3);
    let distinct: HashSet<&str> = queries.iter().map(|q| q.query_text.as_str()).collect();

    // Every distinct text embedded once: while generation ran, or by the query stage
    // for what the stream had no room for. The first batch always finds room.
    let journal = read_device_journal(run.path());
    let ahead: u64 = journal
        .iter()
        .filter(|r| r.label == "retriever 0: r0-queries (ahead)")
        .map(|r| r.rows)
        .sum();
    let stage: Vec<_> = journal
        .iter()
        .filter(|r| r.label == "retriever 0: r0-queries")
        .collect();
    assert_eq!(stage.len(), 1);
    assert!(ahead > 0, "nothing was embedded while generation ran");
    assert_eq!(ahead + stage[0].rows, distinct.len() as u64);
    assert_eq!(stage[0].rows + stage[0].memoised, queries.len() as u64);

    // The stage holds the bytes of the same texts embedded by the stage alone, in a
    // store where nothing was embedded ahead.
    let retrievers = load_retrievers(&p).unwrap();
    let r = &retrievers[0];
    let query_stage = retriever_stage(&p, 0, &r.embedder, TextKind::Query, "input", None).unwrap();
    let alone = tempfile::tempdir().unwrap();
    let alone_store = StageStore::open(alone.path()).unwrap();
    let source: Vec<_> = queries
        .iter()
        .map(|q| Ok((q.query_id.clone(), q.query_text.clone())))
        .collect();
    let report = run_embed_stage(
        &alone_store,
        r.embedder.clone(),
        Box::new(source.into_iter()),
        &query_stage,
    )
    .unwrap();
    assert_eq!(report.rows_embedded, distinct.len() as u64);
    let store = StageStore::open(run.path()).unwrap();
    let rows = |store: &StageStore, stage: &str| {
        let mut m = distillery::schema::EmbeddingMatrix::default();
        for b in store.read(stage).unwrap() {
            m.extend_from_batch(&b.unwrap()).unwrap();
        }
        m
    };
    let (streamed, embedded_alone) = (rows(&store, "r0-queries"), rows(&alone_store, "r0-queries"));
    assert_eq!(streamed.ids, embedded_alone.ids);
    let bits = |m: &distillery::schema::EmbeddingMatrix| {
        m.values.iter().map(|v| v.to_bits()).collect::<Vec<u32>>()
    };
    assert!(
        bits(&streamed) == bits(&embedded_alone),
        "the vectors differ"
    );
}

/// The extractive generator, failing as a whole (a model that cannot run) after
/// `ok_batches` batches.
struct FailsAfter {
    inner: ExtractiveGenerator,
    ok_batches: usize,
    calls: AtomicUsize,
}

impl QueryGenerator for FailsAfter {
    fn id(&self) -> String {
        self.inner.id()
    }

    fn request_inputs(&self, passage: &PreparedPassage, query_type: &str) -> Option<String> {
        self.inner.request_inputs(passage, query_type)
    }

    fn generate(&self, requests: &[GenerationRequest]) -> Result<Vec<Generated>, EngineError> {
        if self.calls.fetch_add(1, Ordering::SeqCst) >= self.ok_batches {
            return Err(EngineError::Invalid("the device is gone".into()));
        }
        self.inner.generate(requests)
    }
}

#[test]
fn a_run_that_fails_midway_keeps_its_queries_and_resumes_after_them() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = corpus_head(dir.path(), 40, None);
    let run = tempfile::tempdir().unwrap();
    let mut file = GenerateFile::with_generator("extractive");
    file.batch_size = 10;
    let j = job(&file, &corpus, run.path(), 0);
    let fails = |passages: &[SampledPassage]| -> Result<Box<dyn QueryGenerator>, EngineError> {
        Ok(Box::new(FailsAfter {
            inner: ExtractiveGenerator::from_passages(passages.iter().map(|p| &p.passage)),
            ok_batches: 5,
            calls: AtomicUsize::new(0),
        }))
    };
    let e = run_generate_with(&j, &fails).unwrap_err().to_string();
    assert!(e.contains("the device is gone"), "{e}");
    // The five batches before the failure (50 requests) are kept; the rest is generated
    // by the rerun, and the result equals an uninterrupted run.
    let resumed = run_generate(&j).unwrap();
    assert_eq!(resumed.requests, 120);
    assert_eq!(resumed.cached, 50);
    assert_eq!(resumed.generated_now, 70);
    let fresh_run = tempfile::tempdir().unwrap();
    let fresh = run_generate(&job(&file, &corpus, fresh_run.path(), 0)).unwrap();
    assert_eq!(texts(&resumed), texts(&fresh));
}

#[test]
fn custom_query_types_come_from_the_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let examples = dir.path().join("faq.jsonl");
    std::fs::write(
        &examples,
        "{\"passage\": \"Returns are accepted within 30 days.\", \"query\": \"can I return an item after a month\"}\n\
         {\"passage\": \"Shipping is free over 50 euros.\", \"query\": \"free delivery threshold\"}\n",
    )
    .unwrap();
    let text = format!(
        r#"
run_dir = "{run}"
corpus = "{corpus}"
[generate]
generator = "llm"
model = "{model}"
types = ["faq", "title"]
[[generate.custom_types]]
name = "faq"
instruction = "Write a question a customer would ask about this passage."
examples = "{examples}"
shots = 2
[[retrievers]]
model = "unused"
"#,
        run = dir.path().join("run").display(),
        corpus = scifact_mini().display(),
        model = root().join("tests/fixtures/llm/tiny-qwen2").display(),
        examples = examples.display(),
    );
    let file: PipelineFile = toml::from_str(&text).unwrap();
    let p = Pipeline::resolve(file, Path::new("/"), Path::new("test.toml")).unwrap();
    let job = GenerateJob::from_pipeline(&p).unwrap().unwrap();
    let names: Vec<&str> = job.prompts.types().iter().map(|t| t.name()).collect();
    assert_eq!(names, vec!["faq", "title"]);
    let faq = &job.prompts.types()[0];
    assert_eq!(faq.shots(), 2);
    assert_eq!(faq.examples().len(), 2);

    // A custom type left out of `types`, and a bad examples line, are named.
    let unlisted = text.replace(r#"types = ["faq", "title"]"#, r#"types = ["title"]"#);
    let file: PipelineFile = toml::from_str(&unlisted).unwrap();
    let p = Pipeline::resolve(file, Path::new("/"), Path::new("test.toml")).unwrap();
    let e = GenerateJob::from_pipeline(&p).unwrap_err().to_string();
    assert!(
        e.contains("custom type `faq` is not listed in `types`"),
        "{e}"
    );
    std::fs::write(&examples, "{\"passage\": \"x\"}\n").unwrap();
    let file: PipelineFile = toml::from_str(&text).unwrap();
    let p = Pipeline::resolve(file, Path::new("/"), Path::new("test.toml")).unwrap();
    let e = GenerateJob::from_pipeline(&p).unwrap_err().to_string();
    assert!(e.contains("faq.jsonl:1"), "{e}");
}

#[test]
fn an_unreachable_endpoint_stops_the_stage_after_a_run_of_failures() {
    // A port nobody listens on: every request fails (connection refused, no retries).
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let run = tempfile::tempdir().unwrap();
    let mut file = GenerateFile::with_generator("endpoint");
    file.model = Some("m".into());
    file.endpoint = Some(distillery::config::EndpointFile {
        url: format!("http://127.0.0.1:{port}/v1"),
        api_key_env: None,
        concurrency: Some(16),
        timeout_s: Some(2.0),
        max_retries: Some(0),
    });
    file.batch_size = 64;
    let e = run_generate(&job(&file, &scifact_mini(), run.path(), 0))
        .unwrap_err()
        .to_string();
    assert!(e.contains("256 requests in a row failed"), "{e}");
    assert!(
        e.contains("Connection refused") || e.contains("connection"),
        "{e}"
    );
}
