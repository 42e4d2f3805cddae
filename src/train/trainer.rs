//! The training loop: epochs of accumulated-batch steps (gradient caching), AdamW with
//! clipping and the recipe's schedule, dev loss after every epoch with the best model
//! kept and early stopping, checkpoints that resume to the same final weights, and a
//! loss log.
//!
//! A checkpoint (`train/checkpoint/`) holds the weights, the optimizer's moments and a
//! small JSON state (epoch, step within it, global step, best dev loss, patience left).
//! The data order of an epoch is recomputed from the seed and the epoch number, so the
//! data position is just the step within the epoch. Every checkpoint is written to a
//! temporary directory and renamed into place: one always exists whole.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use distillery_operators::student::Student;
use serde::{Deserialize, Serialize};

use crate::error::EngineError;
use crate::executor::{DeviceLease, Submitter};
use crate::mining::Example;
use crate::progress::Progress;
use crate::store::sync_dir;
use crate::train::data::{steps_per_epoch, TrainingSet};
use crate::train::data_parallel::{Collective, Peers};
use crate::train::gradcache::{
    batch_gradients_shared, batch_loss, prepare, LossValues, PassageInputs,
};
use crate::train::loss::LossConfig;
use crate::train::optim::{clip_grad_norm, AdamW, AdamWConfig};
use crate::train::schedule::{LinearSchedule, ScheduleConfig};

/// The trainer's settings; the defaults are the recipe's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainSettings {
    pub loss: LossConfig,
    pub optimizer: AdamWConfig,
    pub schedule: ScheduleConfig,
    /// Queries per micro-batch (each with its list of passages).
    pub micro_batch: usize,
    /// Micro-batches accumulated into one optimizer step (one contrastive softmax).
    pub accumulation: usize,
    pub max_epochs: u64,
    /// Stop after this many epochs without a better dev loss.
    pub patience: u64,
    /// Global gradient-norm clip.
    pub max_grad_norm: f64,
    /// Passages per query list (the recipe's top 20).
    pub list_len: usize,
    /// Also checkpoint after every this many steps (0: no step bound).
    pub checkpoint_every: u64,
    /// Also checkpoint after the first step that ends this many minutes after the last
    /// checkpoint (0: no time bound). With the step bound, whichever comes first: a kill
    /// loses at most this long of training (plus one step), however slow a step is.
    pub checkpoint_minutes: f64,
    pub seed: u64,
    /// Where a run whose inputs changed starts: the base model (the default: the model
    /// equals a run from scratch) or the last run's exported model
    /// ([`super::warm_start`]).
    pub warm_start: WarmStart,
    /// Whether the passage encoder trains with the query encoder (`shared`, one model)
    /// or stays the base model's (`frozen`): only queries are embedded differently
    /// after training, so the corpus index of the base model stays valid.
    pub passage_encoder: PassageEncoder,
}

/// Which encoders training changes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PassageEncoder {
    /// One model embeds queries and passages, and both sides train (the recipe).
    #[default]
    Shared,
    /// Query-tower training: passages keep the base model's embeddings (taken from the
    /// store); the export is a sentence-transformers Router whose query route is the
    /// fine-tuned model and whose document route is the base model, unchanged.
    Frozen,
}

/// The model a training run of new inputs starts from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WarmStart {
    /// The `[student]` model: the result equals a run from scratch.
    #[default]
    Base,
    /// The model the last run exported (`train/best-model`), trained further on the new
    /// examples.
    Previous,
}

impl Default for TrainSettings {
    fn default() -> Self {
        Self {
            loss: LossConfig::default(),
            optimizer: AdamWConfig::default(),
            schedule: ScheduleConfig::default(),
            micro_batch: 16,
            accumulation: 256,
            max_epochs: 30,
            patience: 2,
            max_grad_norm: 1.0,
            list_len: 20,
            checkpoint_every: 0,
            checkpoint_minutes: DEFAULT_CHECKPOINT_MINUTES,
            seed: 42,
            warm_start: WarmStart::Base,
            passage_encoder: PassageEncoder::Shared,
        }
    }
}

/// The default time bound between checkpoints. A MiniLM checkpoint (weights and two
/// AdamW moments, ~270 MB) takes about a second to write on these machines; every ten
/// minutes that is well under 1% of the run, and a kill costs at most ten minutes.
pub const DEFAULT_CHECKPOINT_MINUTES: f64 = 10.0;

