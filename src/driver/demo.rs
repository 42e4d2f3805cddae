//! The demo: `distillery run` with no configuration runs the whole recipe on the SciFact
//! subset shipped in `datasets/scifact-mini` (built into the binary, so it runs from any
//! directory): extractive queries, the embedder as retriever, a bi-encoder + BM25
//! teacher, a short training, and base against fine-tuned on SciFact's test queries and
//! on the synthetic test set.
//!
//! The model is all-MiniLM-L6-v2 when it can be found (`DISTILLERY_MODEL`, the hub
//! cache, or `models/all-MiniLM-L6-v2` where `tools/fetch-minilm.sh` puts it); otherwise
//! a tiny random model, said plainly: the recipe runs, its numbers mean nothing. The
//! configuration is written to `RUN_DIR/demo.toml`, to read and to edit and pass back
//! with `--config`.
//!
//! The settings below were chosen by measurement (BENCHMARKS.md): the full recipe's
//! 4,096-query steps and 20-passage lists do not fit a few minutes on two cores, and a
//! short training with the recipe's learning rate made MiniLM worse; these keep the
//! run to minutes and the student at or above its base.

use std::path::{Path, PathBuf};

use distillery_operators::tiny::{write_tiny_bert, TinyBertSpec};

use crate::config::{Pipeline, PipelineFile};
use crate::error::EngineError;
use crate::model::{find_in_hub_cache, DEFAULT_MODEL_ID, HOW_TO_GET_MINILM, MODEL_ENV};

/// The shipped dataset's files, built into the binary.
const CORPUS: &str = include_str!("../../datasets/scifact-mini/corpus.jsonl");
const QUERIES: &str = include_str!("../../datasets/scifact-mini/queries.jsonl");
const QRELS: &str = include_str!("../../datasets/scifact-mini/qrels/test.tsv");

/// Where `tools/fetch-minilm.sh` puts the model, relative to the checkout.
const FETCHED_MINILM: &str = "models/all-MiniLM-L6-v2";

/// The demo's run directory when none is given.
pub const DEMO_RUN_DIR: &str = "runs/demo";

/// The demo's configuration; `{model}` is the model directory, `{data}` the dataset's.
const DEMO_CONFIG: &str = r#"# The demo's configuration, as `distillery run` wrote it: edit it and run it again
# with `distillery run --config demo.toml`. See the README for every field.
run_dir = "."
corpus = "{data}/corpus.jsonl"

[held_out]            # the recipe's 100 passages: their queries are the synthetic test set
count = 100

[generate]
generator = "extractive"   # no LLM here: titles, sentences and TF-IDF keywords
max_passages = 250         # 150 passages train (three queries each), 100 held out

[[retrievers]]
model = "{model}"

[[teachers]]                # the embedder's own cosine ...
kind = "bi-encoder"
model = "{model}"
[[teachers]]                # ... and BM25, calibrated and combined
kind = "bm25"

[student]
model = "{model}"
query_max_length = 64
passage_max_length = 128

[train]
micro_batch = 16
accumulation = 4            # 64 queries a step
max_epochs = 1
list_len = 8
[train.optimizer]
lr = 1e-5
[train.loss]
# The recipe's 0.3 is for a cross-encoder teacher. These teachers' normalised scores
# fall from 0.99 (the first passage) to 0.52 (the second): at 0.3 their distribution
# over a list of 8 puts 0.51 on the first passage, flatter than the student's own, and
# distilling it took the student below its base; at 0.05 it puts 0.98 there
# (BENCHMARKS.md, the demo).
teacher_temperature = 0.05

[eval]
dataset = "{data}"          # SciFact's test queries over the same 500 passages

[engine]
on_bad_record = "fail"
"#;

/// The model the demo uses, and whether it is the real one.
#[derive(Debug, Clone)]
pub struct DemoModel {
    pub dir: PathBuf,
    /// A tiny random model built because no real one was found.
    pub tiny: bool,
}

