//! `distillery eval`: embed a BEIR dataset's corpus and test queries, retrieve exactly,
//! and score the ranking with trec_eval's semantics.
//!
//! Stages (each reused when its key is unchanged): `passage-embeddings`,
//! `query-embeddings`; then exact top-k in memory, the metrics, and a TREC run file.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use distillery_operators::TextKind;
use serde::Serialize;

use crate::corpus::{open_queries, read_qrels};
use crate::dataflow::{run_embed_stage, EmbedStage, EmbedStageReport};
use crate::error::EngineError;
use crate::eval::{evaluate, write_run_file, EvalOptions, EvalReport, Run};
use crate::jobs::{count_records, hash_file, passage_texts, quarantined, EmbedSettings};
use crate::model::{fingerprint, ResolvedModel};
use crate::record::Query;
use crate::retrieval::exact_top_k;
use crate::schema::EmbeddingMatrix;
use crate::store::{hash_settings, ContentHasher, StageKey, StageStore};

/// Corpus file names looked for in a dataset directory, in order.
pub const CORPUS_FILES: [&str; 3] = ["corpus.jsonl", "corpus.parquet", "corpus.tsv"];

/// Everything `distillery eval` needs, resolved.
#[derive(Debug, Clone)]
pub struct EvalSettings {
    pub embed: EmbedSettings,
    /// A BEIR dataset directory: corpus.jsonl, queries.jsonl, qrels/<split>.tsv.
    pub dataset: PathBuf,
    pub split: String,
    /// Where the stages are kept; a rerun with the same inputs recomputes nothing.
    pub run_dir: PathBuf,
    pub eval: EvalOptions,
    /// Threads for retrieval's top-k selection.
    pub threads: usize,
}

/// What `distillery eval` measured.
#[derive(Debug, Clone, Serialize)]
pub struct EvalOutcome {
    pub ndcg_at_10: Option<f64>,
    pub recall_at_100: Option<f64>,
    pub mrr_at_10: Option<f64>,
    /// Queries scored (judged and retrieved for).
    pub queries: usize,
    pub passages: usize,
    /// Passages embedded per second by this run; `None` when the embeddings were reused.
    pub passages_per_second: Option<f64>,
    pub model: String,
    pub tiny_model: bool,
    pub run_file: PathBuf,
    pub seconds: f64,
    /// Bad records skipped (with `--on-bad-record skip`) and where they were written.
    pub skipped_records: u64,
    pub quarantine: Option<PathBuf>,
    #[serde(skip)]
    pub report: EvalReport,
}

/// Settings that shape an embedding stage's output.
#[derive(Serialize)]
struct EmbedStageSettings<'a> {
    stage: &'a str,
    model: &'a str,
    max_seq_length: usize,
    prefix: &'a str,
    text: &'a str,
}

fn find_corpus(dataset: &Path) -> Result<PathBuf, EngineError> {
    CORPUS_FILES
        .iter()
        .map(|f| dataset.join(f))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            EngineError::Invalid(format!(
                "{}: no corpus file (looked for {})",
                dataset.display(),
                CORPUS_FILES.join(", ")
            ))
        })
}

