//! `mine` and `label` end to end on the shipped SciFact subset, with a tiny random
//! retriever and the tiny BERT cross-encoder fixture as teacher: the funnel adds up,
//! held-out passages never become candidates, every example keeps the recipe's
//! invariants, and a second run scores no pair again.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use arrow::array::{Array, FixedSizeBinaryArray, Float32Array};
use distillery::config::{Pipeline, PipelineFile};
use distillery::corpus::ReadOptions;
use distillery::dataflow::candidates::{
    read_human_queries, run_candidates_stage, CANDIDATES_STAGE,
};
use distillery::dataflow::label::{EXAMPLES_STAGE, EXAMPLES_STATS_FILE};
use distillery::dataflow::passage_index::{embed_passages, load_retrievers};
use distillery::dataflow::passage_texts;
use distillery::driver;
use distillery::mining::held_out_passages;
use distillery::mining::{examples_from_batch, split_of, Split};
use distillery::schema::{candidates_from_batch, CandidateRow};
use distillery::store::StageStore;
use distillery_operators::tiny::{write_tiny_bert, TinyBertSpec};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn pipeline(run: &Path, retriever: &Path) -> Pipeline {
    let data = root().join("datasets/scifact-mini");
    let text = format!(
        r#"
run_dir = "{run}"
corpus = "{data}/corpus.jsonl"
[held_out]
count = 25
[queries]
path = "{data}/queries.jsonl"
qrels = "{data}/qrels/test.tsv"
[[retrievers]]
model = "{retriever}"
[candidates]
retrieve_top = 50
source_in_top = 50
fused_top = 50
[[teachers]]
model = "{teacher}"
max_length = 128
[teacher]
require_source_first = false
[engine]
threads = 2
"#,
        run = run.display(),
        data = data.display(),
        retriever = retriever.display(),
        teacher = root().join("tests/fixtures/cross_encoders/bert").display(),
    );
    let file: PipelineFile = toml::from_str(&text).unwrap();
    Pipeline::resolve(file, Path::new("/"), Path::new("test.toml")).unwrap()
}

