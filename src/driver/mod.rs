//! `distillery run`: the whole recipe on one run directory, from a corpus to a
//! fine-tuned model evaluated against its base.
//!
//! The driver runs the parts in the recipe's order: generation, mining (every
//! retriever's embeddings, exact retrieval, the candidate funnel), labelling (teacher
//! scores, filters, normalisation, split), training, then evaluation of the base student
//! and the fine-tuned one on the same query sets: the generated queries of the held-out
//! passages (RECIPE.md's synthetic test set) and, with `[eval] dataset`, a BEIR split.
//! It ends with `run-summary.json` and `report.html` in the run directory.
//!
//! Contracts:
//! - **The same work as the stage commands.** Each part is the library function the
//!   stage command runs, over the same stage store: `run` writes the same examples and
//!   the same model bytes as `generate`, `mine`, `label` and `train` one by one, and
//!   after any of them it recomputes nothing they computed.
//! - **Resumable.** Every part keeps its results in the stage store (or the trainer's
//!   checkpoint); a killed run started again resumes where its parts left off.
//! - **Checked first.** Every input of every part is checked before the first starts
//!   ([`Pipeline::preflight`]).
//!
//! Generation and every retriever's passage embeddings run at the same time (the
//! passage index needs only the corpus); the later parts run one after another, each
//! starting when the one before it has finished. Every model of the run (the LLM, the
//! retrievers, the teachers, the student) runs its batches on its device's one
//! executor ([`crate::executor`]), so parts that overlap take turns on the device
//! rather than oversubscribe it. Streaming between the later parts (queries into
//! retrieval as they are generated, candidates into scoring chunk by chunk) is the
//! engine work that follows.

pub mod demo;
pub mod report;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use distillery_operators::{Embedder, EmbedderOptions};
use serde::Serialize;

use crate::config::{Pipeline, RunPart};
use crate::dataflow::read_device_journal;
use crate::error::EngineError;
use crate::eval::{EvalOptions, EvalReport};
use crate::generate::queries_table::GeneratedQuery;
use crate::jobs::eval::{evaluate_retrieval, read_beir, RetrievalEval};
use crate::jobs::generate::GenerateOutcome;
use crate::jobs::label::{label_with, LabelOutcome};
use crate::jobs::mine::{generate_and_index, mine_with, MineOutcome};
use crate::jobs::train::{train_with, TrainOutcome};
use crate::model::fingerprint;
use crate::record::{Qrels, Query};
use crate::store::hash_file;
use crate::store::StageStore;

/// The parts of a run, in order: generate, mine, label, train, evaluate.
const PARTS: usize = 5;

/// The summary `run` writes into the run directory.
pub const SUMMARY_FILE: &str = "run-summary.json";
/// The report `run` writes into the run directory.
pub const REPORT_FILE: &str = "report.html";

/// Wall time of one part of the run.
#[derive(Debug, Clone, Serialize)]
pub struct PartTime {
    pub part: String,
    pub seconds: f64,
}

/// nDCG@10, Recall@100 and MRR@10 of one model on one query set.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Metrics {
    pub ndcg_at_10: Option<f64>,
    pub recall_at_100: Option<f64>,
    pub mrr_at_10: Option<f64>,
}

