//! Teacher kinds other than the cross-encoder: a bi-encoder's score is the cosine of the
//! embedder's own embeddings, a BM25 teacher's is BM25 over the pipeline's corpus, and
//! `label` with one of each caches both, reuses both, and re-scores only the teacher
//! whose settings changed.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;
use distillery::config::{Pipeline, PipelineFile};
use distillery::corpus::ReadOptions;
use distillery::dataflow::candidates::CANDIDATES_STAGE;
use distillery::dataflow::embedding_key::embedding_settings_hash;
use distillery::dataflow::evaluate::read_matrix;
use distillery::dataflow::label::bi_encoder::{cosine, BiEncoderTeacher};
use distillery::dataflow::label::bm25::Bm25Teacher;
use distillery::dataflow::label::teacher::{PairTeacher, PairToScore, ScoringContext};
use distillery::dataflow::label::{pair_key, EXAMPLES_STAGE};
use distillery::dataflow::{passage_texts, run_embed_stage, EmbedStage};
use distillery::driver;
use distillery::mining::bm25::{Bm25Params, Bm25Stats};
use distillery::mining::examples_from_batch;
use distillery::schema::candidates_from_batch;
use distillery::store::{StageKey, StageStore};
use distillery_operators::tiny::{write_tiny_bert, TinyBertSpec};
use distillery_operators::{
    Embedder, EmbedderOptions, TextKind, TokenBatch, TokenBudgetBatcher, TokenizedText,
};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn corpus_path() -> PathBuf {
    root().join("datasets/scifact-mini/corpus.jsonl")
}

/// `(id, text)` of every passage of the shipped SciFact subset.
fn corpus() -> Vec<(String, String)> {
    passage_texts(&corpus_path(), &ReadOptions::default())
        .unwrap()
        .map(|r| r.unwrap())
        .collect()
}

/// A tiny random sentence embedder whose tokenizer is trained on the corpus.
fn tiny_model() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let texts: Vec<String> = corpus().into_iter().map(|(_, t)| t).collect();
    write_tiny_bert(dir.path(), texts.iter(), &TinyBertSpec::default()).unwrap();
    dir
}

fn context(store: &StageStore) -> ScoringContext<'_> {
    ScoringContext {
        store,
        stage_prefix: "teacher-test".into(),
        label: "teacher test".into(),
        batcher: TokenBudgetBatcher {
            max_tokens: 4096,
            max_rows: 64,
        },
        workers: 2,
        cluster: Default::default(),
        threads: 2,
        quiet: true,
        known: Vec::new(),
    }
}

/// One text embedded alone, as the embedder does it.
fn embed_alone(embedder: &Embedder, text: &str, kind: TextKind) -> Vec<f32> {
    let ids = embedder.tokenize(&[text], kind).unwrap().remove(0);
    let batch = TokenBatch {
        rows: vec![TokenizedText::new(0, ids)],
    };
    embedder.embed_batch(&batch).unwrap()
}

/// How far a cosine may move between batch compositions of the CPU embedder.
const BATCH_NOISE: f32 = 5e-5;

