//! The engine's stage operators, one per file, and the timely dataflow that runs the
//! device stages. The recipe's stages, in the order [`crate::driver`] chains them:
//! [`generate`] (queries for the corpus) beside [`passage_index`] (every retriever's
//! passage embeddings), then [`candidates`] (query embeddings, [`retrieve`], the
//! candidate funnel), [`label`] (teacher scores, the teacher funnel, the examples),
//! [`teacher_check`] (do the teachers rank better than the base student?), [`train`] and
//! [`evaluate`]. Each reads its inputs' stages and resolved settings and is
//! keyed in the stage store: reused when complete under its key, resumed when begun.
//!
//! A device stage (embedding texts, scoring pairs) is `input -> InferOnDevice ->
//! WriteParts`:
//! - worker 0 reads the items and feeds them in chunks of [`CHUNK_ROWS`], one timestamp
//!   per chunk; it stops reading while more than [`MAX_CHUNKS_IN_FLIGHT`] chunks are
//!   unfinished (the probe says which), so memory stays bounded however large the input;
//! - `InferOnDevice` ([`infer_op`]) on every worker tokenises, batches by token budget
//!   and hands batches to its device's executor (one per device, shared by every stage)
//!   over the stage's own bounded queue;
//! - `WriteParts` ([`write_parts()`]) commits each finished chunk as one Parquet part.
//!
//! A stage already complete under its key, under its own name or another stage's, is not
//! run again (the report's `completed.stage` names where its rows are); a stage begun
//! under its key resumes after its committed rows. An embedding stage goes through its
//! memo table ([`memo_embed`]): only texts never embedded under its settings run, and
//! a killed one resumes from the memo's committed parts.
//!
//! Every generation records its corpus version, and [`corpus_change`] computes what a
//! changed corpus touches (the change plan) in differential dataflow, from the
//! difference between the last finished version and this one.
//!
//! Retrieval ([`retrieve`]) keeps each query's top-k in the store beside the passage
//! list it counts positions in, so a rerun over changed passages repairs those lists
//! (the changed passages scored against every query, lists that lost a passage
//! retrieved again) instead of scoring every query against every passage.

pub mod candidates;
pub mod cluster;
pub mod corpus_change;
pub mod embedding_key;
pub mod evaluate;
pub mod follower;
pub mod generate;
pub mod infer_op;
pub mod label;
pub mod memo_embed;
pub mod passage_index;
pub mod retrieve;
pub mod rounds;
pub mod score_ahead;
pub mod shared_top_k;
pub mod teacher_check;
pub mod train;
pub mod write_parts;

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arrow::datatypes::SchemaRef;
use distillery_operators::{Embedder, TextKind, TokenBudgetBatcher};
use timely::dataflow::operators::Probe;
use timely::dataflow::{InputHandleVec, ProbeHandle};

use crate::config::cluster::Cluster;
use crate::corpus::{open_passages, ReadOptions};
use crate::error::EngineError;
use crate::executor::{DeviceExecutor, DeviceModel, ExecutorStats};
use crate::progress::Progress;
use crate::store::{CompletedStage, StageKey, StageStore};
use infer_op::{infer_on_device, InferConfig, InputRecord};
use write_parts::{write_parts, BatchBuilder, SharedWriter};

/// Texts per timestamp and per Parquet part: large enough that sorting by length inside a
/// chunk leaves little padding, small enough that a killed run loses little work.
pub const CHUNK_ROWS: usize = 2048;

/// Chunks fed but not yet written before the reader waits: enough to keep every worker
/// and the device busy, few enough to bound memory to a few chunks of text.
pub const MAX_CHUNKS_IN_FLIGHT: u64 = 3;

/// A stream of `(id, item)` pairs, read lazily.
pub type ItemSource<I> = Box<dyn Iterator<Item = Result<(String, I), EngineError>> + Send>;
/// A stream of `(id, text)` pairs, read lazily.
pub type TextSource = ItemSource<String>;

/// Passages of `path` as `(id, title + " " + text)`, streamed.
pub fn passage_texts(
    path: &std::path::Path,
    opts: &ReadOptions,
) -> Result<TextSource, EngineError> {
    let reader = open_passages(path, opts)?;
    Ok(Box::new(reader.map(|r| {
        r.map(|p| {
            let text = p.embedding_text();
            (p.id, text)
        })
        .map_err(EngineError::from)
    })))
}

