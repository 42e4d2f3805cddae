//! `distillery score`: score every (query, passage) pair of a file with a cross-encoder
//! into one Parquet file (`id`, `score`), through the same device dataflow as every stage.
//!
//! Contracts:
//! - The output has one row per good pair of the input, in input order: `id` (utf8, the
//!   pair's id, see [`crate::corpus::open_pairs`]) and `score` (f32, the
//!   cross-encoder's score of the pair, see
//!   [`CrossEncoder::score_batch`](distillery_operators::cross_encoder::CrossEncoder)).
//! - The output file is written under a temporary name and renamed: it is whole or
//!   absent. A failed run (a bad record under `Fail`, a model error) leaves none.
//! - The scores are a stage of the run directory, keyed by the model's fingerprint, the
//!   effective `max_length` and the input file's bytes: a run killed midway resumes after
//!   its last committed part, and an unchanged rerun reuses the stage (`reused`).
//! - The rate in [`ScoreOutcome`] counts the pairs scored by this run over the dataflow's
//!   wall time; loading the model is not included.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{ArrayRef, Float32Array, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;
use candle_core::Device;
use distillery_operators::cross_encoder::{CrossEncoder, CrossEncoderOptions};
use distillery_operators::{TextKind, TokenBudgetBatcher};
use parquet::arrow::ArrowWriter;
use serde::Serialize;

use crate::config::cluster::Cluster;
use crate::config::{DEFAULT_BATCH_ROWS, DEFAULT_BATCH_TOKENS};
use crate::corpus::count_records;
use crate::corpus::quarantined;
use crate::corpus::{open_pairs, BadRecordPolicy, Quarantine, ReadOptions};
use crate::dataflow::{run_device_stage, EmbedStage, ItemSource, StageOutput, CHUNK_ROWS};
use crate::error::EngineError;
use crate::executor::ScorePairs;
use crate::model::fingerprint;
use crate::store::hash_file;
use crate::store::{hash_settings, write_file_with, StageKey, StageStore};

/// The stage's name in the run directory.
pub const SCORES_STAGE: &str = "scores";

/// Column names of the output.
pub const COL_ID: &str = "id";
pub const COL_SCORE: &str = "score";

/// Everything `distillery score` needs, resolved.
#[derive(Debug, Clone)]
pub struct ScoreJob {
    /// The cross-encoder's directory (see [`CrossEncoder::load`]).
    pub model: PathBuf,
    /// Most tokens per pair; `None` takes the model's default.
    pub max_length: Option<usize>,
    /// The pairs file (`.jsonl`, `.json` or `.tsv`).
    pub input: PathBuf,
    /// The Parquet file to write.
    pub output: PathBuf,
    /// Where the stage's parts are kept while running (and for resume).
    pub run_dir: PathBuf,
    /// Padded tokens per device batch.
    pub batch_tokens: usize,
    /// Most pairs per device batch.
    pub batch_rows: usize,
    /// Timely worker threads (tokenisation and batching).
    pub workers: usize,
    /// Skip bad records into this quarantine file instead of stopping.
    pub quarantine: Option<PathBuf>,
    pub quiet: bool,
    /// The processes the scoring runs over; process 0 reads, writes and leads.
    pub cluster: Cluster,
    /// Where the cross-encoder runs.
    pub device: Device,
}

impl ScoreJob {
    /// A job with the default batching, one worker, failing on bad records.
    pub fn new(model: PathBuf, input: PathBuf, output: PathBuf, run_dir: PathBuf) -> Self {
        ScoreJob {
            model,
            max_length: None,
            input,
            output,
            run_dir,
            batch_tokens: DEFAULT_BATCH_TOKENS,
            batch_rows: DEFAULT_BATCH_ROWS,
            workers: 1,
            quarantine: None,
            quiet: false,
            cluster: Cluster::single(),
            device: Device::Cpu,
        }
    }
}

/// What `distillery score` measured; model loading is excluded from the rate.
#[derive(Debug, Clone, Serialize)]
pub struct ScoreOutcome {
    /// Rows of the output.
    pub pairs: u64,
    /// Wall time of the dataflow (0 when the stage was reused).
    pub seconds: f64,
    /// Pairs scored by this run per second of `seconds`.
    pub pairs_per_second: f64,
    /// The model directory.
    pub model: String,
    /// True when the stage was already complete and nothing was scored.
    pub reused: bool,
    /// Bad records skipped (with `--on-bad-record skip`) and where they were written.
    pub skipped_records: u64,
    pub quarantine: Option<PathBuf>,
}

/// What decides the scores besides the input: the stage is reused only when it matches.
#[derive(Serialize)]
struct Settings<'a> {
    stage: &'a str,
    model: &'a str,
    max_length: usize,
}

/// The output's (and the stage's) schema: `id` utf8, `score` f32.
pub fn scores_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(COL_ID, DataType::Utf8, false),
        Field::new(COL_SCORE, DataType::Float32, false),
    ]))
}

fn scores_batch(ids: &[String], scores: Vec<f32>) -> Result<RecordBatch, ArrowError> {
    let id: ArrayRef = Arc::new(StringArray::from_iter_values(ids.iter()));
    let score: ArrayRef = Arc::new(Float32Array::from(scores));
    RecordBatch::try_new(scores_schema(), vec![id, score])
}