#[test]
fn bi_encoder_score_is_the_cosine_of_the_embedders_embeddings() {
    let model = tiny_model();
    // Different prompts on the two sides, so embedding a query as a passage (or the
    // reverse) gives another score.
    let options = EmbedderOptions {
        max_seq_length: None,
        query_prefix: Some("query: ".into()),
        passage_prefix: Some("passage: ".into()),
    };
    let embedder = Arc::new(Embedder::load(model.path(), &options, &Device::Cpu).unwrap());
    let teacher = BiEncoderTeacher::new(embedder.clone()).unwrap();

    let texts = corpus();
    let queries = [
        "What reduces the risk of heart disease?",
        "vitamin D deficiency in children",
    ];
    // Two queries, five passages, one passage shared by both queries.
    let pairs: Vec<(String, &str, &str)> = [(0, 0), (0, 1), (0, 2), (1, 2), (1, 3), (1, 4)]
        .iter()
        .map(|&(q, p)| {
            let passage = texts[p].1.as_str();
            (pair_key(queries[q], passage), queries[q], passage)
        })
        .collect();
    let to_score: Vec<PairToScore<'_>> = pairs
        .iter()
        .map(|(key, query, passage)| PairToScore {
            key,
            query,
            passage,
        })
        .collect();
    let run = tempfile::tempdir().unwrap();
    let store = StageStore::open(run.path()).unwrap();
    let got = teacher.score_pairs(&to_score, &context(&store)).unwrap();

    assert_eq!(got.len(), pairs.len());
    let mut side_gap = 0.0f32;
    for (p, &score) in to_score.iter().zip(&got) {
        let q = embed_alone(&embedder, p.query, TextKind::Query);
        let d = embed_alone(&embedder, p.passage, TextKind::Passage);
        let want = cosine(&q, &d);
        // The teacher embeds texts in batches, `embed_alone` one at a time: the CPU
        // kernel's products may differ in the last bits between batch compositions
        // (seen: 1.3e-5 on a cosine of 0.956).
        assert!((score - want).abs() < BATCH_NOISE, "{score} vs {want}");
        // The sides matter: the passage embedded as a query scores otherwise.
        let swapped = cosine(&q, &embed_alone(&embedder, p.passage, TextKind::Query));
        side_gap = side_gap.max((score - swapped).abs());
    }
    // 9.6e-4 on this tiny model (its vocabulary is built deterministically); batch noise
    // is at most BATCH_NOISE, 20x less.
    assert!(
        side_gap > 10.0 * BATCH_NOISE,
        "the query and passage prompts barely matter: {side_gap}"
    );
    // Scores tell pairs apart.
    assert!(got.iter().any(|&s| (s - got[0]).abs() > 1e-3), "{got:?}");
    let counts = teacher.embedding_counts();
    assert_eq!((counts.queries_embedded, counts.passages_embedded), (2, 5));

    // In another run directory, stages that embed with the same model and settings (a
    // retriever's, an evaluation's) embed the texts first: the teacher then embeds
    // nothing, even though no stage it is told of holds them (its own stages share
    // their embedding key's memo table), and the vectors read back give the same
    // scores, bit for bit.
    let other_run = tempfile::tempdir().unwrap();
    let other_store = StageStore::open(other_run.path()).unwrap();
    for (kind, side, items) in [
        (TextKind::Query, "queries", queries.to_vec()),
        (
            TextKind::Passage,
            "passages",
            (0..5).map(|p| texts[p].1.as_str()).collect(),
        ),
    ] {
        let stage = EmbedStage {
            stage: format!("retriever-{side}"),
            key: StageKey {
                settings_hash: embedding_settings_hash(&embedder, kind).unwrap(),
                input_hash: side.into(),
            },
            kind,
            batcher: TokenBudgetBatcher {
                max_tokens: 4096,
                max_rows: 64,
            },
            workers: 1,
            cluster: Default::default(),
            chunk_rows: 2048,
            total: None,
            label: side.into(),
            quiet: true,
        };
        let source: Vec<_> = items
            .iter()
            .enumerate()
            .map(|(i, t)| Ok((i.to_string(), t.to_string())))
            .collect();
        run_embed_stage(
            &other_store,
            embedder.clone(),
            Box::new(source.into_iter()),
            &stage,
        )
        .unwrap();
    }
    let again = teacher
        .score_pairs(&to_score, &context(&other_store))
        .unwrap();
    let counts = teacher.embedding_counts();
    assert_eq!((counts.queries_embedded, counts.passages_embedded), (0, 0));
    assert_eq!((counts.queries_reused, counts.passages_reused), (2, 5));
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&again), bits(&got));

    // Another prompt is another teacher.
    let plain = Embedder::load(model.path(), &EmbedderOptions::default(), &Device::Cpu).unwrap();
    let other = BiEncoderTeacher::new(Arc::new(plain)).unwrap();
    assert_ne!(other.fingerprint(), teacher.fingerprint());
}

#[test]
fn cosine_of_known_vectors() {
    // (1, 2, 2) has norm 3, (2, 1, 2) norm 3, dot 2 + 2 + 4 = 8: cosine 8/9.
    assert!((cosine(&[1.0, 2.0, 2.0], &[2.0, 1.0, 2.0]) - 8.0 / 9.0).abs() < 1e-7);
    assert_eq!(cosine(&[0.0, 0.0], &[1.0, 0.0]), 0.0);
}

/// The fingerprint of a bi-encoder teacher of `model` with its own prompts.
fn teacher_fingerprint(model: &Path) -> String {
    let embedder = Embedder::load(model, &EmbedderOptions::default(), &Device::Cpu).unwrap();
    BiEncoderTeacher::new(Arc::new(embedder))
        .unwrap()
        .fingerprint()
        .to_string()
}

fn pipeline(run: &Path, model: &Path, b: f64) -> Pipeline {
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
model = "{model}"
[candidates]
retrieve_top = 50
source_in_top = 50
fused_top = 50
[[teachers]]
kind = "bi-encoder"
model = "{model}"
weight = 1
[[teachers]]
kind = "bm25"
weight = 1
b = {b}
[teacher]
require_source_first = false
[engine]
threads = 2
"#,
        run = run.display(),
        data = data.display(),
        model = model.display(),
    );
    let file: PipelineFile = toml::from_str(&text).unwrap();
    Pipeline::resolve(file, Path::new("/"), Path::new("test.toml")).unwrap()
}

/// The scores of a teacher's cache stage, by pair key.
/// A teacher cache's scores by [`pair_key`] (the cache keeps each key as its 16 bytes).
fn cached_scores(store: &StageStore, stage: &str) -> HashMap<String, f32> {
    use arrow::array::{FixedSizeBinaryArray, Float32Array};
    let mut out = HashMap::new();
    for batch in store.read(stage).unwrap() {
        let batch = batch.unwrap();
        let pairs = batch
            .column(0)
            .as_any()
            .downcast_ref::<FixedSizeBinaryArray>();
        let scores = batch.column(1).as_any().downcast_ref::<Float32Array>();
        let (pairs, scores) = (pairs.unwrap(), scores.unwrap());
        for i in 0..batch.num_rows() {
            let hex: String = pairs.value(i).iter().map(|b| format!("{b:02x}")).collect();
            out.insert(hex, scores.value(i));
        }
    }
    out
}

