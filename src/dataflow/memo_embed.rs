//! Embedding through the memo table: an embedding stage computes only the texts its
//! model has never embedded under the same settings.
//!
//! An embedding is a function of the text and the embedding settings (model fingerprint,
//! maximum length, prefix, side: the stage key's settings hash), and the same bits
//! whatever shares its batch (tested in `operators/tests/batch_invariance.rs`). So the
//! run keeps one memo table per settings hash ([`memo_stage_name`]), keyed by the text's
//! hash ([`MemoKey`]), and an embedding stage runs in two passes:
//!
//! 1. **Misses to the device.** The source is read once; each text whose key the memo
//!    lacks (each distinct one once) goes through the device dataflow, whose rows are
//!    appended to the memo table. The ids and keys are kept in input order, 24 bytes and
//!    the id per text, not the texts.
//! 2. **The stage from the memo.** The stage's rows are written in input order, a chunk
//!    at a time, each vector read from the memo: the same parts, the same bytes as an
//!    embedding of every text in one go.
//!
//! A changed corpus therefore embeds only its new and edited texts, and a killed stage
//! loses at most the chunks in flight: the memo keeps every part it committed, and the
//! stage's own parts resume after their committed rows.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use distillery_operators::Embedder;

use super::{
    journal_device_stage, run_dataflow, EmbedStage, EmbedStageReport, StageOutput, TextSource,
    Writing,
};
use crate::error::EngineError;
use crate::executor::EmbedTexts;
use crate::schema::{embeddings_batch, embeddings_schema, EmbeddingMatrix};
use crate::store::memo::{memo_stage_key, MemoIndex, MemoKey, MemoRows};
use crate::store::{StageStore, StoreError};

/// The memo table of embeddings made under `settings_hash`.
pub fn memo_stage_name(settings_hash: &str) -> String {
    let short: String = settings_hash.chars().take(16).collect();
    format!("memo-{short}")
}

/// The ids of a stage's input and their texts' keys, in input order.
#[derive(Debug, Default)]
struct InputOrder {
    ids: String,
    ends: Vec<usize>,
    keys: Vec<MemoKey>,
}

impl InputOrder {
    fn push(&mut self, id: &str, key: MemoKey) {
        self.ids.push_str(id);
        self.ends.push(self.ids.len());
        self.keys.push(key);
    }

    fn id(&self, i: usize) -> &str {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.ids[start..self.ends[i]]
    }

    fn len(&self) -> usize {
        self.keys.len()
    }
}

/// What the device pass of [`embed_misses`] did.
struct MissesRun {
    rows: u64,
    seconds: f64,
    executor: crate::executor::ExecutorStats,
}

/// Embeds every text of `source` that `index` lacks (each distinct one once) into the
/// memo table of `stage`'s settings, calling `record` with each item's id and text key
/// in source order, hits included.
fn embed_misses(
    store: &StageStore,
    embedder: Arc<Embedder>,
    source: TextSource,
    stage: &EmbedStage,
    index: Arc<MemoIndex>,
    mut record: impl FnMut(&str, MemoKey) + Send + 'static,
) -> Result<MissesRun, EngineError> {
    let settings_hash = &stage.key.settings_hash;
    // Reads the source up to its next miss, recording every text's place on the way.
    let mut next_miss = {
        let index = index.clone();
        let mut sent: HashSet<MemoKey> = HashSet::new();
        let mut source = source;
        move || -> Option<Result<(String, String), EngineError>> {
            for item in source.by_ref() {
                let (id, text) = match item {
                    Ok(pair) => pair,
                    Err(e) => return Some(Err(e)),
                };
                let key = MemoKey::of(text.as_bytes());
                record(&id, key);
                if !index.contains(&key) && sent.insert(key) {
                    return Some(Ok((key.to_hex(), text)));
                }
            }
            None
        }
    };
    // Whether any text misses decides whether the device runs at all.
    let Some(first) = next_miss() else {
        // Every text was a hit: the first call read the source to its end.
        return Ok(MissesRun {
            rows: 0,
            seconds: 0.0,
            executor: Default::default(),
        });
    };
    let memo = EmbedStage {
        stage: memo_stage_name(settings_hash),
        key: memo_stage_key(settings_hash),
        // The misses are not known before they are read.
        total: if index.is_empty() { stage.total } else { None },
        ..stage.clone()
    };
    drop(index);
    let (model, output) = embedding_model(embedder, stage);
    let source: TextSource = Box::new(std::iter::once(first).chain(std::iter::from_fn(next_miss)));
    let ran = run_dataflow(store, model, source, &memo, output, Writing::Append)?;
    Ok(MissesRun {
        rows: ran.rows,
        seconds: ran.seconds,
        executor: ran.executor,
    })
}

/// The embedding model and output of `stage` (what the leader and its followers build
/// the same dataflow from).
fn embedding_model(embedder: Arc<Embedder>, stage: &EmbedStage) -> (Arc<EmbedTexts>, StageOutput) {
    let dim = embedder.dim();
    let output = StageOutput {
        schema: embeddings_schema(dim),
        to_batch: Arc::new(move |ids, matrix| embeddings_batch(ids, matrix, dim)),
    };
    let model = Arc::new(EmbedTexts {
        embedder,
        kind: stage.kind,
    });
    (model, output)
}

