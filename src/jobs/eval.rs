//! `distillery eval`: embed a BEIR dataset's corpus and test queries, retrieve exactly,
//! and score the ranking with trec_eval's semantics.
//!
//! Stages (each reused when its key is unchanged): `passage-embeddings`,
//! `query-embeddings`; then exact top-k in memory, the metrics, and a TREC run file.
//! [`evaluate_retrieval`] is the same evaluation for any model and query set, as
//! `distillery run` uses it; its stages share the embedding key of every other stage
//! ([`crate::jobs::embedding_settings_hash`]), so it reads a retriever's passages when
//! the model and settings are the same.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use distillery_operators::{Embedder, TextKind, TokenBudgetBatcher};
use serde::Serialize;

use crate::config::EmbedSettings;
use crate::corpus::quarantined;
use crate::corpus::{open_queries, read_qrels, ReadOptions, CORPUS_FILES};
use crate::dataflow::{run_embed_stage, EmbedStage, EmbedStageReport};
use crate::error::EngineError;
use crate::eval::{evaluate, write_run_file, EvalOptions, EvalReport, Run};
use crate::jobs::{count_records, embedding_settings_hash, passage_texts};
use crate::model::{fingerprint, ResolvedModel};
use crate::record::{Qrels, Query};
use crate::schema::EmbeddingMatrix;
use crate::store::hash_file;
use crate::store::{ContentHasher, StageKey, StageStore};

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

/// A BEIR dataset's corpus, and its judged queries of one split (queries without a
/// judgement are left out: they cannot be scored).
pub fn read_beir(
    dataset: &Path,
    split: &str,
    read: &ReadOptions,
) -> Result<(PathBuf, Vec<Query>, Qrels), EngineError> {
    let corpus = find_corpus(dataset)?;
    let queries_path = dataset.join("queries.jsonl");
    let qrels_path = dataset.join("qrels").join(format!("{split}.tsv"));
    if !qrels_path.is_file() {
        return Err(EngineError::Invalid(format!(
            "{}: no qrels for split `{split}`",
            qrels_path.display()
        )));
    }
    // Queries and judgements are small: read them whole, keep the judged queries.
    let mut queries: Vec<Query> = Vec::new();
    for q in open_queries(&queries_path, read)? {
        queries.push(q?);
    }
    let known: HashSet<String> = queries.iter().map(|q| q.id.clone()).collect();
    let qrels = read_qrels(&qrels_path, &known, None, read)?;
    queries.retain(|q| qrels.get(&q.id).is_some_and(|j| !j.is_empty()));
    Ok((corpus, queries, qrels))
}

/// One model's exact retrieval over a corpus for one set of judged queries.
pub struct RetrievalEval<'a> {
    pub store: &'a StageStore,
    pub embedder: Arc<Embedder>,
    /// [`fingerprint`] of the model's directory.
    pub model_fingerprint: &'a str,
    pub corpus: &'a Path,
    /// [`hash_file`] of the corpus.
    pub corpus_hash: &'a str,
    pub read: &'a ReadOptions,
    /// The stage names of the passage and query embeddings, when computed here. A
    /// complete stage of the run with the same key (the retrievers' passages, for the
    /// same model and settings) is read instead.
    pub passages_stage: String,
    pub queries_stage: String,
    pub queries: &'a [Query],
    pub qrels: &'a Qrels,
    pub batcher: TokenBudgetBatcher,
    pub workers: usize,
    /// Threads for the top-k selection.
    pub threads: usize,
    pub quiet: bool,
    pub options: &'a EvalOptions,
    /// Progress labels start with this.
    pub label: &'a str,
}

/// What [`evaluate_retrieval`] measured.
#[derive(Debug, Clone)]
pub struct RetrievalScores {
    pub report: EvalReport,
    pub run: Run,
    pub passages: usize,
    /// The passage embedding stage (reused, or run now).
    pub passage_stage: EmbedStageReport,
}

