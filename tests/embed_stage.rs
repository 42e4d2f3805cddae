//! The embedding stage end to end on a tiny random model: same output whatever the
//! worker count, a rerun computes nothing, an interrupted run resumes to the bytes of an
//! uninterrupted one, and an input error stops the stage naming file and line.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::path::Path;
use std::sync::Arc;

use candle_core::Device;
use distillery::corpus::ReadOptions;
use distillery::dataflow::{run_embed_stage, EmbedStage, TextSource};
use distillery::error::EngineError;
use distillery::jobs::eval::read_matrix;
use distillery::jobs::passage_texts;
use distillery::store::{StageKey, StageStatus, StageStore};
use distillery_operators::tiny::{write_tiny_bert, TinyBertSpec};
use distillery_operators::{
    Embedder, EmbedderOptions, TextKind, TokenBudgetBatcher, TokenizedText,
};

const CORPUS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/datasets/scifact-mini/corpus.jsonl"
);

fn tiny_embedder(dir: &Path) -> Arc<Embedder> {
    let texts: Vec<String> = passage_texts(Path::new(CORPUS), &ReadOptions::default())
        .unwrap()
        .map(|r| r.unwrap().1)
        .collect();
    write_tiny_bert(dir, texts.iter(), &TinyBertSpec::default()).unwrap();
    Arc::new(Embedder::load(dir, &EmbedderOptions::default(), &Device::Cpu).unwrap())
}

fn stage(workers: usize, chunk_rows: usize) -> EmbedStage {
    EmbedStage {
        stage: "passage-embeddings".into(),
        key: StageKey {
            settings_hash: "s".into(),
            input_hash: "i".into(),
        },
        kind: TextKind::Passage,
        batcher: TokenBudgetBatcher {
            max_tokens: 2048,
            max_rows: 64,
        },
        workers,
        chunk_rows,
        total: None,
        label: "test".into(),
        quiet: true,
    }
}

fn corpus() -> TextSource {
    passage_texts(Path::new(CORPUS), &ReadOptions::default()).unwrap()
}

/// The corpus, failing with an error after `n` passages, as a killed reader would stop.
fn corpus_failing_after(n: usize) -> TextSource {
    let mut inner = corpus();
    let mut seen = 0;
    Box::new(std::iter::from_fn(move || {
        if seen == n {
            seen += 1;
            return Some(Err(EngineError::Invalid("simulated interruption".into())));
        }
        if seen > n {
            return None;
        }
        seen += 1;
        inner.next()
    }))
}

#[test]
fn output_is_in_input_order_and_equal_to_direct_embedding() {
    let model = tempfile::tempdir().unwrap();
    let e = tiny_embedder(model.path());
    let run = tempfile::tempdir().unwrap();
    let store = StageStore::open(run.path()).unwrap();
    let report = run_embed_stage(&store, e.clone(), corpus(), &stage(1, 128)).unwrap();
    assert_eq!(report.completed.rows(), 500);
    // 500 rows in chunks of 128: parts of 128, 128, 128, 116.
    let rows: Vec<u64> = report.completed.parts.iter().map(|p| p.rows).collect();
    assert_eq!(rows, vec![128, 128, 128, 116]);
    let m = read_matrix(&store, "passage-embeddings").unwrap();
    let texts: Vec<(String, String)> = corpus().map(|r| r.unwrap()).collect();
    let ids: Vec<&str> = texts.iter().map(|t| t.0.as_str()).collect();
    assert_eq!(m.ids, ids);
    // Row 7 embedded alone, outside the dataflow, gives the same vector.
    let tokens = e
        .tokenize(&[texts[7].1.as_str()], TextKind::Passage)
        .unwrap();
    let batch = distillery_operators::TokenBatch {
        rows: vec![TokenizedText::new(0, tokens[0].clone())],
    };
    let alone = e.embed_batch(&batch).unwrap();
    let diff = alone
        .iter()
        .zip(m.row(7))
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(diff < 1e-5, "max diff {diff}");
    let norm: f32 = m.row(7).iter().map(|x| x * x).sum();
    assert!((norm - 1.0).abs() < 1e-5);
}

#[test]
fn two_workers_write_the_same_bytes_as_one_and_reruns_reuse() {
    let model = tempfile::tempdir().unwrap();
    let e = tiny_embedder(model.path());
    let one = tempfile::tempdir().unwrap();
    let two = tempfile::tempdir().unwrap();
    let s1 = StageStore::open(one.path()).unwrap();
    let s2 = StageStore::open(two.path()).unwrap();
    let a = run_embed_stage(&s1, e.clone(), corpus(), &stage(1, 100)).unwrap();
    let b = run_embed_stage(&s2, e.clone(), corpus(), &stage(2, 100)).unwrap();
    assert_eq!(a.completed.content_hash(), b.completed.content_hash());
    // Same key again: nothing runs, the same parts come back.
    let again = run_embed_stage(&s1, e, corpus(), &stage(1, 100)).unwrap();
    assert!(again.reused);
    assert_eq!(again.rows_embedded, 0);
    assert_eq!(again.completed, a.completed);
}

#[test]
fn interrupted_run_resumes_to_the_uninterrupted_bytes() {
    let model = tempfile::tempdir().unwrap();
    let e = tiny_embedder(model.path());
    let clean = tempfile::tempdir().unwrap();
    let broken = tempfile::tempdir().unwrap();
    let full = run_embed_stage(
        &StageStore::open(clean.path()).unwrap(),
        e.clone(),
        corpus(),
        &stage(1, 100),
    )
    .unwrap();

    let store = StageStore::open(broken.path()).unwrap();
    let err =
        run_embed_stage(&store, e.clone(), corpus_failing_after(250), &stage(1, 100)).unwrap_err();
    assert!(err.to_string().contains("simulated interruption"), "{err}");
    // The two whole chunks before the failure are committed; the third is not.
    let key = stage(1, 100).key;
    assert_eq!(
        store.status("passage-embeddings", &key).unwrap(),
        StageStatus::Partial {
            committed_rows: 200,
            committed_parts: 2
        }
    );
    drop(store);
    let store = StageStore::open(broken.path()).unwrap();
    let resumed = run_embed_stage(&store, e, corpus(), &stage(1, 100)).unwrap();
    assert_eq!(resumed.rows_embedded, 300);
    assert_eq!(
        resumed.completed.content_hash(),
        full.completed.content_hash()
    );
}

#[test]
fn a_bad_record_stops_the_stage_naming_file_and_line() {
    let model = tempfile::tempdir().unwrap();
    let e = tiny_embedder(model.path());
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("corpus.jsonl");
    std::fs::write(
        &bad,
        "{\"_id\":\"a\",\"title\":\"\",\"text\":\"fine\"}\n{\"_id\":\"b\",\"title\":\"\"}\n",
    )
    .unwrap();
    let store = StageStore::open(dir.path().join("run")).unwrap();
    let src = passage_texts(&bad, &ReadOptions::default()).unwrap();
    let err = run_embed_stage(&store, e, src, &stage(1, 100))
        .unwrap_err()
        .to_string();
    assert!(err.contains("corpus.jsonl:2"), "{err}");
    assert!(err.contains("text"), "{err}");
}
