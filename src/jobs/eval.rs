//! `distillery eval`: embed a BEIR dataset's corpus and test queries, retrieve exactly,
//! and score the ranking with trec_eval's semantics.
//!
//! Stages (each reused when its key is unchanged): `passage-embeddings`,
//! `query-embeddings`; then exact top-k, the metrics, and a TREC run file: the
//! evaluation stage of `distillery run` ([`evaluate_retrieval`]) on a BEIR dataset alone.

use std::path::PathBuf;
use std::time::Instant;

use serde::Serialize;

use crate::config::EmbedSettings;
use crate::corpus::quarantined;
use crate::dataflow::evaluate::{evaluate_retrieval, read_beir, QuerySet, RetrievalEval};
use crate::dataflow::teacher_check::check_set;
use crate::dataflow::EmbedStageReport;
use crate::error::EngineError;
use crate::eval::{write_run_file, EvalOptions, EvalReport};
use crate::model::{fingerprint, ResolvedModel};
use crate::store::hash_file;
use crate::store::StageStore;

/// Everything `distillery eval` needs, resolved.
#[derive(Debug, Clone)]
pub struct EvalSettings {
    pub embed: EmbedSettings,
    /// A BEIR dataset directory: corpus.jsonl, queries.jsonl, `qrels/<split>.tsv`.
    pub dataset: PathBuf,
    pub split: String,
    /// Where the stages are kept; a rerun with the same inputs recomputes nothing.
    pub run_dir: PathBuf,
    pub eval: EvalOptions,
    /// Threads for retrieval's top-k selection.
    pub threads: usize,
    /// With `--teachers CONFIG`: that pipeline's teachers rerank each query's top 100
    /// (the teacher check), their caches kept in this run directory.
    pub teachers: Option<crate::config::Pipeline>,
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
    /// The teachers' reranking of the top 100, with `--teachers`.
    pub teachers: Option<crate::dataflow::evaluate::Metrics>,
    #[serde(skip)]
    pub report: EvalReport,
}

/// Runs the evaluation.
pub fn run_eval(settings: &EvalSettings) -> Result<(EvalOutcome, ResolvedModel), EngineError> {
    let start = Instant::now();
    let read = settings.embed.read_options()?;
    let (corpus, queries, qrels) = read_beir(&settings.dataset, &settings.split, &read)?;
    let store = StageStore::open(&settings.run_dir)?;
    let (embedder, resolved) =
        settings
            .embed
            .load_embedder(&corpus, &read, &settings.run_dir.join("tiny-model"))?;
    let model_id = fingerprint(&resolved.dir)?;
    let corpus_hash = hash_file(&corpus)?;
    let scores = evaluate_retrieval(&RetrievalEval {
        store: &store,
        embedder,
        model_fingerprint: &model_id,
        corpus: &corpus,
        corpus_hash: &corpus_hash,
        read: &read,
        passages_stage: "passage-embeddings".into(),
        queries_stage: "query-embeddings".into(),
        queries: &queries,
        qrels: &qrels,
        batcher: settings.embed.batcher(),
        workers: settings.embed.workers,
        cluster: Default::default(),
        sharing: Default::default(),
        threads: settings.threads,
        quiet: settings.embed.quiet,
        options: &settings.eval,
        label: "eval",
    })?;
    let teachers = match &settings.teachers {
        Some(pipeline) => {
            let set = QuerySet {
                name: format!("beir:{}:{}", settings.dataset.display(), settings.split),
                label: format!("beir {}", settings.split),
                corpus: corpus.clone(),
                corpus_hash: corpus_hash.clone(),
                queries,
                qrels,
            };
            Some(check_set(pipeline, &store, &set, &scores)?.teachers)
        }
        None => None,
    };
    let run_file = settings
        .run_dir
        .join(format!("run.{}.trec", settings.split));
    write_run_file(&run_file, &scores.run, "distillery")
        .map_err(|e| EngineError::Invalid(e.to_string()))?;

    let (skipped_records, quarantine) = quarantined(&read)?;
    let report = scores.report;
    let outcome = EvalOutcome {
        skipped_records,
        quarantine,
        ndcg_at_10: report.ndcg_at(10),
        recall_at_100: report.recall_at(100),
        mrr_at_10: report.mrr_at(10),
        queries: report.query_count(),
        passages: scores.passages,
        passages_per_second: rate(&scores.passage_stage),
        model: resolved.dir.display().to_string(),
        tiny_model: resolved.origin == crate::model::ModelOrigin::Tiny,
        run_file,
        seconds: start.elapsed().as_secs_f64(),
        teachers,
        report,
    };
    Ok((outcome, resolved))
}

fn rate(r: &EmbedStageReport) -> Option<f64> {
    (!r.reused && r.seconds > 0.0).then(|| r.rows_embedded as f64 / r.seconds)
}
