//! Where a bad input record sits, and why it is bad: the one error type every reader of
//! user files reports (file, 1-based line or row, field), whatever the format. A leaf:
//! readers depend on it and nothing here depends on them.

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