/// Where a run stands; saved in every checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    pub epoch: u64,
    /// Steps of `epoch` already taken.
    pub step_in_epoch: u64,
    pub global_step: u64,
    pub best_dev: Option<f64>,
    pub epochs_without_improvement: u64,
    pub finished: bool,
}

/// Why a training run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// Early stopping: `patience` epochs in a row without a better dev loss.
    Patience,
    /// `max_epochs` epochs done.
    MaxEpochs,
    /// Stopped from outside after [`RunControl::stop_after`] steps (what a kill does);
    /// the checkpoint resumes it.
    Interrupted,
}

impl StopReason {
    /// Why a run in `state` under `settings` ended.
    fn of(state: &TrainState, settings: &TrainSettings) -> Self {
        if !state.finished && state.epoch < settings.max_epochs {
            StopReason::Interrupted
        } else if state.epochs_without_improvement >= settings.patience {
            StopReason::Patience
        } else {
            StopReason::MaxEpochs
        }
    }
}

/// What a training run did.
#[derive(Debug, Clone, Serialize)]
pub struct TrainReport {
    pub state: TrainState,
    /// Why it ended.
    pub stopped: StopReason,
    /// The epoch (0-based) whose weights the best model holds: the lowest dev loss, the
    /// first of equal ones; `None` before the first epoch ends.
    pub best_epoch: Option<u64>,
    pub steps_per_epoch: u64,
    pub train_queries: usize,
    pub dev_queries: usize,
    /// Dev loss after each completed epoch (of this run and of the runs it resumed).
    pub dev_losses: Vec<f64>,
    pub best_model: PathBuf,
    pub resumed_from: Option<u64>,
}

/// How a run is driven from outside.
#[derive(Default)]
pub struct RunControl<'a> {
    /// Stop (with a checkpoint) once this many optimizer steps are done: what a kill
    /// does, for tests of resume.
    pub stop_after: Option<u64>,
    /// No progress output.
    pub quiet: bool,
    /// The student's device, taken through its executor for every step and every dev
    /// loss ([`Submitter::lease`]), so no other stage runs a model on it meanwhile and
    /// the time is counted as training's. `None`: the device is used directly.
    pub device: Option<Submitter>,
    /// The identity of what the run trains on (examples, passage texts, student model,
    /// settings; the caller hashes them): a checkpoint saved for other inputs is not
    /// resumed, and the run starts again from the student it is given.
    pub inputs: String,
    /// The other processes of a cluster, when training is data-parallel: every step's
    /// and every dev loss's micro-batches are shared among them
    /// ([`crate::train::data_parallel`]). This process must be process 0; the caller
    /// tells the others when training is over ([`Peers::finish`]).
    pub peers: Option<&'a mut dyn Collective>,
}

const CHECKPOINT_DIR: &str = "checkpoint";
const STATE_FILE: &str = "state.json";
const WEIGHTS_FILE: &str = "weights.safetensors";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const LOG_FILE: &str = "loss-log.csv";
const LOG_HEADER: &str = "step,epoch,lr,loss,kl,infonce,grad_norm";
/// The dev loss after each epoch, `epoch,dev_loss`: kept so that a resumed run reports
/// the epochs an earlier run finished.
const DEV_LOG_FILE: &str = "dev-loss.csv";

