//! Evaluation: a model's exact retrieval over a corpus for a set of judged queries,
//! scored with trec_eval's semantics, and the run's last stage, the base and the
//! fine-tuned student side by side on every query set of the run.
//!
//! The embedding stages share the embedding key of every other stage
//! ([`super::embedding_key`]), so an evaluation reads a retriever's passages when the
//! model and settings are the same.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use distillery_operators::{Embedder, EmbedderOptions, TextKind, TokenBudgetBatcher};
use serde::Serialize;

use crate::config::cluster::Sharing;
use crate::config::Pipeline;
use crate::corpus::{count_records, open_queries, read_qrels, ReadOptions, CORPUS_FILES};
use crate::dataflow::embedding_key::embedding_settings_hash;
use crate::dataflow::shared_top_k::TopKOver;
use crate::dataflow::{passage_texts, run_embed_stage, EmbedStage, EmbedStageReport};
use crate::error::EngineError;
use crate::eval::{evaluate, EvalOptions, EvalReport, Run};
use crate::generate::queries_table::GeneratedQuery;
use crate::model::fingerprint;
use crate::record::{Qrels, Query};
use crate::schema::EmbeddingMatrix;
use crate::store::hash_file;
use crate::store::{CompletedStage, ContentHasher, StageKey, StageStore};

/// nDCG@10, Recall@100 and MRR@10 of one model on one query set.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Metrics {
    pub ndcg_at_10: Option<f64>,
    pub recall_at_100: Option<f64>,
    pub mrr_at_10: Option<f64>,
}

impl Metrics {
    pub(crate) fn of(report: &EvalReport) -> Self {
        Self {
            ndcg_at_10: report.ndcg_at(10),
            recall_at_100: report.recall_at(100),
            mrr_at_10: report.mrr_at(10),
        }
    }
}

/// The base and the fine-tuned student on one query set.
#[derive(Debug, Clone, Serialize)]
pub struct Evaluation {
    /// `synthetic` (the held-out passages' generated queries) or `beir:<dir>:<split>`.
    pub set: String,
    /// A short name of the set for plots: `synthetic`, `beir <split>`.
    pub label: String,
    pub queries: usize,
    pub passages: usize,
    pub base: Metrics,
    pub fine_tuned: Metrics,
}

/// The corpus file of a BEIR dataset directory.
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
    /// The processes its embedding stages run over.
    pub cluster: crate::config::cluster::Cluster,
    /// How its retrieval is shared among them.
    pub sharing: Sharing,
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
                settings_hash: embedding_settings_hash(&e.embedder, kind)?,
                input_hash,
            },
            kind,
            batcher: e.batcher,
            workers: e.workers,
            cluster: e.cluster.clone(),
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
        &passages.completed,
        &q.values,
        (q.dim, k),
        e.threads,
        &e.sharing,
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

