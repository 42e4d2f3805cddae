//! The embedding stage end to end on a tiny random model: same output whatever the
//! worker count, a rerun computes nothing, an interrupted run resumes to the bytes of an
//! uninterrupted one, and an input error stops the stage naming file and line.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::path::Path;
use std::sync::Arc;

use candle_core::Device;
use distillery::corpus::ReadOptions;
use distillery::dataflow::evaluate::read_matrix;
use distillery::dataflow::memo_embed::memo_stage_name;
use distillery::dataflow::passage_texts;
use distillery::dataflow::{run_embed_stage, EmbedStage, TextSource};
use distillery::error::EngineError;
use distillery::store::memo::memo_stage_key;
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
        cluster: Default::default(),
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
    // The two whole chunks before the failure are committed to the memo table; the
    // third is not, and the stage itself was never begun.
    let key = stage(1, 100).key;
    assert_eq!(
        store
            .status(&memo_stage_name("s"), &memo_stage_key("s"))
            .unwrap(),
        StageStatus::Partial {
            committed_rows: 200,
            committed_parts: 2
        }
    );
    assert_eq!(
        store.status("passage-embeddings", &key).unwrap(),
        StageStatus::Absent
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

/// The corpus's passages with some changed: `edit` (index, new text), `remove` (indices),
/// then `add` (id, text) at the end.
fn changed_corpus(edit: &[(usize, &str)], remove: &[usize], add: &[(&str, &str)]) -> TextSource {
    let mut texts: Vec<(String, String)> = corpus().map(|r| r.unwrap()).collect();
    for &(i, text) in edit {
        texts[i].1 = text.to_string();
    }
    let mut i = 0;
    texts.retain(|_| {
        i += 1;
        !remove.contains(&(i - 1))
    });
    texts.extend(add.iter().map(|(id, t)| (id.to_string(), t.to_string())));
    Box::new(texts.into_iter().map(Ok))
}

fn stage_for(input_hash: &str) -> EmbedStage {
    EmbedStage {
        key: StageKey {
            settings_hash: "s".into(),
            input_hash: input_hash.into(),
        },
        ..stage(1, 100)
    }
}

#[test]
fn a_changed_corpus_embeds_only_its_new_texts_and_ends_equal_to_a_fresh_run() {
    let model = tempfile::tempdir().unwrap();
    let e = tiny_embedder(model.path());
    let texts: Vec<(String, String)> = corpus().map(|r| r.unwrap()).collect();
    let run = tempfile::tempdir().unwrap();
    let store = StageStore::open(run.path()).unwrap();
    let first = run_embed_stage(&store, e.clone(), corpus(), &stage_for("v1")).unwrap();
    assert_eq!((first.rows_embedded, first.rows_memoised), (500, 0));

    // Two texts edited, one a title-only change; two passages removed; three added, one
    // of them a copy of an existing text and one put back as it was.
    let title_only = format!("A new title {}", texts[40].1);
    let edits = [
        (3, "an entirely new text about ribosomes"),
        (40, title_only.as_str()),
    ];
    let removed = [10, 11];
    let added = [
        ("new-1", "a passage nobody embedded before"),
        ("copy-of-7", texts[7].1.as_str()),
        ("back-11", texts[11].1.as_str()),
    ];
    let changed = || changed_corpus(&edits, &removed, &added);
    let second = run_embed_stage(&store, e.clone(), changed(), &stage_for("v2")).unwrap();
    // Embedded: the two edits and the one new text; every other row from the memo.
    assert_eq!(second.rows_embedded, 3);
    assert_eq!(second.rows_memoised, 498);
    assert_eq!(second.completed.rows(), 501);

    let fresh_dir = tempfile::tempdir().unwrap();
    let fresh_store = StageStore::open(fresh_dir.path()).unwrap();
    let fresh = run_embed_stage(&fresh_store, e.clone(), changed(), &stage_for("v2")).unwrap();
    assert_eq!(fresh.rows_embedded, 500, "501 rows, one text twice");
    assert_eq!(
        second.completed.content_hash(),
        fresh.completed.content_hash(),
        "the incremental stage's parts are the fresh run's, byte for byte"
    );
    let m = read_matrix(&store, "passage-embeddings").unwrap();
    assert_eq!(m.ids[498], "new-1");
    assert_eq!(
        m.row(499),
        m.row(7),
        "a copied text has its original's vector"
    );

    // The first corpus again: nothing to embed.
    let back = run_embed_stage(&store, e, corpus(), &stage_for("v1-again")).unwrap();
    assert_eq!((back.rows_embedded, back.rows_memoised), (0, 500));
    assert_eq!(
        back.completed.content_hash(),
        first.completed.content_hash()
    );
}

#[test]
fn two_stages_at_once_share_the_device_and_write_what_each_writes_alone() {
    let model = tempfile::tempdir().unwrap();
    let e = tiny_embedder(model.path());
    let passages = |name: &str| EmbedStage {
        stage: name.into(),
        ..stage_for(name)
    };
    let queries = |name: &str| EmbedStage {
        stage: name.into(),
        kind: TextKind::Query,
        key: StageKey {
            settings_hash: "q".into(),
            input_hash: name.into(),
        },
        ..stage(1, 100)
    };
    // Alone, one after the other.
    let alone_dir = tempfile::tempdir().unwrap();
    let alone = StageStore::open(alone_dir.path()).unwrap();
    let a = run_embed_stage(&alone, e.clone(), corpus(), &passages("p")).unwrap();
    let b = run_embed_stage(&alone, e.clone(), corpus(), &queries("q")).unwrap();
    // At once, on two threads: both go through the one CPU executor.
    let together_dir = tempfile::tempdir().unwrap();
    let together = StageStore::open(together_dir.path()).unwrap();
    let (x, y) = std::thread::scope(|s| {
        let x = s.spawn(|| run_embed_stage(&together, e.clone(), corpus(), &passages("p")));
        let y = s.spawn(|| run_embed_stage(&together, e.clone(), corpus(), &queries("q")));
        (x.join().unwrap().unwrap(), y.join().unwrap().unwrap())
    });
    assert_eq!(x.completed.content_hash(), a.completed.content_hash());
    assert_eq!(y.completed.content_hash(), b.completed.content_hash());
    assert_eq!((x.rows_embedded, y.rows_embedded), (500, 500));
    // Each stage's figures are its own queue's.
    assert_eq!(x.executor.rows, 500);
    assert_eq!(y.executor.rows, 500);
}