#[test]
fn mine_and_label_keep_the_recipes_invariants_and_reuse_scores() {
    let model = tempfile::tempdir().unwrap();
    let corpus = root().join("datasets/scifact-mini/corpus.jsonl");
    let texts: Vec<String> = passage_texts(&corpus, &ReadOptions::default())
        .unwrap()
        .map(|r| r.unwrap().1)
        .collect();
    write_tiny_bert(model.path(), texts.iter(), &TinyBertSpec::default()).unwrap();
    let run = tempfile::tempdir().unwrap();
    let p = pipeline(run.path(), model.path());

    let first = driver::label(&p).unwrap();
    let m = &first.mine;
    assert_eq!(m.passages, 500);
    assert_eq!(m.held_out, 25);
    assert_eq!(m.stats.queries_in, 127);
    assert_eq!(
        m.stats.kept
            + m.stats.dropped_held_out_source
            + m.stats.dropped_no_retriever
            + m.stats.dropped_source_cut
            + m.stats.dropped_too_few_candidates,
        m.stats.queries_in
    );
    assert!(m.stats.kept > 0);

    // Held-out passages never appear as candidates.
    let ids: Vec<String> = passage_texts(&corpus, &ReadOptions::default())
        .unwrap()
        .map(|r| r.unwrap().0)
        .collect();
    let held: HashSet<&str> = held_out_passages(&ids, 25, 42)
        .into_iter()
        .map(|i| ids[i as usize].as_str())
        .collect();
    let store = StageStore::open(run.path()).unwrap();
    let mut candidates = Vec::new();
    for b in store.read(CANDIDATES_STAGE).unwrap() {
        candidates.extend(candidates_from_batch(&b.unwrap()).unwrap());
    }
    assert_eq!(candidates.len(), m.stats.kept as usize);
    for c in &candidates {
        assert!(c.candidate_ids.len() >= 20 && c.candidate_ids.len() <= 50);
        assert!(c.candidate_ids.iter().all(|id| !held.contains(id.as_str())));
        assert!(c.source_ids.iter().any(|s| c.candidate_ids.contains(s)));
    }

    // Every example: at most 20 passages, scores in [0, 1] and non-increasing, the split
    // the seeded hash gives.
    let mut examples = Vec::new();
    for b in store.read(EXAMPLES_STAGE).unwrap() {
        examples.extend(examples_from_batch(&b.unwrap()).unwrap());
    }
    assert_eq!(examples.len(), first.examples);
    assert_eq!(first.train + first.dev, first.examples);
    assert!(!examples.is_empty());
    let mut saw_one = false;
    for e in &examples {
        assert!(e.passage_ids.len() <= 20 && e.passage_ids.len() == e.scores.len());
        assert!(e.scores.iter().all(|&s| (0.0..=1.0).contains(&s)));
        assert!(e.scores.windows(2).all(|w| w[0] >= w[1]));
        saw_one |= e.scores[0] == 1.0;
        assert_eq!(e.query_type, "human");
        let want = split_of(&e.query_id, 42, 0.1);
        assert_eq!(e.split, want);
    }
    // The 99th percentile of all scores maps to 1: some query's top score reaches it.
    assert!(saw_one);
    assert_eq!(
        examples.iter().filter(|e| e.split == Split::Train).count(),
        first.train
    );

    // The cross-encoder's cache name is a function of its files, its maximum length and
    // the CPU kernel's arithmetic revision only (1bd68bbba7c2ec25 at revision 1, computed
    // at bc3127a; 571f1c89ca9a604c at revision 2): nothing else may orphan a cache.
    assert!(run
        .path()
        .join("stages/teacher-571f1c89ca9a604c-cache")
        .is_dir());

    // A second run finds the examples complete under their key and labels nothing: it
    // reports what the first measured, from the record beside the stage.
    assert!(!first.reused);
    assert_eq!(first.scored_now, vec![first.pairs]);
    let examples_bytes = stage_files(run.path(), EXAMPLES_STAGE);
    let second = driver::label(&p).unwrap();
    assert!(second.mine.reused);
    assert!(second.reused);
    assert_eq!(second.scored_now, vec![0]);
    assert_eq!(
        (second.pairs, second.examples, second.train, second.dev),
        (first.pairs, first.examples, first.train, first.dev)
    );
    assert_eq!(second.stats, first.stats);

    // Without that record (a stage finished by an older version) labelling runs again,
    // every pair from the teacher's cache, leaves the stage's bytes as they were and
    // writes the record, which the next run uses.
    std::fs::remove_file(run.path().join(EXAMPLES_STATS_FILE)).unwrap();
    let third = driver::label(&p).unwrap();
    assert!(!third.reused);
    assert_eq!(third.scored_now, vec![0]);
    assert_eq!(third.stats, first.stats);
    assert_eq!(stage_files(run.path(), EXAMPLES_STAGE), examples_bytes);
    assert!(driver::label(&p).unwrap().reused);
}

/// Every file of a stage, by name, with its bytes.
fn stage_files(run: &Path, stage: &str) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(run.join("stages").join(stage))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    files.sort();
    files
}

/// A teacher cache's scores by pair key.
fn cache_scores(run: &Path) -> BTreeMap<String, u32> {
    let store = StageStore::open(run).unwrap();
    let mut scores = BTreeMap::new();
    for b in store.read("teacher-571f1c89ca9a604c-cache").unwrap() {
        let b = b.unwrap();
        let pairs = b
            .column_by_name("pair")
            .unwrap()
            .as_any()
            .downcast_ref::<FixedSizeBinaryArray>()
            .unwrap();
        let values = b
            .column_by_name("score")
            .unwrap()
            .as_any()
            .downcast_ref::<Float32Array>()
            .unwrap();
        for i in 0..b.num_rows() {
            // Each pair once: a second score of one pair would be work done twice.
            let pair: String = pairs.value(i).iter().map(|b| format!("{b:02x}")).collect();
            let old = scores.insert(pair.clone(), values.value(i).to_bits());
            assert_eq!(old, None, "pair {pair} scored twice");
        }
    }
    scores
}

