//! Errors about user input: each names the file, the line (1-based) and the field.

use std::fmt;
use std::path::PathBuf;

/// Where in an input a problem sits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub file: PathBuf,
    /// 1-based line (text formats) or row (Parquet); 0 when the problem is the whole file.
    pub line: u64,
    /// The field at fault, when one is.
    pub field: Option<String>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}", self.line)?;
        }
        if let Some(field) = &self.field {
            write!(f, " field `{field}`")?;
        }
        Ok(())
    }
}

/// A record that cannot be read as what it should be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{location}: {reason}")]
pub struct BadRecord {
    pub location: Location,
    /// What was expected and what was found, in words.
    pub reason: String,
}

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