/// Embeds ahead into the memo table of `stage`'s settings every text of `texts` it
/// lacks, without writing `stage` itself: for texts that arrive before their stage can
/// run (generated queries, while the passage index is still being built). The stage,
/// run later over the same texts, then finds them in the memo; its bytes are the same
/// either way. Journaled under `stage`'s label with ` (ahead)` added. Returns the texts
/// embedded.
pub fn embed_ahead(
    store: &StageStore,
    embedder: Arc<Embedder>,
    texts: impl Iterator<Item = String> + Send + 'static,
    stage: &EmbedStage,
) -> Result<u64, EngineError> {
    // Nothing sent (nothing generated now): the memo is not even read.
    let mut texts = texts.peekable();
    if texts.peek().is_none() {
        return Ok(0);
    }
    let settings_hash = &stage.key.settings_hash;
    let memo_stage = memo_stage_name(settings_hash);
    let index = Arc::new(MemoIndex::load(store, &memo_stage, settings_hash)?);
    let source: TextSource = Box::new(texts.map(|text| Ok((String::new(), text))));
    let ahead = EmbedStage {
        label: format!("{} (ahead)", stage.label),
        total: None,
        ..stage.clone()
    };
    let ran = embed_misses(store, embedder, source, &ahead, index, |_, _| {})?;
    if ran.rows > 0 {
        journal_device_stage(
            store,
            &memo_stage,
            &ahead.label,
            (ran.rows, 0),
            ran.seconds,
            &ran.executor,
        )?;
    }
    Ok(ran.rows)
}

/// Runs an embedding stage not yet complete under its key (see the module docs).
pub(super) fn run(
    store: &StageStore,
    embedder: Arc<Embedder>,
    source: TextSource,
    stage: &EmbedStage,
) -> Result<EmbedStageReport, EngineError> {
    let start = std::time::Instant::now();
    let dim = embedder.dim();
    let settings_hash = &stage.key.settings_hash;
    let memo_stage = memo_stage_name(settings_hash);
    let index = Arc::new(MemoIndex::load(store, &memo_stage, settings_hash)?);

    // 1. The misses, through the device, into the memo.
    let order = Arc::new(Mutex::new(InputOrder::default()));
    let recording = order.clone();
    let ran = embed_misses(
        store,
        embedder,
        source,
        stage,
        index.clone(),
        move |id, key| {
            // Only this reader ever holds the lock; a poisoned one still holds the order,
            // and no text may go unrecorded.
            recording
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .push(id, key);
        },
    )?;
    let (rows_embedded, seconds, executor) = (ran.rows, ran.seconds, ran.executor);
    let shared =
        || EngineError::Dataflow("the memo index or input order is still shared; a bug".into());
    let order = Arc::try_unwrap(order)
        .map_err(|_| shared())?
        .into_inner()
        .unwrap_or_else(|poisoned| poisoned.into_inner());

    // 2. The stage, in input order, from the memo, whose index adds the parts pass 1
    // appended.
    let mut index = Arc::try_unwrap(index).map_err(|_| shared())?;
    index.refresh(store, &memo_stage, settings_hash)?;
    let decode_stage = memo_stage.clone();
    let mut rows = MemoRows::new(store, &memo_stage, &index, move |batches| {
        let mut m = EmbeddingMatrix::default();
        for batch in batches {
            m.extend_from_batch(batch).map_err(|e| StoreError::Memo {
                stage: decode_stage.clone(),
                reason: e.to_string(),
            })?;
        }
        Ok(m)
    });
    let mut writer = store.begin(&stage.stage, stage.key.clone(), embeddings_schema(dim))?;
    writer.write_row_ranges(order.len(), stage.chunk_rows, |range| {
        let mut ids = Vec::with_capacity(range.len());
        let mut values = Vec::with_capacity(range.len() * dim);
        for i in range {
            let (matrix, row) = rows.get(&order.keys[i])?;
            if matrix.dim != dim {
                return Err(EngineError::Invalid(format!(
                    "memo stage {memo_stage}: {}-dimensional rows for a {dim}-dimensional model",
                    matrix.dim
                )));
            }
            values.extend_from_slice(&matrix.values[row * dim..(row + 1) * dim]);
            ids.push(order.id(i).to_string());
        }
        Ok(embeddings_batch(&ids, values, dim)?)
    })?;
    let completed = writer.finish()?;
    let rows_memoised = (order.len() as u64).saturating_sub(rows_embedded);
    // The journal's figures are the device dataflow's (the pass that ran the misses); a
    // stage served whole from the memo is journaled with no device time.
    journal_device_stage(
        store,
        &memo_stage,
        &stage.label,
        (rows_embedded, rows_memoised),
        seconds,
        &executor,
    )?;
    Ok(EmbedStageReport {
        completed,
        reused: false,
        rows_embedded,
        rows_memoised,
        seconds: if seconds > 0.0 {
            seconds
        } else {
            start.elapsed().as_secs_f64()
        },
        executor,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_order_keeps_ids_without_a_string_each() {
        let mut order = InputOrder::default();
        for (i, id) in ["a", "", "ccc", "dd"].iter().enumerate() {
            order.push(id, MemoKey(i as u128));
        }
        assert_eq!(order.len(), 4);
        let ids: Vec<&str> = (0..4).map(|i| order.id(i)).collect();
        assert_eq!(ids, ["a", "", "ccc", "dd"]);
        assert_eq!(order.keys[2], MemoKey(2));
        assert_eq!(memo_stage_name(&"ab".repeat(32)), "memo-abababababababab");
    }
}