/// The texts (`title + " " + text`) of the passages of `path` whose ids are in
/// `wanted`, by id, in one streamed pass: the stages that need some passages' texts
/// (labelling, training, the teacher check) never hold the whole corpus.
pub fn passage_texts_of(
    path: &std::path::Path,
    opts: &ReadOptions,
    wanted: &std::collections::HashSet<&str>,
) -> Result<std::collections::HashMap<String, String>, EngineError> {
    let mut texts = std::collections::HashMap::new();
    for item in passage_texts(path, opts)? {
        let (id, text) = item?;
        if wanted.contains(id.as_str()) {
            texts.insert(id, text);
        }
    }
    Ok(texts)
}

/// What a device stage writes: its schema and how rows of floats become a batch.
#[derive(Clone)]
pub struct StageOutput {
    pub schema: SchemaRef,
    pub to_batch: BatchBuilder,
}

/// One embedding stage to run.
#[derive(Debug, Clone)]
pub struct EmbedStage {
    /// The stage's name in the store.
    pub stage: String,
    /// Settings and input hashes: the stage is reused only under the same key.
    pub key: StageKey,
    pub kind: TextKind,
    pub batcher: TokenBudgetBatcher,
    /// Timely worker threads (tokenisation and batching run on them), per process.
    pub workers: usize,
    /// The processes the stage runs over ([`cluster`]); one by default.
    pub cluster: Cluster,
    /// Texts per chunk (timestamp) and per Parquet part; [`CHUNK_ROWS`] unless a test
    /// wants many small parts. A resumed stage must use the value it began with.
    pub chunk_rows: usize,
    /// Texts in the input, when known, for the ETA.
    pub total: Option<u64>,
    /// Label of the progress report.
    pub label: String,
    pub quiet: bool,
}

/// The run's journal of device stages, one [`DeviceStageRecord`] a line.
pub const DEVICE_JOURNAL: &str = "device-stages.jsonl";

/// What one run of a device stage did, as the journal keeps it: what the report draws.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DeviceStageRecord {
    pub stage: String,
    pub label: String,
    /// Items run by this invocation (a resumed stage counts only its own).
    pub rows: u64,
    /// Items an embedding stage took from its memo table instead of the device.
    #[serde(default)]
    pub memoised: u64,
    pub batches: u64,
    /// Wall time of the stage's dataflow.
    pub seconds: f64,
    /// Time the device spent running its batches.
    pub busy_seconds: f64,
    pub real_tokens: u64,
    pub padded_tokens: u64,
    /// `(seconds, jobs waiting)` as each batch started.
    pub queue_depth: Vec<(f32, u8)>,
    /// The queue's bound ([`crate::executor::DEVICE_QUEUE_DEPTH`]).
    pub queue_capacity: usize,
}

impl DeviceStageRecord {
    /// Items a second over the stage's wall time.
    pub fn rows_per_second(&self) -> f64 {
        if self.seconds > 0.0 {
            self.rows as f64 / self.seconds
        } else {
            0.0
        }
    }

    /// The share of the wall time the device was busy.
    pub fn busy_fraction(&self) -> f64 {
        if self.seconds > 0.0 {
            (self.busy_seconds / self.seconds).min(1.0)
        } else {
            0.0
        }
    }
}