impl Metrics {
    fn of(report: &EvalReport) -> Self {
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

/// What `run` did.
#[derive(Debug, Clone, Serialize)]
pub struct RunOutcome {
    /// Every device stage this invocation ran or served from its memo table, in order.
    pub device_stages: Vec<StageWork>,
    pub generate: Option<GenerateOutcome>,
    pub mine: MineOutcome,
    pub label: LabelOutcome,
    pub train: TrainOutcome,
    pub evaluations: Vec<Evaluation>,
    pub parts: Vec<PartTime>,
    pub seconds: f64,
    pub base_model: PathBuf,
    pub model: PathBuf,
    pub summary: PathBuf,
    pub report: PathBuf,
}

/// What one device stage did in a run: items run on the device, items taken from its
/// memo table (embedded by an earlier run), and its device's figures.
#[derive(Debug, Clone, Serialize)]
pub struct StageWork {
    pub stage: String,
    pub label: String,
    pub run: u64,
    pub memoised: u64,
    pub seconds: f64,
    pub busy_fraction: f64,
}

/// Runs the whole recipe of `pipeline` (see the module docs).
pub fn run_recipe(pipeline: &Pipeline) -> Result<RunOutcome, EngineError> {
    pipeline.preflight(RunPart::Evaluate)?;
    // The journal's records from here on are this invocation's.
    let journal_before = read_device_journal(&pipeline.run_dir).len();
    let start = Instant::now();
    let mut parts = Vec::new();
    let quiet = pipeline.quiet;
    // Says which part starts (the parts' own progress lines follow) and times it.
    let begin = |name: &str, index: usize| {
        if !quiet {
            eprintln!("run [{index}/{PARTS}] {name}");
        }
        Instant::now()
    };
    let mut timed = |name: &str, seconds: f64| {
        parts.push(PartTime {
            part: name.to_string(),
            seconds,
        })
    };

    // Generation and the passage index run at once (neither needs the other); mining
    // goes on from the passage index once generation is done.
    let t = begin("generate (and the passage index alongside)", 1);
    let generation_done = std::sync::Mutex::new(None);
    let (generate, indexes) = generate_and_index(pipeline, &|| {
        if let Ok(mut done) = generation_done.lock() {
            *done = Some(Instant::now());
        }
        if !quiet {
            eprintln!("run [2/{PARTS}] mine");
        }
    })?;
    let generated_at = generation_done
        .into_inner()
        .ok()
        .flatten()
        .unwrap_or_else(Instant::now);
    timed("generate", generated_at.duration_since(t).as_secs_f64());
    let mine = mine_with(pipeline, generate.as_ref(), indexes)?;
    timed("mine", generated_at.elapsed().as_secs_f64());
    let t = begin("label", 3);
    let label = label_with(pipeline, mine.clone())?;
    timed("label", t.elapsed().as_secs_f64());
    let t = begin("train", 4);
    let train = train_with(pipeline, label.clone(), None)?;
    timed("train", t.elapsed().as_secs_f64());

    let t = begin("evaluate", 5);
    let student = pipeline
        .student
        .as_ref()
        .ok_or_else(|| EngineError::Invalid("no [student]: preflight let it through".into()))?;
    let base_model = PathBuf::from(&student.model);
    let evaluations = evaluate_models(
        pipeline,
        generate.as_ref().map(|g| g.rows.as_slice()),
        &base_model,
        &train.model,
    )?;
    timed("evaluate", t.elapsed().as_secs_f64());

    let device_stages = read_device_journal(&pipeline.run_dir)
        .into_iter()
        .skip(journal_before)
        .map(|r| StageWork {
            busy_fraction: r.busy_fraction(),
            stage: r.stage,
            label: r.label,
            run: r.rows,
            memoised: r.memoised,
            seconds: r.seconds,
        })
        .collect();
    let outcome = RunOutcome {
        device_stages,
        generate,
        mine,
        label,
        train: train.clone(),
        evaluations,
        parts,
        seconds: start.elapsed().as_secs_f64(),
        base_model,
        model: train.model.clone(),
        summary: pipeline.run_dir.join(SUMMARY_FILE),
        report: pipeline.run_dir.join(REPORT_FILE),
    };
    let text = serde_json::to_string_pretty(&outcome)
        .map_err(|e| EngineError::Invalid(format!("run summary: {e}")))?;
    crate::store::write_file_atomically(&outcome.summary, (text + "\n").as_bytes())?;
    let html = report::render(pipeline, &outcome)?;
    crate::store::write_file_atomically(&outcome.report, html.as_bytes())?;
    Ok(outcome)
}

/// A query set to evaluate on: its name, corpus and judged queries.
struct QuerySet {
    name: String,
    label: String,
    corpus: PathBuf,
    queries: Vec<Query>,
    qrels: Qrels,
}

/// The held-out passages' generated queries, each judging its source passage relevant.
fn synthetic_set(rows: &[GeneratedQuery], corpus: &Path) -> QuerySet {
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
        queries,
        qrels,
    }
}

/// The base and the fine-tuned model on every query set of the run.
fn evaluate_models(
    pipeline: &Pipeline,
    generated: Option<&[GeneratedQuery]>,
    base: &Path,
    fine_tuned: &Path,
) -> Result<Vec<Evaluation>, EngineError> {
    let read = pipeline.retrievers[0].read_options()?;
    let mut sets = Vec::new();
    if let (true, Some(rows)) = (pipeline.eval.synthetic, generated) {
        let set = synthetic_set(rows, &pipeline.corpus);
        if !set.queries.is_empty() {
            sets.push(set);
        }
    }
    if let Some(dataset) = &pipeline.eval.dataset {
        let (corpus, queries, qrels) = read_beir(dataset, &pipeline.eval.split, &read)?;
        sets.push(QuerySet {
            name: format!("beir:{}:{}", dataset.display(), pipeline.eval.split),
            label: format!("beir {}", pipeline.eval.split),
            corpus,
            queries,
            qrels,
        });
    }
    let store = StageStore::open(&pipeline.run_dir)?;
    let student = pipeline.student.as_ref();
    // The student's prompts, as training used them, and the base model's maximum length
    // for both models: the export records the training's passage length, and a
    // comparison at two lengths would measure the truncation, not the training.
    let mut options = EmbedderOptions {
        max_seq_length: None,
        query_prefix: student.and_then(|s| s.query_prefix.clone()),
        passage_prefix: student.and_then(|s| s.passage_prefix.clone()),
    };
    let load = |dir: &Path, options: &EmbedderOptions| {
        let embedder = Embedder::load(dir, options, &pipeline.device)?;
        Ok::<_, EngineError>((Arc::new(embedder), fingerprint(dir)?))
    };
    let base = load(base, &options)?;
    options.max_seq_length = Some(base.0.max_seq_length());
    let models = [("base", base), ("fine-tuned", load(fine_tuned, &options)?)];
    let options = EvalOptions::default();
    let mut evaluations = Vec::new();
    for (index, set) in sets.iter().enumerate() {
        let corpus_hash = hash_file(&set.corpus)?;
        let mut metrics = Vec::new();
        let mut passages = 0;
        for (which, (embedder, model_fingerprint)) in &models {
            // Stage names are the engine's: the model's fingerprint and the set's place,
            // never a path or an id.
            let tag = format!("eval-{}", &model_fingerprint[..12]);
            let scores = evaluate_retrieval(&RetrievalEval {
                store: &store,
                embedder: embedder.clone(),
                model_fingerprint,
                corpus: &set.corpus,
                corpus_hash: &corpus_hash,
                read: &read,
                passages_stage: format!("{tag}-set{index}-passages"),
                queries_stage: format!("{tag}-set{index}-queries"),
                queries: &set.queries,
                qrels: &set.qrels,
                batcher: pipeline.batcher(),
                workers: pipeline.workers,
                threads: pipeline.threads,
                quiet: pipeline.quiet,
                options: &options,
                label: &format!("evaluate {which} on {}", set.name),
            })?;
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
        let set = synthetic_set(&rows, Path::new("c.jsonl"));
        let ids: Vec<&str> = set.queries.iter().map(|q| q.id.as_str()).collect();
        assert_eq!(ids, ["a#title", "a#claim"]);
        assert_eq!(set.qrels["a#claim"].get("a"), Some(&1));
        assert!(!set.qrels.contains_key("b#title"));
    }
}
