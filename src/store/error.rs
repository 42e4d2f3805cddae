//! The one error type of the stage store. Every variant that comes from the filesystem or
//! from a file's contents names the path it concerns.

use std::path::PathBuf;

/// What can go wrong while opening, writing or reading a run directory.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A filesystem call failed; `op` says which (create, write, sync, rename, ...).
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The Parquet library failed to write or decode a part.
    #[error("parquet part {}: {source}", path.display())]
    Parquet {
        path: PathBuf,
        #[source]
        source: parquet::errors::ParquetError,
    },
    /// Decoding a part's rows into Arrow arrays failed.
    #[error("arrow data of part {}: {source}", path.display())]
    Arrow {
        path: PathBuf,
        #[source]
        source: arrow::error::ArrowError,
    },
    /// The manifest is not JSON of the manifest's shape.
    #[error("manifest {} is not readable: {source}", path.display())]
    ManifestCorrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// The manifest was written in a format version this build does not read.
    #[error("manifest {} has format {found}; this build reads format {expected}", path.display())]
    ManifestFormat {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    /// The manifest parses but names something the store never writes (a bad stage or part
    /// name, which would otherwise be joined into a path).
    #[error("manifest {} is invalid: {reason}", path.display())]
    ManifestInvalid { path: PathBuf, reason: String },
    /// A stage name outside lowercase ASCII letters, digits, `-` and `_`, or empty.
    #[error("invalid stage name {name:?}: use 1 to 64 of a-z, 0-9, '-', '_'")]
    InvalidStageName { name: String },
    /// The stage has no entry in the manifest.
    #[error("stage `{stage}` has never been written in this run")]
    UnknownStage { stage: String },
    /// `begin` was called for a stage already complete with the same key.
    #[error("stage `{stage}` is already complete with this key; use `completed` to read it")]
    AlreadyComplete { stage: String },
    /// `begin` was called for a stage that already has an open writer.
    #[error("stage `{stage}` already has an open writer")]
    StageBusy { stage: String },
    /// A batch handed to a writer does not have the stage's schema.
    #[error("batch for stage `{stage}` has columns [{found}], the stage has [{expected}]")]
    SchemaMismatch {
        stage: String,
        expected: String,
        found: String,
    },
    /// Settings could not be turned into JSON for hashing (e.g. a map with non-string keys).
    #[error("settings cannot be hashed: {source}")]
    Settings {
        #[source]
        source: serde_json::Error,
    },
    /// A resumed stage's committed rows do not fit the output being written again: more
    /// rows than the output has, or parts not cut at the chunk size. The stage's key
    /// promised the same output; this is a bug, not a user error.
    #[error(
        "stage `{stage}`: {committed} rows committed, but the output has {rows} rows in \
         parts of {chunk_rows}; this is a bug"
    )]
    ResumeMismatch {
        stage: String,
        committed: u64,
        rows: u64,
        chunk_rows: u64,
    },
    /// A memo table's stage holds something a memo cannot (a bad key, a missing row).
    #[error("memo stage `{stage}`: {reason}")]
    Memo { stage: String, reason: String },
    /// Another process has the run directory open.
    #[error(
        "run directory {} is in use by another distillery process; wait for it to end, \
         or give this run another directory",
        run_dir.display()
    )]
    RunLocked { run_dir: PathBuf },
    /// A committed part's file differs from what the manifest recorded for it.
    #[error("part {} is damaged: {reason}", path.display())]
    PartDamaged { path: PathBuf, reason: String },
}

impl StoreError {
    /// A closure for `map_err` that names the operation and the path of an IO failure.
    pub(crate) fn io(
        op: &'static str,
        path: &std::path::Path,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_path_buf();
        move |source| StoreError::Io { op, path, source }
    }
}