/// Embeds the corpus and the queries (each stage reused when complete under its key,
/// under any name), retrieves exactly and scores the ranking with trec_eval's rules.
pub fn evaluate_retrieval(e: &RetrievalEval<'_>) -> Result<RetrievalScores, EngineError> {
    let stage = |name: &str, kind: TextKind, input_hash: String, total, label: String| {
        Ok::<_, EngineError>(EmbedStage {
            stage: name.to_string(),
            key: StageKey {
                settings_hash: embedding_settings_hash(&e.embedder, e.model_fingerprint, kind)?,
                input_hash,
            },
            kind,
            batcher: e.batcher,
            workers: e.workers,
            chunk_rows: crate::dataflow::CHUNK_ROWS,
            total,
            label,
            quiet: e.quiet,
        })
    };
    let passage_stage = stage(
        &e.passages_stage,
        TextKind::Passage,
        e.corpus_hash.to_string(),
        count_records(e.corpus),
        format!("{}: embed passages", e.label),
    )?;
    let passages = run_embed_stage(
        e.store,
        e.embedder.clone(),
        passage_texts(e.corpus, e.read)?,
        &passage_stage,
    )?;

    let mut qh = ContentHasher::new();
    for q in e.queries {
        qh.field(&q.id).field(&q.text);
    }
    let query_stage = stage(
        &e.queries_stage,
        TextKind::Query,
        qh.finish(),
        Some(e.queries.len() as u64),
        format!("{}: embed queries", e.label),
    )?;
    let query_source: Vec<_> = e
        .queries
        .iter()
        .map(|q| Ok((q.id.clone(), q.text.clone())))
        .collect();
    let queries = run_embed_stage(
        e.store,
        e.embedder.clone(),
        Box::new(query_source.into_iter()),
        &query_stage,
    )?;

    let q = read_matrix(e.store, &queries.completed.stage)?;
    let deepest = e
        .options
        .ndcg_at
        .iter()
        .chain(&e.options.recall_at)
        .chain(&e.options.mrr_at)
        .chain(&e.options.precision_at)
        .copied()
        .max()
        .unwrap_or(10);
    // One more than the deepest cutoff, so that dropping a query's own id (BEIR's
    // rule) still leaves enough results.
    let k = deepest + usize::from(e.options.ignore_identical_ids);
    let (passage_ids, hits) = top_k_over_stage(
        e.store,
        &passages.completed.stage,
        &q.values,
        q.dim,
        k,
        e.threads,
    )?;
    let mut run: Run = BTreeMap::new();
    for (qi, list) in hits.into_iter().enumerate() {
        let qid = &q.ids[qi];
        let ranked: Vec<(String, f32)> = list
            .into_iter()
            .map(|h| (passage_ids[h.passage as usize].clone(), h.score))
            .filter(|(pid, _)| !(e.options.ignore_identical_ids && pid == qid))
            .take(deepest)
            .collect();
        run.insert(qid.clone(), ranked);
    }
    let report =
        evaluate(&run, e.qrels, e.options).map_err(|err| EngineError::Invalid(err.to_string()))?;
    Ok(RetrievalScores {
        report,
        run,
        passages: passage_ids.len(),
        passage_stage: passages,
    })
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
        threads: settings.threads,
        quiet: settings.embed.quiet,
        options: &settings.eval,
        label: "eval",
    })?;
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
        report,
    };
    Ok((outcome, resolved))
}

/// Exact top-`k` of `queries` (`n x dim`) over the passages of an embedding stage, read
/// from the store part by part (never the whole matrix); returns the passage ids in
/// stage order, which the hits' positions index.
pub fn top_k_over_stage(
    store: &StageStore,
    stage: &str,
    queries: &[f32],
    dim: usize,
    k: usize,
    threads: usize,
) -> Result<(Vec<String>, Vec<Vec<crate::retrieval::Hit>>), EngineError> {
    let mut top = crate::retrieval::TopK::new(queries, dim, k, threads);
    let mut ids = Vec::new();
    for batch in store.read(stage)? {
        let mut part = EmbeddingMatrix::default();
        part.extend_from_batch(&batch?)?;
        if part.dim != dim && !part.is_empty() {
            return Err(EngineError::Invalid(format!(
                "stage {stage}: {}-dimensional passages against {dim}-dimensional queries",
                part.dim
            )));
        }
        top.push(&part.values)?;
        ids.extend(part.ids);
    }
    Ok((ids, top.finish()?))
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
