//! A keyed memo table: an append-only stage whose rows are keyed by the hash of what
//! they were computed from, and an index from key to row.
//!
//! A model operator whose output for an item depends only on the item and its settings
//! (an embedding of a text) asks the table first and sends only the misses to the
//! device; the misses' rows are appended as new parts. The stage is never complete: each
//! run appends, a killed run keeps every whole part it committed, and a row is never
//! written twice under one key by one run. The table's stage key holds the settings hash:
//! other settings are another table.
//!
//! Rows carry their key in the `id` column as [`MemoKey::to_hex`]; the rest of the schema
//! is the caller's. [`MemoIndex`] holds 24 bytes per row in memory (key and row number),
//! not the rows; [`MemoRows`] reads parts back on demand, keeping the last few decoded.

use std::collections::{HashMap, VecDeque};

use arrow::array::{Array, StringArray};
use arrow::record_batch::RecordBatch;

use super::error::StoreError;
use super::manifest::PartEntry;
use super::{StageKey, StageStatus, StageStore};

/// The input hash of every memo table's stage key: a memo's identity is its settings.
pub const MEMO_INPUT: &str = "append-only memo";

/// Decoded parts [`MemoRows`] keeps: a rerun reads its rows almost in the order they were
/// written, so a few parts serve nearly every lookup.
const PARTS_KEPT: usize = 4;

/// A memo key: the first 128 bits of blake3 of what the row was computed from (a text).
/// A collision between two of a run's texts has probability ~n^2 / 2^129.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MemoKey(pub u128);

impl MemoKey {
    pub fn of(bytes: &[u8]) -> Self {
        let hash = blake3::hash(bytes);
        let mut first = [0u8; 16];
        first.copy_from_slice(&hash.as_bytes()[..16]);
        MemoKey(u128::from_be_bytes(first))
    }

    /// 32 lowercase hex digits.
    pub fn to_hex(self) -> String {
        format!("{:032x}", self.0)
    }

    pub fn from_hex(hex: &str) -> Option<Self> {
        (hex.len() == 32)
            .then(|| u128::from_str_radix(hex, 16).ok())
            .flatten()
            .map(MemoKey)
    }
}

/// Hashes a key that is already a uniform hash (a [`MemoKey`], a term's 64-bit hash) for
/// a hash table by taking its low 64 bits: hashing it again (the standard library's
/// SipHash) only costs time, which tables of millions of keys (a teacher's pair scores)
/// feel.
#[derive(Debug, Clone, Copy, Default)]
pub struct PrehashedHasher(u64);

impl std::hash::Hasher for PrehashedHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write_u128(&mut self, key: u128) {
        self.0 = key as u64;
    }

    fn write_u64(&mut self, key: u64) {
        self.0 = key;
    }

    /// Any other input (never a prehashed key's): FNV-1a over the bytes.
    fn write(&mut self, bytes: &[u8]) {
        const PRIME: u64 = 0x0000_0100_0000_01b3;
        let mut h = self.0 ^ 0xcbf2_9ce4_8422_2325;
        for &b in bytes {
            h = (h ^ u64::from(b)).wrapping_mul(PRIME);
        }
        self.0 = h;
    }
}

/// Builds [`PrehashedHasher`]s.
pub type BuildPrehashedHasher = std::hash::BuildHasherDefault<PrehashedHasher>;
/// A map from [`MemoKey`]s.
pub type MemoMap<V> = HashMap<MemoKey, V, BuildPrehashedHasher>;

/// The key of memo table `settings_hash`'s stage.
pub fn memo_stage_key(settings_hash: &str) -> StageKey {
    StageKey {
        settings_hash: settings_hash.to_string(),
        input_hash: MEMO_INPUT.to_string(),
    }
}

/// Where every key of a memo table is: the row number over the committed parts.
#[derive(Debug, Default)]
pub struct MemoIndex {
    rows: MemoMap<u64>,
    parts: Vec<PartEntry>,
    /// The first row number of each part.
    starts: Vec<u64>,
}

