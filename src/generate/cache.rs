//! The query cache: every outcome a generator gave, keyed by what decides it.
//!
//! Contracts:
//! - A row's key is [`cache_key`] of (passage hash, query type, generator id, prompt
//!   hash, seed, and what else the generator says the request depends on): the same
//!   passage text under the same prompt, generator and seed is never generated twice,
//!   across runs, corpus changes and passage renames; an edited passage (another hash) is
//!   generated anew, and only its own queries (and, for the extractive generator's
//!   keyword queries, those whose terms' document frequencies the change moved).
//! - The cache is an append-only stage of the run directory (one per generator id, named
//!   from a hash, never from user input). Each chunk of outcomes is one atomic Parquet
//!   part, so a killed run keeps everything committed before the kill and resumes after
//!   it.
//! - Failures are kept too (status `failed`, with the reason) so the run's report can
//!   show them, but [`read_cache`] serves only queries: a rerun tries failed requests
//!   again (a server that was down may be up).

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, StringArray, UInt32Array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;

use crate::error::EngineError;
use crate::generate::Generated;
use crate::store::{ContentHasher, StageKey, StageStatus, StageStore};

pub const COL_KEY: &str = "key";
pub const COL_PASSAGE_ID: &str = "passage_id";
pub const COL_QUERY_TYPE: &str = "query_type";
pub const COL_STATUS: &str = "status";
pub const COL_TEXT: &str = "text";
pub const COL_RAW: &str = "raw";
pub const COL_REASON: &str = "reason";
pub const COL_TOKENS: &str = "tokens";

const STATUS_OK: &str = "ok";
const STATUS_FAILED: &str = "failed";

/// The key of one generated query; see the module contracts. `inputs` is what else the
/// request depends on ([`crate::generate::QueryGenerator::request_inputs`]).
pub fn cache_key(
    passage_hash: &str,
    query_type: &str,
    generator_id: &str,
    prompt_hash: &str,
    seed: u64,
    inputs: Option<&str>,
) -> String {
    let mut h = ContentHasher::new();
    h.field(passage_hash)
        .field(query_type)
        .field(generator_id)
        .field(prompt_hash)
        .field(seed.to_string());
    if let Some(inputs) = inputs {
        h.field(inputs);
    }
    h.finish()
}

/// The cache stage of a generator and its (fixed) stage key.
pub fn cache_stage(generator_id: &str) -> (String, StageKey) {
    let mut h = ContentHasher::new();
    h.field(generator_id);
    let hash = h.finish();
    let stage = format!("queries-{}-cache", &hash[..16]);
    let key = StageKey {
        settings_hash: hash,
        input_hash: "append-only cache".into(),
    };
    (stage, key)
}

/// One outcome as the cache holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedOutcome {
    pub key: String,
    pub passage_id: String,
    pub query_type: String,
    pub outcome: Generated,
}

/// The cache's schema.
pub fn cache_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(COL_KEY, DataType::Utf8, false),
        Field::new(COL_PASSAGE_ID, DataType::Utf8, false),
        Field::new(COL_QUERY_TYPE, DataType::Utf8, false),
        Field::new(COL_STATUS, DataType::Utf8, false),
        Field::new(COL_TEXT, DataType::Utf8, true),
        Field::new(COL_RAW, DataType::Utf8, true),
        Field::new(COL_REASON, DataType::Utf8, true),
        Field::new(COL_TOKENS, DataType::UInt32, false),
    ]))
}

/// Outcomes as one batch of [`cache_schema`].
pub fn cache_batch(rows: &[CachedOutcome]) -> Result<RecordBatch, ArrowError> {
    let strings = |f: &dyn Fn(&CachedOutcome) -> Option<&str>| -> ArrayRef {
        Arc::new(rows.iter().map(f).collect::<StringArray>())
    };
    let columns: Vec<ArrayRef> = vec![
        strings(&|r| Some(&r.key)),
        strings(&|r| Some(&r.passage_id)),
        strings(&|r| Some(&r.query_type)),
        strings(&|r| {
            Some(match r.outcome {
                Generated::Query { .. } => STATUS_OK,
                Generated::Failed { .. } => STATUS_FAILED,
            })
        }),
        strings(&|r| match &r.outcome {
            Generated::Query { text, .. } => Some(text),
            Generated::Failed { .. } => None,
        }),
        strings(&|r| match &r.outcome {
            Generated::Query { raw, .. } => Some(raw),
            Generated::Failed { .. } => None,
        }),
        strings(&|r| match &r.outcome {
            Generated::Query { .. } => None,
            Generated::Failed { reason } => Some(reason),
        }),
        Arc::new(
            rows.iter()
                .map(|r| match r.outcome {
                    Generated::Query { tokens, .. } => u32::try_from(tokens).unwrap_or(u32::MAX),
                    Generated::Failed { .. } => 0,
                })
                .collect::<UInt32Array>(),
        ),
    ];
    RecordBatch::try_new(cache_schema(), columns)
}

