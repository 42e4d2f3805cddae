//! The engine's errors. Those about user input name the file, the line (1-based) and
//! the field ([`BadRecord`], re-exported from its leaf module).

use std::path::PathBuf;

pub use crate::bad_record::{BadRecord, Location};

/// Everything a stage of the engine can fail with.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// An input file is missing, unreadable or has a bad record.
    #[error(transparent)]
    Corpus(#[from] crate::corpus::CorpusError),
    /// The stage store failed (disk, corrupt manifest).
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// A model failed to load or to run.
    #[error(transparent)]
    Model(#[from] distillery_operators::OperatorError),
    /// Building or reading an Arrow batch failed.
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    /// A tensor operation outside a model failed.
    #[error("tensor operation: {0}")]
    Tensor(#[from] candle_core::Error),
    /// A file the engine writes (a report, a run file) could not be written.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The dataflow could not start or a worker failed.
    #[error("dataflow: {0}")]
    Dataflow(String),
    /// Inputs that are each valid but do not fit together.
    #[error("{0}")]
    Invalid(String),
}
