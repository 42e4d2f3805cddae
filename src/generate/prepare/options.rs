//! The options of passage preparation: what the config says, with the recipe's defaults.

use serde::{Deserialize, Serialize};

/// Passages are truncated to this many characters for generation (the recipe's 2,048).
pub const DEFAULT_MAX_CHARS: usize = 2048;
/// Passages with fewer characters than this (after truncation, trimmed) are dropped.
pub const DEFAULT_MIN_CHARS: usize = 10;
/// A passage is a near duplicate when it is contained in one of this many passages that
/// follow it in sorted order.
pub const DEFAULT_DEDUP_WINDOW: usize = 9;
/// At most this many passages per corpus go to generation.
pub const DEFAULT_MAX_PASSAGES: usize = 100_000;
/// Passages held out as a synthetic test set.
pub const DEFAULT_HELD_OUT: usize = 100;
/// The seed of sampling and held-out choice when none is given (the config's default).
pub const DEFAULT_SEED: u64 = 42;

/// How passages are prepared. Every field has the recipe's default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrepareOptions {
    /// Characters of text kept per passage.
    pub max_chars: usize,
    /// Fewer characters than this (truncated, trimmed) and the passage is dropped.
    pub min_chars: usize,
    /// Whether the near-duplicate rule runs.
    pub dedup: bool,
    /// How many following passages (in sorted order) a passage is checked against.
    pub dedup_window: usize,
    /// At most this many passages are kept; `None` keeps all.
    pub max_passages: Option<usize>,
    /// How many passage ids are held out as a synthetic test set.
    pub held_out: usize,
    /// Seed of the id hash that samples and holds out; pass the seed `mine` uses for
    /// held-out passages so that both agree.
    pub seed: u64,
}

impl Default for PrepareOptions {
    fn default() -> Self {
        Self {
            max_chars: DEFAULT_MAX_CHARS,
            min_chars: DEFAULT_MIN_CHARS,
            dedup: true,
            dedup_window: DEFAULT_DEDUP_WINDOW,
            max_passages: Some(DEFAULT_MAX_PASSAGES),
            held_out: DEFAULT_HELD_OUT,
            seed: DEFAULT_SEED,
        }
    }
}

impl PrepareOptions {
    /// Checks that the options fit together; the error names the field.
    pub fn check(&self) -> Result<(), PrepareError> {
        if self.max_chars == 0 {
            return Err(PrepareError::Options {
                field: "max_chars",
                reason: "must be at least 1".into(),
            });
        }
        if self.min_chars > self.max_chars {
            return Err(PrepareError::Options {
                field: "min_chars",
                reason: format!(
                    "is {} but passages are truncated to max_chars = {}: every passage would be dropped",
                    self.min_chars, self.max_chars
                ),
            });
        }
        if self.dedup && self.dedup_window == 0 {
            return Err(PrepareError::Options {
                field: "dedup_window",
                reason: "must be at least 1 when dedup is on".into(),
            });
        }
        if let Some(max) = self.max_passages {
            if self.held_out > max {
                return Err(PrepareError::Options {
                    field: "held_out",
                    reason: format!(
                        "is {} but at most max_passages = {max} passages are sampled; \
                         the held-out passages must fit in the sample",
                        self.held_out
                    ),
                });
            }
        }
        Ok(())
    }
}

/// Why preparation cannot run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrepareError {
    /// Options that do not fit together; names the field.
    #[error("passage preparation: `{field}` {reason}")]
    Options { field: &'static str, reason: String },
    /// The same id twice in the input.
    #[error("passage id `{id}` appears twice (records {first} and {second}, 1-based)")]
    DuplicateId {
        id: String,
        first: usize,
        second: usize,
    },
    /// A spill file of preparation could not be written or read back.
    #[error("passage preparation: spill file {}: {reason}", path.display())]
    Spill {
        path: std::path::PathBuf,
        reason: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(options: PrepareOptions) -> Option<&'static str> {
        match options.check() {
            Ok(()) => None,
            Err(PrepareError::Options { field, .. }) => Some(field),
            Err(other) => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn each_check_names_its_field() {
        let d = PrepareOptions::default;
        assert_eq!(field_of(d()), None);
        assert_eq!(
            field_of(PrepareOptions {
                max_chars: 0,
                ..d()
            }),
            Some("max_chars")
        );
        let min = PrepareOptions {
            min_chars: 11,
            max_chars: 10,
            ..d()
        };
        assert_eq!(field_of(min), Some("min_chars"));
        let window = PrepareOptions {
            dedup_window: 0,
            ..d()
        };
        assert_eq!(field_of(window), Some("dedup_window"));
        let off = PrepareOptions {
            dedup_window: 0,
            dedup: false,
            ..d()
        };
        assert_eq!(field_of(off), None);
        let held = PrepareOptions {
            held_out: 5,
            max_passages: Some(4),
            ..d()
        };
        assert_eq!(field_of(held), Some("held_out"));
        let all = PrepareOptions {
            held_out: 5,
            max_passages: None,
            ..d()
        };
        assert_eq!(field_of(all), None);
    }
}