impl MemoIndex {
    /// Reads the keys of `stage`'s committed parts when it is a memo under
    /// `settings_hash`; empty when the stage is absent or holds something else.
    pub fn load(
        store: &StageStore,
        stage: &str,
        settings_hash: &str,
    ) -> Result<MemoIndex, StoreError> {
        let mut index = MemoIndex::default();
        index.refresh(store, stage, settings_hash)?;
        Ok(index)
    }

    /// Adds the keys of the parts committed since the index was read (a run appended
    /// them); reads everything again if the parts it holds are not the stage's first.
    pub fn refresh(
        &mut self,
        store: &StageStore,
        stage: &str,
        settings_hash: &str,
    ) -> Result<(), StoreError> {
        let key = memo_stage_key(settings_hash);
        let parts = match store.status(stage, &key)? {
            StageStatus::Partial { .. } | StageStatus::Complete(_) => {
                store.committed_parts(stage)?
            }
            _ => Vec::new(),
        };
        if !parts.starts_with(&self.parts) {
            *self = MemoIndex::default();
        }
        let mut row = match (self.starts.last(), self.parts.last()) {
            (Some(start), Some(last)) => start + last.rows,
            _ => 0,
        };
        for part in parts.into_iter().skip(self.parts.len()) {
            self.starts.push(row);
            let reader = store.read_parts(stage, vec![part.clone()]);
            for batch in reader {
                let batch = batch?;
                for key in memo_keys(stage, &batch)? {
                    // The first row of a key wins (a later one would be the same value).
                    self.rows.entry(key).or_insert(row);
                    row += 1;
                }
            }
            self.parts.push(part);
        }
        Ok(())
    }

    pub fn contains(&self, key: &MemoKey) -> bool {
        self.rows.contains_key(key)
    }

    /// Keys held.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The part (index into the committed parts) and the row inside it holding `key`.
    pub fn locate(&self, key: &MemoKey) -> Option<(usize, usize)> {
        let row = *self.rows.get(key)?;
        let part = self.starts.partition_point(|&start| start <= row) - 1;
        Some((part, (row - self.starts[part]) as usize))
    }
}

/// The keys of a memo batch's `id` column.
fn memo_keys(stage: &str, batch: &RecordBatch) -> Result<Vec<MemoKey>, StoreError> {
    let bad = |reason: String| StoreError::Memo {
        stage: stage.to_string(),
        reason,
    };
    let ids = batch
        .column_by_name("id")
        .and_then(|c| c.as_any().downcast_ref::<StringArray>())
        .ok_or_else(|| bad("no utf8 column `id`".into()))?;
    (0..ids.len())
        .map(|i| {
            MemoKey::from_hex(ids.value(i))
                .ok_or_else(|| bad(format!("row key `{}` is not 32 hex digits", ids.value(i))))
        })
        .collect()
}

/// Turns the batches of one memo part into what [`MemoRows`] keeps of it.
pub type DecodePart<'a, T> = Box<dyn Fn(&[RecordBatch]) -> Result<T, StoreError> + 'a>;

/// Reads a memo table's rows by [`MemoIndex::locate`], a whole part at a time, each part
/// decoded by `decode` and the last `PARTS_KEPT` (4) kept.
pub struct MemoRows<'a, T> {
    store: &'a StageStore,
    stage: &'a str,
    index: &'a MemoIndex,
    decode: DecodePart<'a, T>,
    kept: VecDeque<(usize, T)>,
}

impl<'a, T> MemoRows<'a, T> {
    pub fn new(
        store: &'a StageStore,
        stage: &'a str,
        index: &'a MemoIndex,
        decode: impl Fn(&[RecordBatch]) -> Result<T, StoreError> + 'a,
    ) -> Self {
        Self {
            store,
            stage,
            index,
            decode: Box::new(decode),
            kept: VecDeque::new(),
        }
    }