/// Runs the job.
pub fn run_score(job: &ScoreJob) -> Result<ScoreOutcome, EngineError> {
    let store = StageStore::open(&job.run_dir)?;
    let read = ReadOptions {
        policy: match &job.quarantine {
            None => BadRecordPolicy::Fail,
            Some(path) => BadRecordPolicy::Skip(Quarantine::open(path)?),
        },
        ..ReadOptions::default()
    };
    let options = CrossEncoderOptions {
        max_length: job.max_length,
    };
    let model = CrossEncoder::load(&job.model, &options, &job.device)?;
    // Opened before the stage runs, so a missing input is reported as such even when
    // the stage could be reused.
    let reader = open_pairs(&job.input, &read)?;
    let source: ItemSource<(String, String)> = Box::new(reader.map(|pair| {
        pair.map(|p| (p.id, (p.query, p.passage)))
            .map_err(EngineError::from)
    }));
    let settings = Settings {
        stage: SCORES_STAGE,
        model: &fingerprint(&job.model)?,
        max_length: model.max_length(),
    };
    let stage = EmbedStage {
        stage: SCORES_STAGE.into(),
        key: StageKey {
            settings_hash: hash_settings(&settings)?,
            input_hash: hash_file(&job.input)?,
        },
        // Unused by a pair model: the pair tokeniser decides what each side is.
        kind: TextKind::Passage,
        batcher: TokenBudgetBatcher {
            max_tokens: job.batch_tokens.max(1),
            max_rows: job.batch_rows.max(1),
        },
        workers: job.workers,
        cluster: job.cluster.clone(),
        chunk_rows: CHUNK_ROWS,
        total: count_records(&job.input),
        label: "score pairs".into(),
        quiet: job.quiet,
    };
    let output = StageOutput {
        schema: scores_schema(),
        to_batch: Arc::new(scores_batch),
    };
    let scorer = Arc::new(ScorePairs {
        model: Arc::new(model),
    });
    let report = run_device_stage(&store, scorer, source, &stage, output)?;
    write_single_file(&store, &report.completed.stage, &job.output)?;
    let (skipped_records, quarantine) = quarantined(&read)?;
    Ok(ScoreOutcome {
        pairs: report.completed.rows(),
        seconds: report.seconds,
        pairs_per_second: if report.seconds > 0.0 {
            report.rows_embedded as f64 / report.seconds
        } else {
            0.0
        },
        model: job.model.display().to_string(),
        reused: report.reused,
        skipped_records,
        quarantine,
    })
}

/// Copies the scores stage into one Parquet file, written under a temporary name and
/// renamed, so `output` is either absent or whole.
fn write_single_file(store: &StageStore, stage: &str, output: &Path) -> Result<(), EngineError> {
    let parquet = |e: parquet::errors::ParquetError| {
        EngineError::Invalid(format!("cannot write {}: {e}", output.display()))
    };
    write_file_with(output, |file: &mut File, _| {
        let mut writer = ArrowWriter::try_new(file, scores_schema(), None).map_err(parquet)?;
        for batch in store.read(stage)? {
            writer.write(&batch?).map_err(parquet)?;
        }
        writer.close().map_err(parquet)?;
        Ok(())
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is its job
mod tests {
    use super::*;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    const FIXTURE: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/cross_encoders/bert"
    );

    fn read_output(path: &Path) -> Vec<(String, f32)> {
        let file = File::open(path).unwrap();
        let reader = ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap();
        let mut rows = Vec::new();
        for batch in reader {
            let batch = batch.unwrap();
            let ids = batch
                .column(0)
                .as_any()
                .downcast_ref::<StringArray>()
                .unwrap();
            let scores = batch.column(1).as_any().downcast_ref::<Float32Array>();
            let scores = scores.unwrap();
            for i in 0..batch.num_rows() {
                rows.push((ids.value(i).to_string(), scores.value(i)));
            }
        }
        rows
    }

    #[test]
    fn schema_is_id_and_score() {
        let batch = scores_batch(&["a".into(), "b".into()], vec![0.5, -1.0]).unwrap();
        assert_eq!(batch.schema().field(0).name(), "id");
        assert_eq!(batch.schema().field(1).data_type(), &DataType::Float32);
        assert_eq!(batch.num_rows(), 2);
        assert!(scores_batch(&["a".into()], vec![]).is_err());
    }

    #[test]
    fn scores_match_the_model_and_a_rerun_reuses_them() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("pairs.tsv");
        // The same pair twice must score the same; ids are the line numbers.
        std::fs::write(
            &input,
            "tumor suppressor\tp53\na\tb\ntumor suppressor\tp53\n",
        )
        .unwrap();
        let mut job = ScoreJob::new(
            PathBuf::from(FIXTURE),
            input,
            dir.path().join("s.parquet"),
            dir.path().join("run"),
        );
        job.quiet = true;
        let first = run_score(&job).unwrap();
        assert_eq!(first.pairs, 3);
        assert!(!first.reused);
        let rows = read_output(&job.output);
        let ids: Vec<&str> = rows.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(ids, vec!["1", "2", "3"]);
        assert_eq!(rows[0].1, rows[2].1);
        assert_ne!(rows[0].1, rows[1].1);

        let model = CrossEncoder::load(
            Path::new(FIXTURE),
            &CrossEncoderOptions::default(),
            &Device::Cpu,
        )
        .unwrap();
        let tokens = model.tokenize_pairs(&[("a", "b")]).unwrap();
        let direct = model
            .score_batch(&distillery_operators::TokenBatch { rows: tokens })
            .unwrap();
        assert!((direct[0] - rows[1].1).abs() < 1e-5, "{direct:?} {rows:?}");

        std::fs::remove_file(&job.output).unwrap();
        let again = run_score(&job).unwrap();
        assert!(again.reused);
        assert_eq!(again.pairs, 3);
        assert_eq!(read_output(&job.output), rows);
    }
}
