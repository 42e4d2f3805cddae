//! The training stage: fine-tune the student on the `examples` table (RECIPE.md section
//! 5) with the trainer in `run_dir/train`,
//! resuming from its checkpoint when one exists; the best model (by dev loss) is exported
//! as a sentence-transformers directory at `run_dir/train/best-model`.
//!
//! With `[train] passage_encoder = "frozen"` only the query encoder trains: the examples'
//! passages are embedded once by the base student as the run's evaluation embeds the
//! corpus (the same embedding key, so through the same memo table: passages the base
//! evaluation or a retriever with the same model and settings embedded are not embedded
//! again, and what this stage embeds the evaluation finds), and the export is a Router
//! whose document route is the base model.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use distillery_operators::student::{Student, StudentOptions};
use distillery_operators::TextKind;

use crate::config::Pipeline;
use crate::dataflow::cluster::{self, FollowerJob};
use crate::dataflow::embedding_key::embedding_settings_hash;
use crate::dataflow::evaluate::{read_matrix, student_models};
use crate::dataflow::label::{LabelOutcome, EXAMPLES_STAGE};
use crate::dataflow::passage_texts_of;
use crate::dataflow::rounds::Rounds;
use crate::dataflow::{journal_device_stage, run_embed_stage, EmbedStage, CHUNK_ROWS};
use crate::error::EngineError;
use crate::executor::DeviceExecutor;
use crate::mining::examples_from_batch;
use crate::model::fingerprint;
use crate::store::{hash_settings, ContentHasher, StageKey, StageStore};
use crate::train::data_parallel::{Collective, Peers};
use crate::train::gradcache::{FixedPassages, PassageInputs};
use crate::train::trainer::{
    checkpoint_inputs, train, PassageEncoder, RunControl, TrainReport, WarmStart,
};
use crate::train::warm_start::warm_start_model;

/// What `train` did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TrainOutcome {
    pub label: LabelOutcome,
    pub report: TrainReport,
    pub model: PathBuf,
    /// The model training started from: the `[student]` model, or with
    /// `warm_start = "previous"` after a change of inputs, the last run's.
    pub started_from: PathBuf,
    /// With a frozen passage encoder: where its passage embeddings came from.
    pub frozen_passages: Option<FrozenPassagesReport>,
}

/// A frozen passage encoder's embeddings of the examples' passages.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct FrozenPassagesReport {
    pub passages: usize,
    /// Embedded by this run; the rest were in the store (the memo table of the base
    /// student's passages, which its evaluation and a retriever of the same model and
    /// settings share).
    pub embedded: u64,
}

impl std::fmt::Display for FrozenPassagesReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "frozen passage encoder: {} passages' base embeddings, {} from the store, {} embedded now",
            self.passages,
            self.passages as u64 - self.embedded.min(self.passages as u64),
            self.embedded
        )
    }
}

/// The identity of what a training run trains on: the examples, the texts of their
/// passages (an edited passage keeps its id in the examples), the student model's files
/// and its settings, and the training settings. A checkpoint saved for other inputs is
/// not resumed (a changed corpus retrains from the base model, as a run from scratch).
fn training_inputs(
    store: &StageStore,
    texts: &HashMap<String, String>,
    model: &std::path::Path,
    student: &crate::config::StudentFile,
    train: &crate::train::trainer::TrainSettings,
) -> Result<String, EngineError> {
    let examples = store.last_completed(EXAMPLES_STAGE)?.ok_or_else(|| {
        EngineError::Dataflow(format!("the {EXAMPLES_STAGE} stage is not complete"))
    })?;
    let mut h = ContentHasher::new();
    h.field(examples.content_hash());
    let mut ids: Vec<&String> = texts.keys().collect();
    ids.sort();
    for id in ids {
        h.field(id).field(&texts[id]);
    }
    #[derive(serde::Serialize)]
    struct Settings<'a> {
        model: String,
        query_max_length: usize,
        passage_max_length: usize,
        query_prefix: &'a Option<String>,
        passage_prefix: &'a Option<String>,
        train: &'a crate::train::trainer::TrainSettings,
    }
    h.field(&hash_settings(&Settings {
        model: fingerprint(model)?,
        query_max_length: student.query_max_length,
        passage_max_length: student.passage_max_length,
        query_prefix: &student.query_prefix,
        passage_prefix: &student.passage_prefix,
        train,
    })?);
    Ok(h.finish())
}

/// The stage of a frozen passage encoder's embeddings of the examples' passages.
pub const FROZEN_PASSAGES_STAGE: &str = "train-frozen-passages";

/// The base student's passage embeddings of `texts` (id -> text), as the run's
/// evaluation embeds them: through the memo table of their embedding key.
fn frozen_passages(
    pipeline: &Pipeline,
    store: &StageStore,
    base: &std::path::Path,
    texts: &HashMap<String, String>,
) -> Result<(FixedPassages, FrozenPassagesReport), EngineError> {
    let models = student_models(pipeline, base, None)?;
    let (_, embedder, _) = models
        .into_iter()
        .next()
        .ok_or_else(|| EngineError::Dataflow("no base student was loaded; this is a bug".into()))?;
    let mut ids: Vec<&String> = texts.keys().collect();
    ids.sort();
    let mut h = ContentHasher::new();
    for id in &ids {
        h.field(id).field(&texts[*id]);
    }
    let stage = EmbedStage {
        stage: FROZEN_PASSAGES_STAGE.into(),
        key: StageKey {
            settings_hash: embedding_settings_hash(&embedder, TextKind::Passage)?,
            input_hash: h.finish(),
        },
        kind: TextKind::Passage,
        batcher: pipeline.batcher(),
        workers: pipeline.workers,
        cluster: pipeline.cluster.clone(),
        chunk_rows: CHUNK_ROWS,
        total: Some(ids.len() as u64),
        label: "train: the frozen encoder's passages".into(),
        quiet: pipeline.quiet,
    };
    let source: Vec<_> = ids
        .iter()
        .map(|id| Ok(((*id).clone(), texts[*id].clone())))
        .collect();
    let report = run_embed_stage(store, embedder, Box::new(source.into_iter()), &stage)?;
    let m = read_matrix(store, &report.completed.stage)?;
    let counts = FrozenPassagesReport {
        passages: m.ids.len(),
        embedded: report.rows_embedded,
    };
    Ok((
        FixedPassages::new(base.to_path_buf(), m.ids, m.dim, m.values)?,
        counts,
    ))
}