/// Every record of a run's journal, in order (a line a kill cut short is skipped).
pub fn read_device_journal(run_dir: &std::path::Path) -> Vec<DeviceStageRecord> {
    std::fs::read_to_string(run_dir.join(DEVICE_JOURNAL))
        .map(|text| {
            text.lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Appends what one stage did on its device to the run's journal ([`DEVICE_JOURNAL`]):
/// `(run, memoised)` items (run on the device in `seconds` of wall time, taken from a
/// memo table), with its executor queue's figures.
pub fn journal_device_stage(
    store: &StageStore,
    stage: &str,
    label: &str,
    (rows, memoised): (u64, u64),
    seconds: f64,
    stats: &ExecutorStats,
) -> Result<(), EngineError> {
    let record = DeviceStageRecord {
        stage: stage.to_string(),
        label: label.to_string(),
        rows,
        memoised,
        batches: stats.batches,
        seconds,
        busy_seconds: stats.busy.as_secs_f64(),
        real_tokens: stats.real_tokens,
        padded_tokens: stats.padded_tokens,
        queue_depth: stats.queue_depth.clone(),
        queue_capacity: crate::executor::DEVICE_QUEUE_DEPTH,
    };
    let line = serde_json::to_string(&record)
        .map_err(|e| EngineError::Dataflow(format!("device journal: {e}")))?;
    store.append_journal(DEVICE_JOURNAL, &line)?;
    Ok(())
}

/// What running (or reusing) an embedding stage did.
#[derive(Debug, Clone)]
pub struct EmbedStageReport {
    pub completed: CompletedStage,
    /// True when the stage was already complete and nothing ran.
    pub reused: bool,
    /// Rows embedded by this run (a resumed run counts only its own).
    pub rows_embedded: u64,
    /// Rows taken from the memo table instead of the device (embedding stages).
    pub rows_memoised: u64,
    /// Wall time of the dataflow, model loading excluded.
    pub seconds: f64,
    pub executor: ExecutorStats,
}

impl EmbedStageReport {
    fn reused(completed: CompletedStage) -> Self {
        EmbedStageReport {
            completed,
            reused: true,
            rows_embedded: 0,
            rows_memoised: 0,
            seconds: 0.0,
            executor: ExecutorStats::default(),
        }
    }
}

/// Runs (or reuses, or resumes) an embedding stage: `id`, `embedding` rows, in input
/// order; only texts its memo table lacks are embedded ([`memo_embed`]).
pub fn run_embed_stage(
    store: &StageStore,
    embedder: Arc<Embedder>,
    source: TextSource,
    stage: &EmbedStage,
) -> Result<EmbedStageReport, EngineError> {
    if let Some(completed) = complete_under_key(store, stage)? {
        return Ok(EmbedStageReport::reused(completed));
    }
    memo_embed::run(store, embedder, source, stage)
}

/// Runs (or reuses, or resumes) a device stage of any model: each item becomes one
/// output row, written in input order.
pub fn run_device_stage<M: DeviceModel>(
    store: &StageStore,
    model: Arc<M>,
    source: ItemSource<M::Item>,
    stage: &EmbedStage,
    output: StageOutput,
) -> Result<EmbedStageReport, EngineError> {
    if let Some(completed) = complete_under_key(store, stage)? {
        return Ok(EmbedStageReport::reused(completed));
    }
    let ran = run_dataflow(store, model, source, stage, output, Writing::WholeStage)?;
    journal_device_stage(
        store,
        &stage.stage,
        &stage.label,
        (ran.rows, 0),
        ran.seconds,
        &ran.executor,
    )?;
    let completed = ran
        .completed
        .ok_or_else(|| EngineError::Dataflow("the stage was not finished; this is a bug".into()))?;
    Ok(EmbedStageReport {
        completed,
        reused: false,
        rows_embedded: ran.rows,
        rows_memoised: 0,
        seconds: ran.seconds,
        executor: ran.executor,
    })
}

/// The stage complete under `stage`'s key, under its own name or any other (equal keys
/// hold the same rows): callers read the rows from `completed.stage`.
fn complete_under_key(
    store: &StageStore,
    stage: &EmbedStage,
) -> Result<Option<CompletedStage>, EngineError> {
    Ok(match store.completed(&stage.stage, &stage.key)? {
        Some(completed) => Some(completed),
        None => store.find_completed(&stage.key)?,
    })
}

/// A follower's share of a device stage that process 0 of `stage.cluster` leads (see
/// [`cluster`]): the same dataflow, fed by the leader, on this process's workers and
/// device. Returns the items this process ran on its device.
pub fn follow_device_stage<M: DeviceModel>(
    model: Arc<M>,
    stage: &EmbedStage,
    output: StageOutput,
) -> Result<u64, EngineError> {
    if stage.cluster.is_leader() {
        return Err(EngineError::Invalid(
            "process 0 leads a stage; it does not follow one".into(),
        ));
    }
    let nothing: ItemSource<M::Item> = Box::new(std::iter::empty());
    let ran = run_cluster_dataflow(None, model, nothing, stage, output, Writing::Nothing)?;
    Ok(ran.rows)
}

/// The output of a stage this process does not write (a follower's share).
fn unwritten_output() -> StageOutput {
    StageOutput {
        schema: Arc::new(arrow::datatypes::Schema::empty()),
        to_batch: Arc::new(|_, _| {
            Err(arrow::error::ArrowError::InvalidArgumentError(
                "a follower writes no stage".into(),
            ))
        }),
    }
}

/// Held while a stage that spans several processes runs (see [`run_cluster_dataflow`]).
static CLUSTER_STAGE: Mutex<()> = Mutex::new(());

/// This process leads a stage that spans several processes.
fn leader_of_cluster(store: Option<&StageStore>, stage: &EmbedStage) -> bool {
    store.is_some() && stage.cluster.is_distributed() && stage.cluster.is_leader()
}

/// How the dataflow writes its stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Writing {
    /// The stage's whole output, in input order: a resumed stage skips the items its
    /// committed rows hold, and the stage is finished at the end.
    WholeStage,
    /// Rows appended to a stage that stays open (a memo table): every item of the source
    /// is run and written after the committed rows; the stage is never finished.
    Append,
    /// Nothing written: a follower's share.
    Nothing,
}

/// What one run of the dataflow did.
struct DataflowRun {
    /// The finished stage ([`Writing::WholeStage`] only).
    completed: Option<CompletedStage>,
    rows: u64,
    seconds: f64,
    executor: ExecutorStats,
}

/// Feeds `source` through `InferOnDevice` into `stage`'s parts (see the module docs).
fn run_dataflow<M: DeviceModel>(
    store: &StageStore,
    model: Arc<M>,
    source: ItemSource<M::Item>,
    stage: &EmbedStage,
    output: StageOutput,
    writing: Writing,
) -> Result<DataflowRun, EngineError> {
    run_cluster_dataflow(Some(store), model, source, stage, output, writing)
}

/// [`run_dataflow`] over `stage.cluster`'s processes: with a store on the leader (its
/// worker 0 feeds and writes), without one on a follower.
fn run_cluster_dataflow<M: DeviceModel>(
    store: Option<&StageStore>,
    model: Arc<M>,
    source: ItemSource<M::Item>,
    stage: &EmbedStage,
    output: StageOutput,
    writing: Writing,
) -> Result<DataflowRun, EngineError> {
    let start = Instant::now();
    // The device's one executor, shared with every other stage on it; this stage gets
    // its own bounded queue and figures.
    let submitter = DeviceExecutor::shared(model.device())
        .and_then(|executor| executor.open_queue(model.clone()))
        .map_err(|e| EngineError::Dataflow(format!("the device executor: {e}")))?;
    let progress = Arc::new(Progress::new(&stage.label, stage.total, stage.quiet));
    let config = InferConfig {
        model: model.clone(),
        batcher: stage.batcher,
        submitter: submitter.clone(),
        progress: progress.clone(),
    };
    let source = Arc::new(Mutex::new(Some(source)));
    // One distributed stage at a time in this process: each is announced to the
    // followers and runs as its own timely computation over the cluster's ports.
    let _turn = if stage.cluster.is_distributed() {
        Some(
            CLUSTER_STAGE
                .lock()
                .map_err(|_| EngineError::Dataflow("a distributed stage panicked".into()))?,
        )
    } else {
        None
    };
    if leader_of_cluster(store, stage) {
        cluster::announce(
            &stage.cluster,
            stage.workers,
            cluster::FollowerJob::Stage {
                model: model.spec(),
                max_tokens: stage.batcher.max_tokens,
                max_rows: stage.batcher.max_rows,
                label: stage.label.clone(),
            },
        )?;
    }
    let store = store.cloned();
    let leader = store.is_some();
    let stage_spec = stage.clone();
    let width = model.row_width();
    let chunk_rows = stage.chunk_rows.max(1);

    let guards = cluster::execute(
        &stage.cluster,
        stage.workers,
        move |worker| -> Result<Option<(Option<CompletedStage>, u64)>, EngineError> {
            let index = worker.index();
            let writer: SharedWriter = Rc::new(RefCell::new(None));
            if index == 0 && writing != Writing::Nothing {
                let Some(store) = &store else {
                    return Err(EngineError::Dataflow(
                        "worker 0 has no stage store: process 0 must lead".into(),
                    ));
                };
                *writer.borrow_mut() = Some(store.begin(
                    &stage_spec.stage,
                    stage_spec.key.clone(),
                    output.schema.clone(),
                )?);
            }
            let skip = match writing {
                Writing::WholeStage => writer
                    .borrow()
                    .as_ref()
                    .map(|w| w.committed_rows())
                    .unwrap_or(0),
                Writing::Append | Writing::Nothing => 0,
            };
            let error: Rc<RefCell<Option<EngineError>>> = Rc::new(RefCell::new(None));
            let discard_from = Rc::new(Cell::new(u64::MAX));
            let mut input: InputHandleVec<u64, InputRecord<M::Item>> = InputHandleVec::new();
            let probe = ProbeHandle::new();
            worker.dataflow::<u64, _, _>(|scope| {
                let items = input.to_stream(scope);
                let outputs =
                    infer_on_device(items, config.clone(), error.clone()).probe_with(&probe);
                write_parts(
                    outputs,
                    writer.clone(),
                    discard_from.clone(),
                    width,
                    output.to_batch.clone(),
                    error.clone(),
                );
            });

            let mut fed: u64 = 0;
            let mut source_error: Option<EngineError> = None;
            if index == 0 {
                let taken = source.lock().ok().and_then(|mut s| s.take());
                let Some(items) = taken else {
                    return Err(EngineError::Dataflow("text source already taken".into()));
                };
                let mut seq = skip;
                let mut time: u64 = 0;
                let mut in_chunk = 0usize;
                let mut skipped = 0u64;
                for item in items {
                    let (id, item) = match item {
                        Ok(pair) => pair,
                        Err(e) => {
                            // Whole chunks already fed are good work: let them be
                            // written. A partial chunk is discarded, so that a resumed
                            // run cuts parts where an uninterrupted one does.
                            if in_chunk > 0 {
                                discard_from.set(time);
                            }
                            source_error = Some(e);
                            break;
                        }
                    };
                    if skipped < skip {
                        skipped += 1;
                        continue;
                    }
                    input.send((seq, id, item));
                    seq += 1;
                    fed += 1;
                    in_chunk += 1;
                    if in_chunk == chunk_rows {
                        in_chunk = 0;
                        time += 1;
                        input.advance_to(time);
                        if time > MAX_CHUNKS_IN_FLIGHT {
                            let oldest = time - MAX_CHUNKS_IN_FLIGHT;
                            while probe.less_than(&oldest) && error.borrow().is_none() {
                                worker.step_or_park(None);
                            }
                        }
                        if error.borrow().is_some() {
                            break;
                        }
                    }
                }
            }
            input.close();
            while worker.step_or_park(None) {}
            if let Some(e) = error.borrow_mut().take().or(source_error) {
                return Err(e);
            }
            let finished = writer.borrow_mut().take();
            match (finished, writing) {
                (None, _) => Ok(None),
                (Some(w), Writing::WholeStage) => Ok(Some((Some(w.finish()?), fed))),
                (Some(w), Writing::Append | Writing::Nothing) => {
                    drop(w);
                    Ok(Some((None, fed)))
                }
            }
        },
    )?;

    let mut outcome = None;
    let mut first_error = None;
    for result in cluster::join(guards)? {
        match result {
            Ok(Ok(Some(done))) => outcome = Some(done),
            Ok(Ok(None)) => {}
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(panic) => {
                first_error
                    .get_or_insert(EngineError::Dataflow(format!("a worker failed: {panic}")));
            }
        }
    }
    // Every batch this stage submitted has been answered (the dataflow waited for each),
    // so its figures are complete; dropping the last submitter closes the queue.
    let executor_stats = submitter.stats();
    drop(submitter);
    progress.finish();
    if let Some(e) = first_error {
        return Err(e);
    }
    let (completed, rows_embedded) = match outcome {
        Some(done) => done,
        // A follower: no worker 0 here; what its device ran is its share.
        None if !leader => (None, executor_stats.rows),
        None => {
            return Err(EngineError::Dataflow(
                "worker 0 returned no stage; this is a bug".into(),
            ))
        }
    };
    let seconds = start.elapsed().as_secs_f64();
    Ok(DataflowRun {
        completed,
        rows: rows_embedded,
        seconds,
        executor: executor_stats,
    })
}
