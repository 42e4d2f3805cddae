//! Errors of the model-facing operators. Each names the file or tensor at fault.

use std::path::PathBuf;

/// Everything that can go wrong loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    /// A file the model directory must have is absent.
    #[error("model directory {dir}: missing {file} ({why})")]
    MissingFile {
        dir: PathBuf,
        file: &'static str,
        why: &'static str,
    },
    /// A file exists but cannot be read.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A JSON configuration file does not parse as what it should be.
    #[error("{path}: not a valid {what}: {message}")]
    BadConfig {
        path: PathBuf,
        what: &'static str,
        message: String,
    },
    /// The configuration names something distillery does not implement.
    #[error("{path}: unsupported {what} `{value}` (supported: {supported})")]
    Unsupported {
        path: PathBuf,
        what: &'static str,
        value: String,
        supported: &'static str,
    },
    /// A weight is absent or has the wrong shape.
    #[error("{path}: tensor `{name}`: {message}")]
    BadTensor {
        path: PathBuf,
        name: String,
        message: String,
    },
    /// The tokenizer failed to load or to encode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The CPU path forced through `DISTILLERY_CPU` (or asked for by a caller) names no
    /// path or needs features this CPU lacks.
    #[error("{0}")]
    CpuPath(#[from] crate::cpu_path::CpuPathError),
    /// A tensor operation failed (a bug or an out-of-memory, never user input).
    #[error("tensor operation: {0}")]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, OperatorError>;