/// Training on `label`'s examples; inputs not checked here
/// ([`Pipeline::preflight`]).
pub fn run_train_stage(
    pipeline: &Pipeline,
    label: LabelOutcome,
    stop_after: Option<u64>,
) -> Result<TrainOutcome, EngineError> {
    let student_file = pipeline.student.as_ref().ok_or_else(|| {
        EngineError::Invalid(
            "no [student] in the configuration: train needs a model to fine-tune".into(),
        )
    })?;
    let store = StageStore::open(&pipeline.run_dir)?;
    let mut examples = Vec::new();
    for batch in store.read(EXAMPLES_STAGE)? {
        examples.extend(examples_from_batch(&batch?)?);
    }
    let wanted: HashSet<&str> = examples
        .iter()
        .flat_map(|e| e.passage_ids.iter().map(String::as_str))
        .collect();
    let read = pipeline.retrievers[0].read_options()?;
    let texts = passage_texts_of(&pipeline.corpus, &read, &wanted)?;
    let options = StudentOptions {
        query_max_length: student_file.query_max_length,
        passage_max_length: student_file.passage_max_length,
        query_prefix: student_file.query_prefix.clone(),
        passage_prefix: student_file.passage_prefix.clone(),
    };
    let base = PathBuf::from(&student_file.model);
    let frozen = match pipeline.train.passage_encoder {
        PassageEncoder::Shared => None,
        PassageEncoder::Frozen => {
            if pipeline.train.warm_start == WarmStart::Previous {
                return Err(EngineError::Invalid(
                    "[train] passage_encoder = \"frozen\" with warm_start = \"previous\": \
                     a frozen run exports a Router, which training does not start from; \
                     use warm_start = \"base\""
                        .into(),
                ));
            }
            Some(frozen_passages(pipeline, &store, &base, &texts)?)
        }
    };
    let passages = match &frozen {
        Some((fixed, _)) => PassageInputs::Fixed(fixed),
        None => PassageInputs::Texts(&texts),
    };
    let train_dir = pipeline.run_dir.join("train");
    let mut inputs = training_inputs(&store, &texts, &base, student_file, &pipeline.train)?;
    let warm = match pipeline.train.warm_start {
        WarmStart::Base => None,
        WarmStart::Previous => warm_start_model(
            &train_dir,
            &inputs,
            checkpoint_inputs(&train_dir).as_deref(),
        )?,
    };
    // A warm start's checkpoint is of its starting model too.
    if let Some(dir) = &warm {
        inputs = ContentHasher::new()
            .field(&inputs)
            .field(&fingerprint(dir)?)
            .finish();
    }
    let student = Student::load(warm.as_ref().unwrap_or(&base), &options, &pipeline.device)?;
    let prompts = (
        student_file.query_prefix.clone(),
        student_file.passage_prefix.clone(),
    );
    // Training takes the student's device from its executor step by step: no other
    // stage runs a model on it meanwhile, and the report shows training's busy time.
    let device = DeviceExecutor::shared(student.device())
        .and_then(|executor| executor.open_lease_queue())
        .map_err(|e| EngineError::Dataflow(format!("the device executor: {e}")))?;
    let start = std::time::Instant::now();
    // Over several processes, every step's micro-batches are shared among them
    // (`train::data_parallel`): the followers are told which student to load, and the
    // steps' rounds run in one computation of the cluster.
    let distributed = pipeline.cluster.is_distributed();
    let _turn = if distributed {
        Some(
            super::CLUSTER_STAGE
                .lock()
                .map_err(|_| EngineError::Dataflow("a distributed stage panicked".into()))?,
        )
    } else {
        None
    };
    let mut rounds = if distributed {
        cluster::announce(
            &pipeline.cluster,
            pipeline.workers,
            FollowerJob::Train {
                model: base.to_string_lossy().into_owned(),
                query_max_length: options.query_max_length,
                passage_max_length: options.passage_max_length,
                query_prefix: options.query_prefix.clone(),
                passage_prefix: options.passage_prefix.clone(),
            },
        )?;
        Some(Rounds::open(&pipeline.cluster)?)
    } else {
        None
    };
    let trained = train(
        &student,
        examples,
        passages,
        &pipeline.train,
        &train_dir,
        prompts,
        RunControl {
            stop_after,
            quiet: pipeline.quiet,
            device: Some(device.clone()),
            inputs,
            peers: rounds.as_mut().map(|r| r as &mut dyn Collective),
        },
    );
    if let Some(r) = rounds.as_mut() {
        Peers::new(r)?.finish();
    }
    drop(rounds);
    let report = trained?;
    let stats = device.stats();
    if stats.batches > 0 {
        journal_device_stage(
            &store,
            "train",
            "train: student steps",
            (stats.rows, 0),
            start.elapsed().as_secs_f64(),
            &stats,
        )?;
    }
    Ok(TrainOutcome {
        label,
        model: report.best_model.clone(),
        started_from: warm.unwrap_or(base),
        frozen_passages: frozen.map(|(_, counts)| counts),
        report,
    })
}