/// all-MiniLM-L6-v2 where it can be found without a network.
fn find_minilm() -> Option<PathBuf> {
    let is_model = |d: &Path| d.join("model.safetensors").is_file();
    std::env::var_os(MODEL_ENV)
        .map(PathBuf::from)
        .filter(|d| is_model(d))
        .or_else(|| find_in_hub_cache(DEFAULT_MODEL_ID))
        .or_else(|| Some(PathBuf::from(FETCHED_MINILM)).filter(|d| is_model(d)))
}

/// Writes `text` to `path` unless it already holds exactly that.
fn write_if_changed(path: &Path, text: &str) -> Result<(), EngineError> {
    if std::fs::read_to_string(path).is_ok_and(|t| t == text) {
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| EngineError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    crate::store::write_file_atomically(path, text.as_bytes())?;
    Ok(())
}

/// Lays out the demo in `run_dir` (the dataset, the model, `demo.toml`) and returns its
/// pipeline.
pub fn demo_pipeline(run_dir: &Path) -> Result<(Pipeline, DemoModel), EngineError> {
    let data = run_dir.join("data").join("scifact-mini");
    write_if_changed(&data.join("corpus.jsonl"), CORPUS)?;
    write_if_changed(&data.join("queries.jsonl"), QUERIES)?;
    write_if_changed(&data.join("qrels").join("test.tsv"), QRELS)?;
    let model = match find_minilm() {
        Some(dir) => DemoModel {
            dir: std::path::absolute(&dir).map_err(|source| EngineError::Write {
                path: dir.clone(),
                source,
            })?,
            tiny: false,
        },
        None => {
            let dir = run_dir.join("tiny-model");
            if !dir.join("model.safetensors").is_file() {
                let texts: Vec<String> = CORPUS
                    .lines()
                    .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                    .filter_map(|v| v["text"].as_str().map(str::to_string))
                    .collect();
                write_tiny_bert(&dir, texts.iter(), &TinyBertSpec::default())?;
            }
            DemoModel {
                dir: std::path::absolute(&dir).map_err(|source| EngineError::Write {
                    path: dir.clone(),
                    source,
                })?,
                tiny: true,
            }
        }
    };
    // TOML basic strings: a backslash or quote in a path must be escaped.
    let toml_path = |p: &Path| {
        p.display()
            .to_string()
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
    };
    let text = DEMO_CONFIG
        .replace("{model}", &toml_path(&model.dir))
        .replace("{data}", "data/scifact-mini");
    let config = run_dir.join("demo.toml");
    write_if_changed(&config, &text)?;
    let file: PipelineFile =
        toml::from_str(&text).map_err(|e| EngineError::Invalid(format!("demo.toml: {e}")))?;
    let pipeline = Pipeline::resolve(file, run_dir, &config)?;
    Ok((pipeline, model))
}

/// What the demo says about the model it uses.
pub fn describe(model: &DemoModel) -> String {
    if model.tiny {
        format!(
            "a TINY RANDOM model built at {}: the recipe runs, its metrics mean nothing. For \
             real numbers get {DEFAULT_MODEL_ID}: {HOW_TO_GET_MINILM}",
            model.dir.display()
        )
    } else {
        format!("{DEFAULT_MODEL_ID} at {}", model.dir.display())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is its job
mod tests {
    use super::*;

    #[test]
    fn the_demo_configuration_parses_and_names_the_shipped_data() {
        let dir = tempfile::tempdir().unwrap();
        let text = DEMO_CONFIG
            .replace("{model}", "/m")
            .replace("{data}", "data/scifact-mini");
        let file: PipelineFile = toml::from_str(&text).unwrap();
        let p = Pipeline::resolve(file, dir.path(), &dir.path().join("demo.toml")).unwrap();
        assert_eq!(p.corpus, dir.path().join("data/scifact-mini/corpus.jsonl"));
        assert_eq!(p.teachers.len(), 2);
        assert_eq!(p.eval.split, "test");
        assert_eq!(CORPUS.lines().count(), 500);
    }
}