/// The dev losses of epochs `0..epochs` from the dev log (those a checkpoint at the start
/// of `epochs` holds); none when there is no log yet.
fn read_dev_log(path: &Path, epochs: u64) -> Result<Vec<f64>, EngineError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(EngineError::Write {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let mut losses = Vec::new();
    for (i, line) in text.lines().enumerate().skip(1) {
        let parsed = line
            .split_once(',')
            .and_then(|(e, l)| Some((e.parse::<u64>().ok()?, l.parse::<f64>().ok()?)));
        match parsed {
            Some((epoch, loss)) if epoch == losses.len() as u64 && epoch < epochs => {
                losses.push(loss)
            }
            Some(_) => {}
            None => {
                return Err(EngineError::Invalid(format!(
                    "{}:{}: expected epoch,dev_loss, found `{line}`",
                    path.display(),
                    i + 1
                )))
            }
        }
    }
    Ok(losses)
}

fn write_dev_log(path: &Path, losses: &[f64]) -> Result<(), EngineError> {
    let mut text = String::from("epoch,dev_loss\n");
    for (epoch, loss) in losses.iter().enumerate() {
        text.push_str(&format!("{epoch},{loss}\n"));
    }
    crate::store::write_file_atomically(path, text.as_bytes())?;
    Ok(())
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> EngineError + '_ {
    move |source| EngineError::Write {
        path: path.to_path_buf(),
        source,
    }
}

fn save_checkpoint(
    dir: &Path,
    student: &Student,
    opt: &AdamW,
    state: &TrainState,
    inputs: &str,
) -> Result<(), EngineError> {
    let tmp = dir.with_extension("tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
    let weights: HashMap<String, Tensor> = student
        .named_vars()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect();
    candle_core::safetensors::save(&weights, tmp.join(WEIGHTS_FILE))?;
    candle_core::safetensors::save(&opt.state()?, tmp.join(OPTIMIZER_FILE))?;
    #[derive(Serialize)]
    struct Saved<'a> {
        state: &'a TrainState,
        adam_steps: u64,
        inputs: &'a str,
    }
    let text = serde_json::to_string_pretty(&Saved {
        state,
        adam_steps: opt.steps(),
        inputs,
    })
    .map_err(|e| EngineError::Invalid(e.to_string()))?;
    std::fs::write(tmp.join(STATE_FILE), text).map_err(io_err(&tmp))?;
    // Durable before it replaces anything: every file, then the directory's entries.
    for name in [WEIGHTS_FILE, OPTIMIZER_FILE, STATE_FILE] {
        let path = tmp.join(name);
        std::fs::File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(io_err(&path))?;
    }
    sync_dir(&tmp)?;
    crate::crash::point("train.checkpoint-written");
    // Swap: the old checkpoint stays whole until the new one is complete.
    let old = dir.with_extension("old");
    if dir.exists() {
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(io_err(&old))?;
        }
        std::fs::rename(dir, &old).map_err(io_err(dir))?;
        crate::crash::point("train.checkpoint-swapping");
    }
    std::fs::rename(&tmp, dir).map_err(io_err(dir))?;
    if let Some(parent) = dir.parent() {
        sync_dir(parent)?;
    }
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(io_err(&old))?;
    }
    Ok(())
}

/// What the checkpoint of the training directory `train_dir` was saved for
/// ([`RunControl::inputs`]); `None` without a checkpoint (or one that did not say).
pub fn checkpoint_inputs(train_dir: &Path) -> Option<String> {
    #[derive(Deserialize)]
    struct Saved {
        inputs: Option<String>,
    }
    let dir = train_dir.join(CHECKPOINT_DIR);
    [dir.clone(), dir.with_extension("old")]
        .iter()
        .find_map(|d| std::fs::read_to_string(d.join(STATE_FILE)).ok())
        .and_then(|text| serde_json::from_str::<Saved>(&text).ok())
        .and_then(|saved| saved.inputs)
}

/// The checkpoint in `dir` loaded into `student` and `opt`, when there is one and it was
/// saved for `inputs` (one of other inputs, or of a version that did not record them,
/// is left alone: the run starts from the student as given).
fn load_checkpoint(
    dir: &Path,
    student: &Student,
    opt: &mut AdamW,
    inputs: &str,
) -> Result<Option<TrainState>, EngineError> {
    // A crash between the two renames leaves only `.old`: it is the latest whole one.
    let old = dir.with_extension("old");
    let dir = if dir.join(STATE_FILE).is_file() {
        dir.to_path_buf()
    } else if old.join(STATE_FILE).is_file() {
        old
    } else {
        return Ok(None);
    };
    #[derive(Deserialize)]
    struct Saved {
        state: TrainState,
        adam_steps: u64,
        #[serde(default)]
        inputs: Option<String>,
    }
    let text = std::fs::read_to_string(dir.join(STATE_FILE)).map_err(io_err(&dir))?;
    let saved: Saved = serde_json::from_str(&text)
        .map_err(|e| EngineError::Invalid(format!("{}: {e}", dir.join(STATE_FILE).display())))?;
    if saved.inputs.as_deref() != Some(inputs) {
        return Ok(None);
    }
    let weights = candle_core::safetensors::load(dir.join(WEIGHTS_FILE), &Device::Cpu)?;
    for (name, var) in student.named_vars() {
        let t = weights.get(&name).ok_or_else(|| {
            EngineError::Invalid(format!(
                "{}: checkpoint has no weight `{name}`",
                dir.display()
            ))
        })?;
        var.set(&t.to_device(var.device())?)?;
    }
    let moments = candle_core::safetensors::load(dir.join(OPTIMIZER_FILE), &Device::Cpu)?;
    let device = student
        .vars()
        .first()
        .map(|v| v.device().clone())
        .unwrap_or(Device::Cpu);
    let moments = moments
        .into_iter()
        .map(|(name, t)| Ok((name, t.to_device(&device)?)))
        .collect::<Result<HashMap<_, _>, candle_core::Error>>()?;
    opt.restore(&moments, saved.adam_steps)
        .map_err(|e| EngineError::Invalid(format!("{}: {e}", dir.display())))?;
    Ok(Some(saved.state))
}