fn column<'a, T: 'static>(
    batch: &'a RecordBatch,
    name: &str,
    stage: &str,
) -> Result<&'a T, EngineError> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<T>())
        .ok_or_else(|| {
            EngineError::Invalid(format!(
                "stage {stage}: not a query cache (column `{name}` missing or mistyped)"
            ))
        })
}

/// Reads a batch of the cache back into outcomes.
pub fn outcomes_from_batch(
    batch: &RecordBatch,
    stage: &str,
) -> Result<Vec<CachedOutcome>, EngineError> {
    let key = column::<StringArray>(batch, COL_KEY, stage)?;
    let passage = column::<StringArray>(batch, COL_PASSAGE_ID, stage)?;
    let qtype = column::<StringArray>(batch, COL_QUERY_TYPE, stage)?;
    let status = column::<StringArray>(batch, COL_STATUS, stage)?;
    let text = column::<StringArray>(batch, COL_TEXT, stage)?;
    let raw = column::<StringArray>(batch, COL_RAW, stage)?;
    let reason = column::<StringArray>(batch, COL_REASON, stage)?;
    let tokens = column::<UInt32Array>(batch, COL_TOKENS, stage)?;
    let opt = |a: &StringArray, i: usize| (!a.is_null(i)).then(|| a.value(i).to_string());
    (0..batch.num_rows())
        .map(|i| {
            let outcome = match status.value(i) {
                STATUS_OK => Generated::Query {
                    text: opt(text, i).unwrap_or_default(),
                    raw: opt(raw, i).unwrap_or_default(),
                    tokens: tokens.value(i) as usize,
                },
                STATUS_FAILED => Generated::Failed {
                    reason: opt(reason, i).unwrap_or_default(),
                },
                other => {
                    return Err(EngineError::Invalid(format!(
                        "stage {stage}: unknown status `{other}` in row {i}"
                    )))
                }
            };
            Ok(CachedOutcome {
                key: key.value(i).to_string(),
                passage_id: passage.value(i).to_string(),
                query_type: qtype.value(i).to_string(),
                outcome,
            })
        })
        .collect()
}

/// The generated queries of the cache stage by key (failures are not served: see the
/// module contracts).
pub fn read_cache(
    store: &StageStore,
    stage: &str,
    key: &StageKey,
) -> Result<HashMap<String, CachedOutcome>, EngineError> {
    let mut known = HashMap::new();
    if !matches!(store.status(stage, key)?, StageStatus::Partial { .. }) {
        return Ok(known);
    }
    for batch in store.read(stage)? {
        for row in outcomes_from_batch(&batch?, stage)? {
            if matches!(row.outcome, Generated::Query { .. }) {
                known.insert(row.key.clone(), row);
            }
        }
    }
    Ok(known)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(key: &str, outcome: Generated) -> CachedOutcome {
        CachedOutcome {
            key: key.into(),
            passage_id: "p1".into(),
            query_type: "question".into(),
            outcome,
        }
    }

    #[test]
    fn outcomes_round_trip_and_failures_are_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let store = StageStore::open(dir.path()).unwrap();
        let (stage, key) = cache_stage("extractive-v1");
        assert!(stage.starts_with("queries-") && stage.ends_with("-cache"));
        let ok = Generated::Query {
            text: "what is rust".into(),
            raw: "\"what is rust\"\n".into(),
            tokens: 4,
        };
        let failed = Generated::Failed {
            reason: "passage p1, question: HTTP 500 after 6 attempts".into(),
        };
        let rows = vec![row("a", ok.clone()), row("b", failed.clone())];
        let batch = cache_batch(&rows).unwrap();
        assert_eq!(outcomes_from_batch(&batch, &stage).unwrap(), rows);

        let mut writer = store.begin(&stage, key.clone(), cache_schema()).unwrap();
        writer.write_part(&[batch]).unwrap();
        drop(writer);
        let known = read_cache(&store, &stage, &key).unwrap();
        assert_eq!(known.len(), 1);
        assert_eq!(known["a"].outcome, ok);

        // A rerun that generated the failed request is served its query.
        let mut writer = store.begin(&stage, key.clone(), cache_schema()).unwrap();
        writer
            .write_part(&[cache_batch(&[row("b", ok.clone())]).unwrap()])
            .unwrap();
        drop(writer);
        let known = read_cache(&store, &stage, &key).unwrap();
        assert_eq!(known.len(), 2);
    }

    #[test]
    fn the_key_changes_with_each_part() {
        let base = cache_key("h", "question", "g", "p", 1, None);
        assert_eq!(base, cache_key("h", "question", "g", "p", 1, None));
        for other in [
            cache_key("h2", "question", "g", "p", 1, None),
            cache_key("h", "claim", "g", "p", 1, None),
            cache_key("h", "question", "g2", "p", 1, None),
            cache_key("h", "question", "g", "p2", 1, None),
            cache_key("h", "question", "g", "p", 2, None),
            cache_key("h", "question", "g", "p", 1, Some("df")),
        ] {
            assert_ne!(base, other);
        }
    }
}
