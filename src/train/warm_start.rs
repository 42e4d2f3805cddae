//! `[train] warm_start = "previous"`: a training run whose inputs changed (the corpus, the
//! examples) starts from the model the last run exported instead of the base model.
//!
//! The starting model is `train/warm-start/`, a copy of `train/best-model/` taken once
//! for the new inputs (its `inputs` file says for which): the new run overwrites
//! `best-model` as it trains, so a killed run must restart from the copy, never from what
//! the killed run exported. A run of the same inputs that already started from the base
//! model (its checkpoint says so) keeps going from there.

use std::path::{Path, PathBuf};

use crate::error::EngineError;
use crate::store::{sync_dir, write_file_atomically};

/// Where the starting model is kept, under the training directory.
pub const WARM_START_DIR: &str = "warm-start";
/// The file in [`WARM_START_DIR`] naming the inputs the copy was taken for.
const INPUTS_FILE: &str = "inputs";
/// The exported model of the last run, under the training directory.
const BEST_MODEL_DIR: &str = "best-model";

/// The model a warm-started run of `inputs` starts from, taking it now if needed; `None`
/// when the run starts from the base model: no earlier run exported a model, or a run of
/// these inputs already started from the base (`checkpoint_inputs`, what the training
/// directory's checkpoint was saved for).
pub fn warm_start_model(
    train_dir: &Path,
    inputs: &str,
    checkpoint_inputs: Option<&str>,
) -> Result<Option<PathBuf>, EngineError> {
    let dir = train_dir.join(WARM_START_DIR);
    let taken_for = std::fs::read_to_string(dir.join(INPUTS_FILE)).ok();
    if taken_for.as_deref() == Some(inputs) {
        return Ok(Some(dir));
    }
    let best = train_dir.join(BEST_MODEL_DIR);
    if checkpoint_inputs == Some(inputs) || !best.join("model.safetensors").is_file() {
        return Ok(None);
    }
    let tmp = dir.with_extension("tmp");
    remove_dir(&tmp)?;
    copy_dir(&best, &tmp)?;
    write_file_atomically(&tmp.join(INPUTS_FILE), inputs.as_bytes())?;
    sync_dir(&tmp)?;
    remove_dir(&dir)?;
    std::fs::rename(&tmp, &dir).map_err(io(&dir))?;
    sync_dir(train_dir)?;
    Ok(Some(dir))
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> EngineError + '_ {
    move |source| EngineError::Write {
        path: path.to_path_buf(),
        source,
    }
}

fn remove_dir(dir: &Path) -> Result<(), EngineError> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(dir)(e)),
        _ => Ok(()),
    }
}

/// Copies the files of `from` (and its subdirectories) into a new directory `to`, each
/// synced.
fn copy_dir(from: &Path, to: &Path) -> Result<(), EngineError> {
    std::fs::create_dir_all(to).map_err(io(to))?;
    for entry in std::fs::read_dir(from).map_err(io(from))? {
        let path = entry.map_err(io(from))?.path();
        let Some(name) = path.file_name() else {
            continue;
        };
        let target = to.join(name);
        if path.is_dir() {
            copy_dir(&path, &target)?;
        } else {
            std::fs::copy(&path, &target).map_err(io(&target))?;
            std::fs::File::open(&target)
                .and_then(|f| f.sync_all())
                .map_err(io(&target))?;
        }
    }
    sync_dir(to)?;
    Ok(())
}
