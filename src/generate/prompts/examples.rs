//! Few-shot pools: their file format and the seeded draw of examples for one prompt.
//!
//! A pool file is JSON lines, one example per line with string fields `passage` and
//! `query` (other fields are ignored; blank lines are skipped). A line that is not UTF-8,
//! not a JSON object, or lacks a non-empty string `passage` or `query` is an error naming
//! the file, the line and the field.

use std::path::Path;

use serde_json::Value;

use super::PromptError;
use crate::bad_record::{BadRecord, Location};

/// One (passage, query) example of a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FewShotExample {
    pub passage: String,
    pub query: String,
}

/// The examples of the pool file at `path`.
pub fn read_examples(path: &Path) -> Result<Vec<FewShotExample>, PromptError> {
    let bytes = std::fs::read(path).map_err(|source| PromptError::Io {
        path: path.to_owned(),
        source,
    })?;
    parse_example_lines(path, &bytes)
}

/// `shots` distinct indices below `n` (`shots <= n`), in draw order: a partial
/// Fisher-Yates shuffle of `0..n` driven by [`SplitMix64`] seeded with `seed`.
pub fn draw(n: usize, shots: usize, seed: u64) -> Vec<usize> {
    let mut rng = SplitMix64(seed);
    let mut indices: Vec<usize> = (0..n).collect();
    let shots = shots.min(n);
    for i in 0..shots {
        let j = i + rng.below(n - i);
        indices.swap(i, j);
    }
    indices.truncate(shots);
    indices
}

/// SplitMix64 (Steele, Lea and Flood, 2014): a tiny seeded generator whose every output
/// is a fixed function of the seed, on every platform.
pub(super) struct SplitMix64(pub(super) u64);

impl SplitMix64 {
    pub(super) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// An index below `n` (`n > 0`): the high 64 bits of `next() * n`.
    pub(super) fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next()) * n as u128) >> 64) as usize
    }
}

/// Examples from JSON lines (see the module docs).
pub(super) fn parse_example_lines(
    path: &Path,
    bytes: &[u8],
) -> Result<Vec<FewShotExample>, PromptError> {
    let mut examples = Vec::new();
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = i as u64 + 1;
        let bad = |field: Option<&str>, reason: String| {
            PromptError::Bad(BadRecord {
                location: Location {
                    file: path.to_owned(),
                    line,
                    field: field.map(str::to_owned),
                },
                reason,
            })
        };
        let text = std::str::from_utf8(raw).map_err(|e| bad(None, format!("not UTF-8 ({e})")))?;
        if text.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(text)
            .map_err(|e| bad(None, format!("not a JSON object ({e})")))?;
        let Value::Object(object) = value else {
            return Err(bad(
                None,
                "expected a JSON object with `passage` and `query`".into(),
            ));
        };
        let field = |name: &str| -> Result<String, PromptError> {
            match object.get(name) {
                Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.trim().to_owned()),
                Some(Value::String(_)) => Err(bad(Some(name), "is empty".into())),
                Some(other) => Err(bad(
                    Some(name),
                    format!("expected a string, found {}", json_kind(other)),
                )),
                None => Err(bad(Some(name), "is missing".into())),
            }
        };
        let passage = field("passage")?;
        let query = field("query")?;
        examples.push(FewShotExample { passage, query });
    }
    Ok(examples)
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is its job
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn splitmix_matches_its_published_first_outputs() {
        // Seed 1234567: the values every SplitMix64 gives (checked against a Python
        // transcription of the algorithm, and the Rosetta Code task of the same name).
        let mut rng = SplitMix64(1234567);
        let first: Vec<u64> = (0..3).map(|_| rng.next()).collect();
        assert_eq!(
            first,
            [
                6457827717110365317,
                3203168211198807973,
                9817491932198370423
            ]
        );
    }

    #[test]
    fn the_draw_is_deterministic_without_replacement_and_varies_with_the_seed() {
        let a = draw(12, 3, 11);
        assert_eq!(a.len(), 3);
        assert_eq!(a, draw(12, 3, 11));
        let distinct: HashSet<usize> = a.iter().copied().collect();
        assert_eq!(distinct.len(), 3);
        assert!(a.iter().all(|&i| i < 12));
        let draws: HashSet<Vec<usize>> = (0..50).map(|s| draw(12, 3, s)).collect();
        assert!(draws.len() > 40, "{} distinct draws of 50", draws.len());
        // Over 12,000 seeds each example is drawn 3,000 times in expectation (standard
        // deviation 47); 2,700..3,300 is more than six of them.
        let mut counts = [0usize; 12];
        for s in 0..12_000u64 {
            for i in draw(12, 3, s) {
                counts[i] += 1;
            }
        }
        assert!(
            counts.iter().all(|&c| (2_700..3_300).contains(&c)),
            "{counts:?}"
        );
        // All of a pool, in a shuffled order; nothing from an empty pool.
        let mut all = draw(5, 5, 3);
        all.sort_unstable();
        assert_eq!(all, [0, 1, 2, 3, 4]);
        assert!(draw(0, 0, 3).is_empty());
    }

    #[test]
    fn bad_example_lines_are_named_by_file_line_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.jsonl");
        let cases: [(&[u8], &str); 6] = [
            (
                b"{\"passage\": \"p\", \"query\": \"q\"}\n{\"passage\": \"p\"}\n",
                ":2 field `query`: is missing",
            ),
            (
                b"\n\n{\"passage\": 3, \"query\": \"q\"}",
                ":3 field `passage`: expected a string, found a number",
            ),
            (
                b"{\"passage\": \"p\", \"query\": \"  \"}",
                ":1 field `query`: is empty",
            ),
            (b"[1, 2]", ":1: expected a JSON object"),
            (b"{\"passage\": \"p\",", ":1: not a JSON object"),
            (
                b"{\"passage\": \"p\", \"query\": \"q\"}\n\xff\n",
                ":2: not UTF-8",
            ),
        ];
        for (contents, expected) in cases {
            std::fs::write(&path, contents).unwrap();
            let err = read_examples(&path).unwrap_err();
            let message = err.to_string();
            assert!(
                message.starts_with(&path.display().to_string()),
                "{message}"
            );
            assert!(message.contains(expected), "{message} lacks {expected}");
        }
        let missing = dir.path().join("none.jsonl");
        let err = read_examples(&missing).unwrap_err();
        assert!(err.to_string().contains("none.jsonl"), "{err}");
    }
}
