//! `distillery embed`: embed any passages or queries file into one Parquet file
//! (`id`, `embedding`), through the same dataflow as every stage.

use std::fs::File;
use std::path::{Path, PathBuf};

use distillery_operators::TextKind;
use parquet::arrow::ArrowWriter;
use serde::Serialize;

use crate::config::cluster::Cluster;
use crate::config::EmbedSettings;
use crate::corpus::count_records;
use crate::corpus::open_queries;
use crate::corpus::quarantined;
use crate::dataflow::passage_texts;
use crate::dataflow::{run_embed_stage, EmbedStage, TextSource};
use crate::error::EngineError;
use crate::model::{fingerprint, ResolvedModel};
use crate::schema::embeddings_schema;
use crate::store::hash_file;
use crate::store::{hash_settings, write_file_with, StageKey, StageStore};

/// Everything `distillery embed` needs, resolved.
#[derive(Debug, Clone)]
pub struct EmbedJob {
    pub embed: EmbedSettings,
    pub input: PathBuf,
    pub output: PathBuf,
    pub kind: TextKind,
    /// Where the stage's parts are kept while running (and for resume).
    pub run_dir: PathBuf,
    /// The processes the embedding runs over; process 0 reads, writes and leads.
    pub cluster: Cluster,
}

/// What `distillery embed` measured; model loading is excluded from the rate.
#[derive(Debug, Clone, Serialize)]
pub struct EmbedOutcome {
    pub passages: u64,
    /// Texts taken from the run's memo table (embedded by an earlier invocation).
    pub memoised: u64,
    pub seconds: f64,
    pub passages_per_second: f64,
    pub dim: usize,
    pub model: String,
    pub reused: bool,
    pub padding_fraction: f64,
    /// Bad records skipped (with `--on-bad-record skip`) and where they were written.
    pub skipped_records: u64,
    pub quarantine: Option<PathBuf>,
}

#[derive(Serialize)]
struct Settings<'a> {
    stage: &'a str,
    model: &'a str,
    max_seq_length: usize,
    prefix: &'a str,
    kind: &'a str,
}

/// Runs the job (on process 0 of `job.cluster`, which leads it).
pub fn run_embed(job: &EmbedJob) -> Result<(EmbedOutcome, ResolvedModel), EngineError> {
    if !job.cluster.is_leader() {
        return Err(EngineError::Invalid(format!(
            "process {} follows process 0: it serves (dataflow::cluster::serve)",
            job.cluster.process
        )));
    }
    let store = StageStore::open(&job.run_dir)?;
    let read = job.embed.read_options()?;
    let (embedder, resolved) =
        job.embed
            .load_embedder(&job.input, &read, &job.run_dir.join("tiny-model"))?;
    let (source, kind_name): (TextSource, &str) = match job.kind {
        TextKind::Passage => (passage_texts(&job.input, &read)?, "passage"),
        TextKind::Query => {
            let reader = open_queries(&job.input, &read)?;
            let src = reader.map(|q| q.map(|q| (q.id, q.text)).map_err(EngineError::from));
            (Box::new(src), "query")
        }
    };
    let model = fingerprint(&resolved.dir)?;
    let settings = Settings {
        stage: "embeddings",
        model: &model,
        max_seq_length: embedder.max_seq_length(),
        prefix: embedder.prefix(job.kind),
        kind: kind_name,
    };
    let stage = EmbedStage {
        stage: "embeddings".into(),
        key: StageKey {
            settings_hash: hash_settings(&settings)?,
            input_hash: hash_file(&job.input)?,
        },
        kind: job.kind,
        batcher: job.embed.batcher(),
        workers: job.embed.workers,
        cluster: job.cluster.clone(),
        chunk_rows: crate::dataflow::CHUNK_ROWS,
        total: count_records(&job.input),
        label: format!("embed {kind_name}s"),
        quiet: job.embed.quiet,
    };
    let report = run_embed_stage(&store, embedder.clone(), source, &stage)?;
    write_single_file(&store, &report.completed.stage, embedder.dim(), &job.output)?;
    let ex = report.executor;
    let (skipped_records, quarantine) = quarantined(&read)?;
    Ok((
        EmbedOutcome {
            skipped_records,
            quarantine,
            passages: report.completed.rows(),
            memoised: report.rows_memoised,
            seconds: report.seconds,
            passages_per_second: if report.seconds > 0.0 {
                report.rows_embedded as f64 / report.seconds
            } else {
                0.0
            },
            dim: embedder.dim(),
            model: resolved.dir.display().to_string(),
            reused: report.reused,
            padding_fraction: if ex.padded_tokens > 0 {
                1.0 - ex.real_tokens as f64 / ex.padded_tokens as f64
            } else {
                0.0
            },
        },
        resolved,
    ))
}

/// Copies a stage into one Parquet file, written under a temporary name and renamed, so
/// `output` is either absent or whole.
fn write_single_file(
    store: &StageStore,
    stage: &str,
    dim: usize,
    output: &Path,
) -> Result<(), EngineError> {
    write_file_with(output, |file: &mut File, _| {
        let parquet = |e| EngineError::Invalid(format!("{}: {e}", output.display()));
        let mut w = ArrowWriter::try_new(file, embeddings_schema(dim), None).map_err(parquet)?;
        for batch in store.read(stage)? {
            w.write(&batch?).map_err(parquet)?;
        }
        w.close().map_err(parquet)?;
        Ok(())
    })
}