/// Opens the loss log for appending after its rows of the steps a checkpoint at
/// `global_step` holds: a row is logged by the step that takes `global_step` from `s` to
/// `s + 1`, so those are the rows of steps `0..global_step`. Later rows (steps taken
/// after the checkpoint, by a run killed before the next one) are dropped: the resumed
/// run takes those steps again and logs them once.
fn open_log(path: &Path, global_step: u64) -> Result<std::fs::File, EngineError> {
    let mut kept = vec![LOG_HEADER.to_string()];
    if let Ok(text) = std::fs::read_to_string(path) {
        for line in text.lines().skip(1) {
            let step: Option<u64> = line.split(',').next().and_then(|s| s.parse().ok());
            if step.is_some_and(|s| s < global_step) {
                kept.push(line.to_string());
            }
        }
    }
    crate::store::write_file_atomically(path, (kept.join("\n") + "\n").as_bytes())?;
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(io_err(path))
}

/// Whether the step that brought the run to `global_step` ends with a checkpoint, the
/// last one written `since_last` ago: the step bound or the time bound, whichever comes
/// first (epoch ends always checkpoint).
fn checkpoint_due(settings: &TrainSettings, global_step: u64, since_last: Duration) -> bool {
    let by_steps =
        settings.checkpoint_every > 0 && global_step.is_multiple_of(settings.checkpoint_every);
    let by_time = settings.checkpoint_minutes > 0.0
        && since_last.as_secs_f64() >= settings.checkpoint_minutes * 60.0;
    by_steps || by_time
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.6}")).unwrap_or_default()
}