/// Exact top-`k` of `queries` (`n x dim`) over the passages of an embedding stage, read
/// from the store part by part (never the whole matrix), the product shared as
/// `sharing` says; returns the passage ids in
/// stage order, which the hits' positions index.
pub fn top_k_over_stage(
    store: &StageStore,
    passages: &CompletedStage,
    queries: &[f32],
    (dim, k): (usize, usize),
    threads: usize,
    sharing: &Sharing,
) -> Result<(Vec<String>, Vec<Vec<crate::retrieval::Hit>>), EngineError> {
    let stage = &passages.stage;
    let mut top = TopKOver::open(
        sharing,
        queries,
        (dim, k),
        passages.rows() as usize,
        threads,
    )?;
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

/// Reads an embeddings stage whole.
pub fn read_matrix(store: &StageStore, stage: &str) -> Result<EmbeddingMatrix, EngineError> {
    let mut m = EmbeddingMatrix::default();
    for batch in store.read(stage)? {
        m.extend_from_batch(&batch?)?;
    }
    Ok(m)
}

/// A query set to evaluate on: its name, corpus and judged queries.
pub(crate) struct QuerySet {
    pub name: String,
    pub label: String,
    pub corpus: PathBuf,
    /// [`hash_file`] of the corpus, taken once for every model evaluated on the set.
    pub corpus_hash: String,
    pub queries: Vec<Query>,
    pub qrels: Qrels,
}

/// The held-out passages' generated queries, each judging its source passage relevant.
fn synthetic_set(rows: &[GeneratedQuery], corpus: &Path, corpus_hash: String) -> QuerySet {
    let mut queries = Vec::new();
    let mut qrels = Qrels::new();
    for g in rows.iter().filter(|g| g.held_out) {
        queries.push(Query {
            id: g.query_id.clone(),
            text: g.query_text.clone(),
        });
        qrels
            .entry(g.query_id.clone())
            .or_default()
            .insert(g.source_id.clone(), 1);
    }
    QuerySet {
        name: "synthetic".into(),
        label: "synthetic".into(),
        corpus: corpus.to_path_buf(),
        corpus_hash,
        queries,
        qrels,
    }
}

/// Every query set of the run: the synthetic one (the held-out passages' generated
/// queries, with `[eval] synthetic`) and `[eval] dataset`'s split.
pub(crate) fn query_sets(
    pipeline: &Pipeline,
    generated: Option<&[GeneratedQuery]>,
) -> Result<Vec<QuerySet>, EngineError> {
    let read = pipeline.retrievers[0].read_options()?;
    let mut sets = Vec::new();
    if let (true, Some(rows)) = (pipeline.eval.synthetic, generated) {
        let set = synthetic_set(rows, &pipeline.corpus, hash_file(&pipeline.corpus)?);
        if !set.queries.is_empty() {
            sets.push(set);
        }
    }
    if let Some(dataset) = &pipeline.eval.dataset {
        let (corpus, queries, qrels) = read_beir(dataset, &pipeline.eval.split, &read)?;
        sets.push(QuerySet {
            name: format!("beir:{}:{}", dataset.display(), pipeline.eval.split),
            label: format!("beir {}", pipeline.eval.split),
            corpus_hash: hash_file(&corpus)?,
            corpus,
            queries,
            qrels,
        });
    }
    Ok(sets)
}

/// A student model to evaluate: its name (`base`, `fine-tuned`), embedder and
/// fingerprint.
pub(crate) type StudentModel = (&'static str, Arc<Embedder>, String);

/// The base student and, when given, the fine-tuned one, with the student's prompts as
/// training used them and the base model's maximum length for both: the export records
/// the training's passage length, and a comparison at two lengths would measure the
/// truncation, not the training.
pub(crate) fn student_models(
    pipeline: &Pipeline,
    base: &Path,
    fine_tuned: Option<&Path>,
) -> Result<Vec<StudentModel>, EngineError> {
    let student = pipeline.student.as_ref();
    let mut options = EmbedderOptions {
        max_seq_length: None,
        query_prefix: student.and_then(|s| s.query_prefix.clone()),
        passage_prefix: student.and_then(|s| s.passage_prefix.clone()),
    };
    let load = |dir: &Path, options: &EmbedderOptions| {
        let embedder = Embedder::load(dir, options, &pipeline.device)?;
        Ok::<_, EngineError>((Arc::new(embedder), fingerprint(dir)?))
    };
    let (embedder, print) = load(base, &options)?;
    options.max_seq_length = Some(embedder.max_seq_length());
    let mut models = vec![("base", embedder, print)];
    if let Some(dir) = fine_tuned {
        let (embedder, print) = load(dir, &options)?;
        models.push(("fine-tuned", embedder, print));
    }
    Ok(models)
}

/// `model`'s exact retrieval over query set number `index` of the run, scored; its
/// stages are named by the model's fingerprint and the set's place (never a path or an
/// id), so the teacher check and the evaluation share them.
pub(crate) fn retrieve_set(
    pipeline: &Pipeline,
    store: &StageStore,
    set: &QuerySet,
    index: usize,
    model: &StudentModel,
) -> Result<RetrievalScores, EngineError> {
    let read = pipeline.retrievers[0].read_options()?;
    let (which, embedder, model_fingerprint) = model;
    let tag = format!("eval-{}", &model_fingerprint[..12]);
    evaluate_retrieval(&RetrievalEval {
        store,
        embedder: embedder.clone(),
        model_fingerprint,
        corpus: &set.corpus,
        corpus_hash: &set.corpus_hash,
        read: &read,
        passages_stage: format!("{tag}-set{index}-passages"),
        queries_stage: format!("{tag}-set{index}-queries"),
        queries: &set.queries,
        qrels: &set.qrels,
        batcher: pipeline.batcher(),
        workers: pipeline.workers,
        cluster: pipeline.cluster.clone(),
        sharing: pipeline.sharing(),
        threads: pipeline.threads,
        quiet: pipeline.quiet,
        options: &EvalOptions::default(),
        label: &format!("evaluate {which} on {}", set.name),
    })
}

/// The base and the fine-tuned model on every query set of the run.
pub fn evaluate_models(
    pipeline: &Pipeline,
    generated: Option<&[GeneratedQuery]>,
    base: &Path,
    fine_tuned: &Path,
) -> Result<Vec<Evaluation>, EngineError> {
    let sets = query_sets(pipeline, generated)?;
    let store = StageStore::open(&pipeline.run_dir)?;
    let models = student_models(pipeline, base, Some(fine_tuned))?;
    let mut evaluations = Vec::new();
    for (index, set) in sets.iter().enumerate() {
        let mut metrics = Vec::new();
        let mut passages = 0;
        for model in &models {
            let scores = retrieve_set(pipeline, &store, set, index, model)?;
            passages = scores.passages;
            metrics.push(Metrics::of(&scores.report));
        }
        evaluations.push(Evaluation {
            set: set.name.clone(),
            label: set.label.clone(),
            queries: set.queries.len(),
            passages,
            base: metrics[0],
            fine_tuned: metrics[1],
        });
    }
    Ok(evaluations)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_synthetic_set_is_the_held_out_queries_judging_their_source() {
        let row = |id: &str, source: &str, held_out| GeneratedQuery {
            query_id: id.into(),
            query_text: format!("text of {id}"),
            query_type: "title".into(),
            source_id: source.into(),
            held_out,
        };
        let rows = [
            row("a#title", "a", true),
            row("b#title", "b", false),
            row("a#claim", "a", true),
        ];
        let set = synthetic_set(&rows, Path::new("c.jsonl"), "h".into());
        let ids: Vec<&str> = set.queries.iter().map(|q| q.id.as_str()).collect();
        assert_eq!(ids, ["a#title", "a#claim"]);
        assert_eq!(set.qrels["a#claim"].get("a"), Some(&1));
        assert!(!set.qrels.contains_key("b#title"));
    }
}