#[test]
fn label_caches_the_bi_encoder_scores_bm25_afresh_and_rescores_only_what_changed() {
    let model = tiny_model();
    let run = tempfile::tempdir().unwrap();
    let p = pipeline(run.path(), model.path(), 0.4);

    let first = driver::label(&p).unwrap();
    assert!(first.pairs > 0);
    assert_eq!(first.scored_now, vec![first.pairs, first.pairs]);
    assert!(first.examples > 0);
    // The bi-encoder teacher is the retriever's model with the retriever's settings: it
    // takes every query and passage vector from the retriever's stages and embeds none.
    let reuse = first.teacher_embeddings[0];
    assert_eq!((reuse.queries_embedded, reuse.passages_embedded), (0, 0));
    let store = StageStore::open(run.path()).unwrap();
    let teacher_stages: Vec<_> = std::fs::read_dir(run.path().join("stages"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("teacher-") && !n.ends_with("-cache"))
        .collect();
    assert!(teacher_stages.is_empty(), "{teacher_stages:?}");

    let mut examples = Vec::new();
    for b in store.read(EXAMPLES_STAGE).unwrap() {
        examples.extend(examples_from_batch(&b.unwrap()).unwrap());
    }
    assert_eq!(examples.len(), first.examples);

    // BM25 keeps no cache (its scores move with the corpus): labelling scored every
    // pair with BM25 over the whole corpus (Anserini's k1 and b), as the teacher scores
    // each pair alone.
    let bm25 = Bm25Teacher::new(Bm25Params { k1: 0.9, b: 0.4 }, &corpus_path(), None).unwrap();
    assert!(!run
        .path()
        .join(format!(
            "stages/teacher-{}-cache",
            &bm25.fingerprint()[..16]
        ))
        .exists());
    let texts: HashMap<String, String> = corpus().into_iter().collect();
    let mut stats = Bm25Stats::default();
    for t in texts.values() {
        stats.add_document(t);
    }
    assert_eq!(stats.documents(), 500);
    let mut rows = Vec::new();
    for b in store.read(CANDIDATES_STAGE).unwrap() {
        rows.extend(candidates_from_batch(&b.unwrap()).unwrap());
    }
    let pairs: Vec<PairToScore<'_>> = rows
        .iter()
        .flat_map(|r| {
            r.candidate_ids.iter().map(|c| PairToScore {
                key: "",
                query: &r.query_text,
                passage: &texts[c],
            })
        })
        .collect();
    let scores = bm25.score_pairs(&pairs, &context(&store)).unwrap();
    let mut positive = 0;
    for (pair, score) in pairs.iter().zip(&scores) {
        let want = stats.score(Bm25Params::default(), pair.query, pair.passage) as f32;
        assert_eq!(score.to_bits(), want.to_bits());
        positive += usize::from(want > 0.0);
    }
    assert!(positive > 0);

    // The bi-encoder's scores are the cosines of the retriever's own vectors, and it
    // took one vector per distinct query text and candidate passage text.
    let bi = cached_scores(
        &store,
        &format!("teacher-{}-cache", &teacher_fingerprint(model.path())[..16]),
    );
    let q = read_matrix(&store, "r0-queries").unwrap();
    let d = read_matrix(&store, "r0-passages").unwrap();
    let q_row: HashMap<&str, usize> = q
        .ids
        .iter()
        .enumerate()
        .map(|(i, id)| (id.as_str(), i))
        .collect();
    let d_row: HashMap<&str, usize> = d
        .ids
        .iter()
        .enumerate()
        .map(|(i, id)| (id.as_str(), i))
        .collect();
    let mut query_texts = std::collections::HashSet::new();
    let mut passage_texts_seen = std::collections::HashSet::new();
    for r in &rows {
        query_texts.insert(r.query_text.as_str());
        for c in &r.candidate_ids {
            passage_texts_seen.insert(texts[c].as_str());
            let want = cosine(q.row(q_row[r.query_id.as_str()]), d.row(d_row[c.as_str()]));
            assert_eq!(bi[&pair_key(&r.query_text, &texts[c])], want);
        }
    }
    assert_eq!(reuse.queries_reused, query_texts.len() as u64);
    assert_eq!(reuse.passages_reused, passage_texts_seen.len() as u64);

    // A rerun finds the examples complete under their key and scores nothing.
    let second = driver::label(&p).unwrap();
    assert_eq!(second.scored_now, vec![0, 0]);
    assert_eq!(second.pairs, first.pairs);
    assert_eq!(second.examples, first.examples);

    // Another b is another BM25 teacher: only it scores again.
    let p = pipeline(run.path(), model.path(), 0.75);
    let third = driver::label(&p).unwrap();
    assert_eq!(third.scored_now, vec![0, first.pairs]);
    let other = Bm25Teacher::new(Bm25Params { k1: 0.9, b: 0.75 }, &corpus_path(), None).unwrap();
    assert_ne!(other.fingerprint(), bm25.fingerprint());
}