/// Trains `student` on `examples` in `dir` (resuming from its checkpoint when one exists)
/// and exports the best model to `dir/best-model`. `passages` gives the examples'
/// passages: their texts (both encoders train; the export is one model) or fixed
/// embeddings (the passage encoder is frozen; the export is a Router of the student as
/// query encoder and the fixed embeddings' model as document encoder).
pub fn train<'p>(
    student: &Student,
    examples: Vec<Example>,
    passages: impl Into<PassageInputs<'p>>,
    settings: &TrainSettings,
    dir: &Path,
    prompts: (Option<String>, Option<String>),
    control: RunControl<'_>,
) -> Result<TrainReport, EngineError> {
    let RunControl {
        stop_after,
        quiet,
        device,
        inputs,
        peers,
    } = control;
    let mut peers = peers.map(Peers::new).transpose()?;
    let passages = passages.into();
    let lease = |rows: usize| -> Result<Option<DeviceLease>, EngineError> {
        device
            .as_ref()
            .map(|queue| queue.lease(rows as u64))
            .transpose()
            .map_err(|e| EngineError::Dataflow(format!("training: {e}")))
    };
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    settings
        .loss
        .validate()
        .map_err(|e| EngineError::Invalid(format!("[train.loss] {e}")))?;
    if !(settings.checkpoint_minutes.is_finite() && settings.checkpoint_minutes >= 0.0) {
        return Err(EngineError::Invalid(format!(
            "[train] checkpoint_minutes must be a number >= 0, found {}",
            settings.checkpoint_minutes
        )));
    }
    let set = TrainingSet::new(examples);
    if set.train.is_empty() {
        return Err(EngineError::Invalid(
            "no training examples (every query is in dev?)".into(),
        ));
    }
    let mut intern: HashMap<String, u32> = HashMap::new();
    for e in set.train.iter().chain(&set.dev) {
        for p in &e.passage_ids {
            let n = intern.len() as u32;
            intern.entry(p.clone()).or_insert(n);
        }
    }
    let per_step = (settings.micro_batch * settings.accumulation).max(1);
    let steps = steps_per_epoch(set.train.len(), per_step);
    let schedule = LinearSchedule::new(
        settings.optimizer.lr,
        steps,
        settings.max_epochs,
        &settings.schedule,
    );
    let vars = student.vars();
    let mut opt = AdamW::new(vars.clone(), settings.optimizer)?;
    let checkpoint = dir.join(CHECKPOINT_DIR);
    let best_model = dir.join("best-model");
    let mut state = TrainState {
        epoch: 0,
        step_in_epoch: 0,
        global_step: 0,
        best_dev: None,
        epochs_without_improvement: 0,
        finished: false,
    };
    let mut resumed_from = None;
    if let Some(saved) = load_checkpoint(&checkpoint, student, &mut opt, &inputs)? {
        resumed_from = Some(saved.global_step);
        state = saved;
    }
    let log_path = dir.join(LOG_FILE);
    let mut log = open_log(&log_path, state.global_step)?;
    let dev_log = dir.join(DEV_LOG_FILE);
    let mut dev_losses = read_dev_log(&dev_log, state.epoch)?;
    let mut last_checkpoint = Instant::now();
    let total_steps = steps * settings.max_epochs;
    let progress = Progress::new(
        "train steps",
        Some(total_steps.saturating_sub(state.global_step)),
        quiet,
    );

    while !state.finished && state.epoch < settings.max_epochs {
        let order = set.epoch_order(settings.seed, state.epoch);
        while state.step_in_epoch < steps {
            if stop_after.is_some_and(|n| state.global_step >= n) {
                save_checkpoint(&checkpoint, student, &opt, &state, &inputs)?;
                return Ok(TrainReport {
                    stopped: StopReason::of(&state, settings),
                    best_epoch: best_epoch(&dev_losses),
                    state,
                    steps_per_epoch: steps,
                    train_queries: set.train.len(),
                    dev_queries: set.dev.len(),
                    dev_losses,
                    best_model,
                    resumed_from,
                });
            }
            let start = state.step_in_epoch as usize * per_step;
            let chosen: Vec<&Example> = order[start..(start + per_step).min(order.len())]
                .iter()
                .map(|&i| &set.train[i])
                .collect();
            let batch = prepare(student, &chosen, passages, &intern, settings.list_len)?;
            let held = lease(chosen.len())?;
            let (mut grads, values) = batch_gradients_shared(
                student,
                student.default_gradient_path(),
                &settings.loss,
                &batch,
                settings.micro_batch,
                peers.as_mut(),
            )?;
            if !values.total.is_finite() {
                return Err(EngineError::Invalid(format!(
                    "non-finite loss {} at step {} (epoch {}, batch {} of the epoch): stopping, nothing was updated",
                    values.total, state.global_step, state.epoch, state.step_in_epoch
                )));
            }
            let norm = clip_grad_norm(&mut grads, settings.max_grad_norm)?;
            let lr = schedule.lr(state.global_step);
            opt.step(&grads, lr)?;
            drop(held);
            writeln!(
                log,
                "{},{},{lr:.8},{:.6},{},{},{norm:.6}",
                state.global_step,
                state.epoch,
                values.total,
                fmt_opt(values.kl),
                fmt_opt(values.infonce)
            )
            .map_err(io_err(&log_path))?;
            state.global_step += 1;
            state.step_in_epoch += 1;
            progress.inc(1);
            crate::crash::point("train.step");
            if checkpoint_due(settings, state.global_step, last_checkpoint.elapsed()) {
                save_checkpoint(&checkpoint, student, &opt, &state, &inputs)?;
                last_checkpoint = Instant::now();
            }
        }
        // End of epoch: dev loss, best model, patience.
        let held = lease(set.dev.len().max(1))?;
        let dev = dev_loss(student, &set, passages, &intern, settings, peers.as_mut())?;
        drop(held);
        dev_losses.push(dev.total);
        write_dev_log(&dev_log, &dev_losses)?;
        let improved = state.best_dev.is_none_or(|b| dev.total < b);
        if improved {
            state.best_dev = Some(dev.total);
            state.epochs_without_improvement = 0;
            match passages {
                PassageInputs::Texts(_) => student.export_sentence_transformers(
                    student.dir(),
                    &best_model,
                    prompts.clone(),
                )?,
                PassageInputs::Fixed(fixed) => student.export_query_document_router(
                    student.dir(),
                    &fixed.model,
                    &best_model,
                    prompts.clone(),
                )?,
            }
        } else {
            state.epochs_without_improvement += 1;
        }
        if !quiet {
            eprintln!(
                "epoch {}: dev loss {:.5}{}",
                state.epoch,
                dev.total,
                if improved { " (best, exported)" } else { "" }
            );
        }
        state.epoch += 1;
        state.step_in_epoch = 0;
        state.finished = state.epochs_without_improvement >= settings.patience
            || state.epoch >= settings.max_epochs;
        save_checkpoint(&checkpoint, student, &opt, &state, &inputs)?;
        last_checkpoint = Instant::now();
    }
    progress.finish();
    drop(log);
    crate::train::report::write_loss_plot(&log_path, &dir.join("loss.svg"))?;
    let stopped = StopReason::of(&state, settings);
    let best_epoch = best_epoch(&dev_losses);
    if !quiet && stopped == StopReason::Patience {
        eprintln!(
            "early stopping after epoch {}: no better dev loss for {} epochs (best: epoch {})",
            state.epoch.saturating_sub(1),
            state.epochs_without_improvement,
            best_epoch.map_or_else(|| "none".to_string(), |e| e.to_string())
        );
    }
    Ok(TrainReport {
        stopped,
        best_epoch,
        state,
        steps_per_epoch: steps,
        train_queries: set.train.len(),
        dev_queries: set.dev.len(),
        dev_losses,
        best_model,
        resumed_from,
    })
}