    /// The decoded part holding `key` and the row's place in it.
    pub fn get(&mut self, key: &MemoKey) -> Result<(&T, usize), StoreError> {
        let (part, row) = self.index.locate(key).ok_or_else(|| StoreError::Memo {
            stage: self.stage.to_string(),
            reason: format!("no row for key {}", key.to_hex()),
        })?;
        let at = match self.kept.iter().position(|(p, _)| *p == part) {
            Some(at) => at,
            None => {
                let batches: Vec<RecordBatch> = self
                    .store
                    .read_parts(self.stage, vec![self.index.parts[part].clone()])
                    .collect::<Result<_, _>>()?;
                if self.kept.len() == PARTS_KEPT {
                    self.kept.pop_front();
                }
                self.kept.push_back((part, (self.decode)(&batches)?));
                self.kept.len() - 1
            }
        };
        Ok((&self.kept[at].1, row))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is its job
mod tests {
    use super::*;
    use arrow::array::{ArrayRef, Int64Array};
    use arrow::datatypes::{DataType, Field, Schema};
    use std::sync::Arc;

    fn schema() -> Arc<Schema> {
        Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, false),
            Field::new("n", DataType::Int64, false),
        ]))
    }

    fn batch(texts: &[&str]) -> RecordBatch {
        let ids: Vec<String> = texts
            .iter()
            .map(|t| MemoKey::of(t.as_bytes()).to_hex())
            .collect();
        let ns: Vec<i64> = texts.iter().map(|t| t.len() as i64).collect();
        RecordBatch::try_new(
            schema(),
            vec![
                Arc::new(StringArray::from(ids)) as ArrayRef,
                Arc::new(Int64Array::from(ns)) as ArrayRef,
            ],
        )
        .unwrap()
    }

    #[test]
    fn keys_round_trip_through_hex() {
        let k = MemoKey::of(b"a text");
        assert_eq!(k.to_hex().len(), 32);
        assert_eq!(MemoKey::from_hex(&k.to_hex()), Some(k));
        assert_eq!(MemoKey::from_hex("xyz"), None);
        assert_ne!(MemoKey::of(b"a text"), MemoKey::of(b"a text "));
    }

    #[test]
    fn rows_appended_by_several_runs_are_found_by_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = StageStore::open(dir.path()).unwrap();
        assert!(MemoIndex::load(&store, "memo-x", "s").unwrap().is_empty());
        {
            let mut w = store
                .begin("memo-x", memo_stage_key("s"), schema())
                .unwrap();
            w.write_part(&[batch(&["a", "bb"])]).unwrap();
            w.write_part(&[batch(&["ccc"])]).unwrap();
        }
        {
            // A later run appends; the committed parts stay.
            let mut w = store
                .begin("memo-x", memo_stage_key("s"), schema())
                .unwrap();
            w.write_part(&[batch(&["dddd", "eeeee", "a"])]).unwrap();
        }
        let index = MemoIndex::load(&store, "memo-x", "s").unwrap();
        assert_eq!(index.len(), 5);
        // An index read before the last run's part, refreshed, is the same.
        let mut earlier = MemoIndex::load(&store, "memo-x", "s").unwrap();
        earlier.parts.pop();
        earlier.starts.pop();
        earlier.rows.retain(|_, row| *row < 3);
        earlier.refresh(&store, "memo-x", "s").unwrap();
        assert_eq!(earlier.rows, index.rows);
        assert_eq!(earlier.starts, index.starts);
        let key = |t: &str| MemoKey::of(t.as_bytes());
        assert_eq!(index.locate(&key("a")), Some((0, 0)));
        assert_eq!(index.locate(&key("ccc")), Some((1, 0)));
        assert_eq!(index.locate(&key("eeeee")), Some((2, 1)));
        assert_eq!(index.locate(&key("zz")), None);
        let n_of = |batches: &[RecordBatch]| -> Result<Vec<i64>, StoreError> {
            Ok(batches
                .iter()
                .flat_map(|b| {
                    let col = b.column(1).as_any().downcast_ref::<Int64Array>().unwrap();
                    col.values().to_vec()
                })
                .collect())
        };
        let mut rows = MemoRows::new(&store, "memo-x", &index, n_of);
        for t in ["eeeee", "bb", "dddd", "ccc", "a"] {
            let (part, row) = rows.get(&key(t)).unwrap();
            assert_eq!(part[row], t.len() as i64, "{t}");
        }
        assert!(rows.get(&key("zz")).is_err());
        // Another settings hash is another table.
        assert!(MemoIndex::load(&store, "memo-x", "t").unwrap().is_empty());
    }
}