#[test]
fn candidates_stream_to_the_cross_encoder_chunk_by_chunk_and_label_the_same_bits() {
    let model = tempfile::tempdir().unwrap();
    let corpus = root().join("datasets/scifact-mini/corpus.jsonl");
    let texts: Vec<String> = passage_texts(&corpus, &ReadOptions::default())
        .unwrap()
        .map(|r| r.unwrap().1)
        .collect();
    write_tiny_bert(model.path(), texts.iter(), &TinyBertSpec::default()).unwrap();

    // Not streamed: `mine` retrieves every query in one pass, then `label` finds the
    // candidates complete and its teacher scores every pair itself.
    let whole = tempfile::tempdir().unwrap();
    let p = pipeline(whole.path(), model.path());
    let mined = driver::mine(&p).unwrap();
    assert_eq!(mined.retrievals[0].lists_retrieved, 127);
    let labelled = driver::label(&p).unwrap();
    assert!(labelled.mine.reused);
    assert_eq!(labelled.scored_ahead, vec![0]);
    assert_eq!(labelled.scored_now, vec![labelled.pairs]);
    let want: Vec<_> = ["r0-retrieved", CANDIDATES_STAGE, EXAMPLES_STAGE]
        .iter()
        .map(|s| stage_files(whole.path(), s))
        .collect();
    let want_scores = cache_scores(whole.path());
    assert_eq!(want_scores.len(), labelled.pairs);

    for chunk in [1, 10, 126, 1000] {
        let run = tempfile::tempdir().unwrap();
        let mut p = pipeline(run.path(), model.path());
        p.stream_queries = Some(chunk);

        // The candidates stage alone, its rows collected as it hands them over: each
        // hand-over holds the kept rows of at most `chunk` queries, in query order, and
        // every one comes before the retrieval's lists are kept in the store (its
        // stage is written when the last list is final).
        let store = StageStore::open(run.path()).unwrap();
        let retrievers = load_retrievers(&p).unwrap();
        let indexes = embed_passages(&p, &retrievers).unwrap();
        let queries: Vec<String> =
            read_human_queries(p.queries.as_ref().unwrap(), &ReadOptions::default())
                .unwrap()
                .into_iter()
                .map(|q| q.query.id)
                .collect();
        assert_eq!(queries.len(), 127);
        let mut handed: Vec<Vec<String>> = Vec::new();
        let mut retrieval_complete_at_first = None;
        let mut sink = |rows: Vec<CandidateRow>| {
            retrieval_complete_at_first
                .get_or_insert_with(|| store.last_completed("r0-retrieved").unwrap().is_some());
            handed.push(rows.into_iter().map(|r| r.query_id).collect());
            Ok(())
        };
        let outcome = run_candidates_stage(&p, None, indexes, Some(&mut sink)).unwrap();
        assert_eq!(outcome.retrievals[0].lists_retrieved, 127);
        assert_eq!(retrieval_complete_at_first, Some(false), "chunk {chunk}");
        assert!(store.last_completed("r0-retrieved").unwrap().is_some());
        assert!(handed.len() >= outcome.stats.kept.div_ceil(chunk.min(127) as u64) as usize);
        let place = |id: &String| queries.iter().position(|q| q == id).unwrap();
        for rows in &handed {
            assert!(!rows.is_empty());
            let first = place(&rows[0]);
            assert!(
                rows.iter().all(|r| place(r) / chunk == first / chunk),
                "chunk {chunk}"
            );
        }
        let flat: Vec<String> = handed.concat();
        let mut stage_rows = Vec::new();
        for b in store.read(CANDIDATES_STAGE).unwrap() {
            stage_rows.extend(
                candidates_from_batch(&b.unwrap())
                    .unwrap()
                    .into_iter()
                    .map(|r| r.query_id),
            );
        }
        assert_eq!(flat, stage_rows, "chunk {chunk}");
        drop(store);
        std::fs::remove_dir_all(run.path().join("stages")).unwrap();
        std::fs::remove_file(run.path().join("manifest.json")).ok();

        // The whole label from scratch, streaming: every pair scored ahead, none left to
        // labelling, and the retrieval, candidates, examples and every cached score the
        // same bits as the run that never streamed.
        let streamed = driver::label(&p).unwrap();
        assert_eq!(streamed.scored_ahead, vec![labelled.pairs], "chunk {chunk}");
        assert_eq!(streamed.scored_now, vec![labelled.pairs], "chunk {chunk}");
        let got: Vec<_> = ["r0-retrieved", CANDIDATES_STAGE, EXAMPLES_STAGE]
            .iter()
            .map(|s| stage_files(run.path(), s))
            .collect();
        assert!(got == want, "chunk {chunk}: a stage differs");
        assert!(cache_scores(run.path()) == want_scores, "chunk {chunk}");
    }
}