/// The epoch of the lowest dev loss (the first of equal ones), as the trainer exports it:
/// an epoch's model is exported when its loss is strictly below every earlier one's.
fn best_epoch(dev_losses: &[f64]) -> Option<u64> {
    let mut best: Option<(usize, f64)> = None;
    for (epoch, &loss) in dev_losses.iter().enumerate() {
        if best.is_none_or(|(_, b)| loss < b) {
            best = Some((epoch, loss));
        }
    }
    best.map(|(epoch, _)| epoch as u64)
}

/// The dev set's loss: the mean over its accumulated batches (the train set's loss when
/// there is no dev split, so early stopping still has a signal).
fn dev_loss(
    student: &Student,
    set: &TrainingSet,
    passages: PassageInputs<'_>,
    intern: &HashMap<String, u32>,
    settings: &TrainSettings,
    mut peers: Option<&mut Peers<'_>>,
) -> Result<LossValues, EngineError> {
    let examples = if set.dev.is_empty() {
        &set.train
    } else {
        &set.dev
    };
    let per_step = (settings.micro_batch * settings.accumulation).max(1);
    let mut sum = 0.0;
    let mut n = 0usize;
    for chunk in examples.chunks(per_step) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let batch = prepare(student, &refs, passages, intern, settings.list_len)?;
        let v = batch_loss(
            student,
            &settings.loss,
            &batch,
            settings.micro_batch,
            peers.as_deref_mut(),
        )?;
        sum += v.total * chunk.len() as f64;
        n += chunk.len();
    }
    Ok(LossValues {
        total: sum / n.max(1) as f64,
        kl: None,
        infonce: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn by_default_a_checkpoint_is_due_every_ten_minutes_whatever_the_steps() {
        let defaults = TrainSettings::default();
        let minutes = |m: f64| Duration::from_secs_f64(m * 60.0);
        assert!(!checkpoint_due(&defaults, 1, minutes(9.9)));
        assert!(checkpoint_due(&defaults, 1, minutes(10.0)));
        assert!(!checkpoint_due(&defaults, 1_000_000, minutes(0.5)));
    }

    #[test]
    fn steps_and_time_bound_it_whichever_comes_first() {
        let settings = TrainSettings {
            checkpoint_every: 3,
            checkpoint_minutes: 1.0,
            ..TrainSettings::default()
        };
        assert!(checkpoint_due(&settings, 3, Duration::from_secs(1)));
        assert!(!checkpoint_due(&settings, 4, Duration::from_secs(59)));
        assert!(checkpoint_due(&settings, 4, Duration::from_secs(60)));
        let never = TrainSettings {
            checkpoint_every: 0,
            checkpoint_minutes: 0.0,
            ..TrainSettings::default()
        };
        assert!(!checkpoint_due(&never, 3, Duration::from_secs(86_400)));
    }
}