/// Runs the evaluation.
pub fn run_eval(settings: &EvalSettings) -> Result<(EvalOutcome, ResolvedModel), EngineError> {
    let start = Instant::now();
    let corpus = find_corpus(&settings.dataset)?;
    let queries_path = settings.dataset.join("queries.jsonl");
    let qrels_path = settings
        .dataset
        .join("qrels")
        .join(format!("{}.tsv", settings.split));
    if !qrels_path.is_file() {
        return Err(EngineError::Invalid(format!(
            "{}: no qrels for split `{}`",
            qrels_path.display(),
            settings.split
        )));
    }
    let read = settings.embed.read_options()?;

    // Queries and judgements are small: read them whole, keep the judged queries.
    let mut queries: Vec<Query> = Vec::new();
    for q in open_queries(&queries_path, &read)? {
        queries.push(q?);
    }
    let known: HashSet<String> = queries.iter().map(|q| q.id.clone()).collect();
    let qrels = read_qrels(&qrels_path, &known, None, &read)?;
    queries.retain(|q| qrels.get(&q.id).is_some_and(|j| !j.is_empty()));

    let store = StageStore::open(&settings.run_dir)?;
    let (embedder, resolved) =
        settings
            .embed
            .load_embedder(&corpus, &read, &settings.run_dir.join("tiny-model"))?;
    let model_id = fingerprint(&resolved.dir)?;
    let stage = |name: &str, kind: TextKind, input_hash: String, total, label: &str| {
        let s = EmbedStageSettings {
            stage: name,
            model: &model_id,
            max_seq_length: embedder.max_seq_length(),
            prefix: embedder.prefix(kind),
            text: "title + \" \" + text",
        };
        Ok::<_, EngineError>(EmbedStage {
            stage: name.to_string(),
            key: StageKey {
                settings_hash: hash_settings(&s)?,
                input_hash,
            },
            kind,
            batcher: settings.embed.batcher(),
            workers: settings.embed.workers,
            chunk_rows: crate::dataflow::CHUNK_ROWS,
            total,
            label: label.to_string(),
            quiet: settings.embed.quiet,
        })
    };

    let passage_stage = stage(
        "passage-embeddings",
        TextKind::Passage,
        hash_file(&corpus)?,
        count_records(&corpus),
        "embed passages",
    )?;
    let passages = run_embed_stage(
        &store,
        embedder.clone(),
        passage_texts(&corpus, &read)?,
        &passage_stage,
    )?;

    let mut qh = ContentHasher::new();
    for q in &queries {
        qh.field(&q.id).field(&q.text);
    }
    let query_stage = stage(
        "query-embeddings",
        TextKind::Query,
        qh.finish(),
        Some(queries.len() as u64),
        "embed queries",
    )?;
    let query_source = queries
        .iter()
        .map(|q| Ok((q.id.clone(), q.text.clone())))
        .collect::<Vec<_>>()
        .into_iter();
    run_embed_stage(&store, embedder, Box::new(query_source), &query_stage)?;

    let p = read_matrix(&store, "passage-embeddings")?;
    let q = read_matrix(&store, "query-embeddings")?;
    let deepest = settings
        .eval
        .ndcg_at
        .iter()
        .chain(&settings.eval.recall_at)
        .chain(&settings.eval.mrr_at)
        .chain(&settings.eval.precision_at)
        .copied()
        .max()
        .unwrap_or(10);
    // One more than the deepest cutoff, so that dropping a query's own id (BEIR's
    // rule) still leaves enough results.
    let k = deepest + usize::from(settings.eval.ignore_identical_ids);
    let hits = exact_top_k(&q.values, &p.values, p.dim, k, settings.threads)?;
    let mut run: Run = BTreeMap::new();
    for (qi, list) in hits.into_iter().enumerate() {
        let qid = &q.ids[qi];
        let ranked: Vec<(String, f32)> = list
            .into_iter()
            .map(|h| (p.ids[h.passage as usize].clone(), h.score))
            .filter(|(pid, _)| !(settings.eval.ignore_identical_ids && pid == qid))
            .take(deepest)
            .collect();
        run.insert(qid.clone(), ranked);
    }
    let report =
        evaluate(&run, &qrels, &settings.eval).map_err(|e| EngineError::Invalid(e.to_string()))?;
    let run_file = settings
        .run_dir
        .join(format!("run.{}.trec", settings.split));
    write_run_file(&run_file, &run, "distillery")
        .map_err(|e| EngineError::Invalid(e.to_string()))?;

    let (skipped_records, quarantine) = quarantined(&read)?;
    let outcome = EvalOutcome {
        skipped_records,
        quarantine,
        ndcg_at_10: report.ndcg_at(10),
        recall_at_100: report.recall_at(100),
        mrr_at_10: report.mrr_at(10),
        queries: report.query_count(),
        passages: p.len(),
        passages_per_second: rate(&passages),
        model: resolved.dir.display().to_string(),
        tiny_model: resolved.origin == crate::model::ModelOrigin::Tiny,
        run_file,
        seconds: start.elapsed().as_secs_f64(),
        report,
    };
    Ok((outcome, resolved))
}

fn rate(r: &EmbedStageReport) -> Option<f64> {
    (!r.reused && r.seconds > 0.0).then(|| r.rows_embedded as f64 / r.seconds)
}

/// Reads an embeddings stage whole.
pub fn read_matrix(store: &StageStore, stage: &str) -> Result<EmbeddingMatrix, EngineError> {
    let mut m = EmbeddingMatrix::default();
    for batch in store.read(stage)? {
        m.extend_from_batch(&batch?)?;
    }
    Ok(m)
}
