//! A teacher's pair cache: every score a teacher gave any run, kept in an append-only
//! stage keyed per pair by a hash of the query text and the passage text
//! ([`pair_key`]), so a pair is never scored twice by the same teacher. The labelling
//! stage and the scoring that runs ahead of it while candidates stream
//! ([`crate::dataflow::score_ahead`]) both score through it.
//!
//! The cache holds each key as its 16 bytes ([`cache_schema`]): a rerun reads the whole
//! cache (SciFact's 1.45M pairs per teacher), and decoding hex text cost more than
//! anything else labelling did with the cached scores. A teacher's own device stages
//! name their rows by the key's hex ([`scores_schema`]), as every device stage names its
//! rows by a string id.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, FixedSizeBinaryArray, Float32Array, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;

use super::teacher::{self, KnownEmbeddings, PairToScore, ScoringContext};
use crate::config::Pipeline;
use crate::dataflow::CHUNK_ROWS;
use crate::error::EngineError;
use crate::store::memo::{MemoKey, MemoMap};
use crate::store::{StageKey, StageStatus, StageStore};

const COL_PAIR: &str = "pair";
const COL_SCORE: &str = "score";

/// Bytes of a pair key in the cache: a [`MemoKey`], big-endian.
const PAIR_KEY_BYTES: i32 = 16;

/// The schema of a teacher's own score stages (a device stage's rows): pair key as hex,
/// score.
pub(crate) fn scores_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(COL_PAIR, DataType::Utf8, false),
        Field::new(COL_SCORE, DataType::Float32, false),
    ]))
}

pub(crate) fn scores_batch(pairs: &[String], scores: Vec<f32>) -> Result<RecordBatch, ArrowError> {
    let p: ArrayRef = Arc::new(StringArray::from_iter_values(pairs.iter()));
    let s: ArrayRef = Arc::new(Float32Array::from(scores));
    RecordBatch::try_new(scores_schema(), vec![p, s])
}

/// The schema of a teacher's cache: pair key (16 bytes), score.
pub fn cache_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(COL_PAIR, DataType::FixedSizeBinary(PAIR_KEY_BYTES), false),
        Field::new(COL_SCORE, DataType::Float32, false),
    ]))
}

fn cache_batch(keys: &[MemoKey], scores: &[f32]) -> Result<RecordBatch, ArrowError> {
    let p: ArrayRef = Arc::new(FixedSizeBinaryArray::try_from_iter(
        keys.iter().map(|k| k.0.to_be_bytes()),
    )?);
    let s: ArrayRef = Arc::new(Float32Array::from(scores.to_vec()));
    RecordBatch::try_new(cache_schema(), vec![p, s])
}

/// The cache key of a (query text, passage text) pair: what the teacher sees, nothing
/// else, so a moved or renamed passage keeps its scores.
pub fn pair_key(query: &str, passage: &str) -> String {
    pair_key_of(
        MemoKey::of(query.as_bytes()),
        MemoKey::of(passage.as_bytes()),
    )
    .to_hex()
}

/// [`pair_key`] from the two texts' keys: a text is hashed once for all its pairs (a
/// SciFact passage is in some 280 pairs; hashing it for each was most of a rerun).
pub(crate) fn pair_key_of(query: MemoKey, passage: MemoKey) -> MemoKey {
    let mut both = [0u8; 32];
    both[..16].copy_from_slice(&query.0.to_be_bytes());
    both[16..].copy_from_slice(&passage.0.to_be_bytes());
    MemoKey::of(&both)
}

/// The input hash of every teacher cache stage: the cache holds the pairs any run asked
/// for. Its version names the pair-key scheme and the key's column; a cache of another
/// version is started again (its keys would never be read).
const TEACHER_CACHE_INPUT: &str = "append-only cache; pair keys of text keys, 16 bytes";

/// Every score of a score table (a teacher's cache, [`cache_schema`], or one of its own
/// stages, [`scores_schema`]) into `into`, by pair key.
pub(crate) fn read_scores(
    store: &StageStore,
    stage: &str,
    into: &mut MemoMap<f32>,
) -> Result<(), EngineError> {
    for_each_score(store, stage, |key, score| {
        into.insert(key, score);
    })
}

/// Calls `f` with every (pair key, score) of a score table, in its order.
fn for_each_score(
    store: &StageStore,
    stage: &str,
    mut f: impl FnMut(MemoKey, f32),
) -> Result<(), EngineError> {
    for batch in store.read(stage)? {
        let batch = batch?;
        let bad = || EngineError::Invalid(format!("stage {stage}: not a teacher score table"));
        let s = batch
            .column_by_name(COL_SCORE)
            .and_then(|c| c.as_any().downcast_ref::<Float32Array>())
            .ok_or_else(bad)?;
        let p = batch.column_by_name(COL_PAIR).ok_or_else(bad)?;
        if let Some(p) = p.as_any().downcast_ref::<FixedSizeBinaryArray>() {
            if p.value_length() != PAIR_KEY_BYTES {
                return Err(bad());
            }
            for (i, &score) in s.values().iter().enumerate() {
                let bytes: [u8; 16] = p.value(i).try_into().map_err(|_| bad())?;
                f(MemoKey(u128::from_be_bytes(bytes)), score);
            }
        } else if let Some(p) = p.as_any().downcast_ref::<StringArray>() {
            for (i, &score) in s.values().iter().enumerate() {
                f(MemoKey::from_hex(p.value(i)).ok_or_else(bad)?, score);
            }
        } else {
            return Err(bad());
        }
    }
    Ok(())
}

/// Each of `keys`' score in `sorted` (scores sorted by key, each key once), or `None`:
/// one walk along both when `keys` are sorted (labelling's are: the order of the keys),
/// a binary search each otherwise.
fn look_up(sorted: &[(MemoKey, f32)], keys: &[MemoKey]) -> Vec<Option<f32>> {
    if !keys.is_sorted() {
        return keys
            .iter()
            .map(|k| {
                sorted
                    .binary_search_by_key(k, |e| e.0)
                    .ok()
                    .map(|i| sorted[i].1)
            })
            .collect();
    }
    let mut at = 0;
    keys.iter()
        .map(|k| {
            while at < sorted.len() && sorted[at].0 < *k {
                at += 1;
            }
            (at < sorted.len() && sorted[at].0 == *k).then(|| sorted[at].1)
        })
        .collect()
}

/// Teacher `t`'s score of every pair `keys` names (distinct [`pair_key`]s; `texts(i)`
/// is pair `i`'s query and passage text), in the order of `keys`, through its pair cache
/// ([`PairCache`]); and how many were scored now.
pub(crate) fn scores_through_cache<'t>(
    store: &StageStore,
    pipeline: &Pipeline,
    t: usize,
    teacher: &dyn teacher::PairTeacher,
    keys: &[MemoKey],
    texts: &dyn Fn(usize) -> (&'t str, &'t str),
    known: Vec<KnownEmbeddings<'_>>,
) -> Result<(Vec<f32>, usize), EngineError> {
    PairCache::open(store, teacher)?.scores(store, pipeline, t, teacher, keys, texts, known)
}

/// How progress lines name teacher `t` of `pipeline`: `teacher 0 (bm25)`.
pub(crate) fn teacher_label(pipeline: &Pipeline, t: usize) -> String {
    let kind = pipeline
        .teachers
        .get(t)
        .map_or("teacher", |s| s.kind.name());
    format!("teacher {t} ({kind})")
}

/// A teacher's pair cache: the append-only stage of every pair score it gave any run
/// (`teacher-<16 hex digits of its fingerprint>-cache`), held in memory by key. For a
/// teacher that is not cached ([`teacher::PairTeacher::cached`]) it holds nothing and
/// writes nothing: every pair is scored when asked for.
///
/// The scores are held sorted by key, not in a hash table: the cache's parts are runs of
/// increasing keys (each append is in key order), so sorting them is merging a few runs,
/// and labelling's keys, in key order too, are looked up in one walk along both (for
/// SciFact's 1.45M pairs, a hash table's inserts and lookups took three times as long).
pub(crate) struct PairCache {
    stage: String,
    key: StageKey,
    stage_prefix: String,
    /// Every score held, sorted by key, each key once.
    scores: Vec<(MemoKey, f32)>,
    kept: bool,
}

impl PairCache {
    /// `teacher`'s cache in `store`, read whole.
    pub(crate) fn open(
        store: &StageStore,
        teacher: &dyn teacher::PairTeacher,
    ) -> Result<Self, EngineError> {
        let settings_hash = teacher.fingerprint().to_string();
        // Stage names come from the hash, never from the user's path.
        let stage_prefix = format!("teacher-{}", &settings_hash[..16]);
        let stage = format!("{stage_prefix}-cache");
        let key = StageKey {
            settings_hash,
            input_hash: TEACHER_CACHE_INPUT.into(),
        };
        let mut scores = Vec::new();
        let kept = teacher.cached();
        if kept {
            if let StageStatus::Partial { committed_rows, .. } = store.status(&stage, &key)? {
                scores.reserve(committed_rows as usize);
                for_each_score(store, &stage, |key, score| scores.push((key, score)))?;
                // Stable, and so linear in the runs the appends left; a key written twice
                // (the same texts, the same score) is kept once.
                scores.sort_by_key(|e| e.0);
                scores.dedup_by_key(|e| e.0);
            }
        }
        Ok(Self {
            stage,
            key,
            stage_prefix,
            scores,
            kept,
        })
    }

    /// Every pair's score (`keys`, `texts` as [`scores_through_cache`] takes them), in
    /// the order of `keys`: the cache's, and the teacher's for the pairs it lacks, which
    /// are appended to it. Returns the scores and how many were scored now.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn scores<'t>(
        &mut self,
        store: &StageStore,
        pipeline: &Pipeline,
        t: usize,
        teacher: &dyn teacher::PairTeacher,
        keys: &[MemoKey],
        texts: &dyn Fn(usize) -> (&'t str, &'t str),
        known: Vec<KnownEmbeddings<'_>>,
    ) -> Result<(Vec<f32>, usize), EngineError> {
        let mut scores = Vec::with_capacity(keys.len());
        let mut missing = Vec::new();
        for (i, held) in look_up(&self.scores, keys).into_iter().enumerate() {
            match held {
                Some(score) => scores.push(score),
                None => {
                    missing.push(i);
                    scores.push(f32::NAN);
                }
            }
        }
        let now = self.score_now(store, pipeline, t, teacher, keys, &missing, texts, known)?;
        for (&i, score) in missing.iter().zip(now) {
            scores[i] = score;
        }
        Ok((scores, missing.len()))
    }

    /// Scores the pairs of `keys` (as [`Self::scores`] takes them) that the cache lacks
    /// and appends them to it. Returns how many were scored.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn score_missing<'t>(
        &mut self,
        store: &StageStore,
        pipeline: &Pipeline,
        t: usize,
        teacher: &dyn teacher::PairTeacher,
        keys: &[MemoKey],
        texts: &dyn Fn(usize) -> (&'t str, &'t str),
        known: Vec<KnownEmbeddings<'_>>,
    ) -> Result<usize, EngineError> {
        let (_, now) = self.scores(store, pipeline, t, teacher, keys, texts, known)?;
        Ok(now)
    }

    /// Teacher `t`'s scores of the pairs `missing` picks out of `keys`, in that order,
    /// appended to the cache (a part at a time, each atomic) and held when it is kept.
    #[allow(clippy::too_many_arguments)]
    fn score_now<'t>(
        &mut self,
        store: &StageStore,
        pipeline: &Pipeline,
        t: usize,
        teacher: &dyn teacher::PairTeacher,
        keys: &[MemoKey],
        missing: &[usize],
        texts: &dyn Fn(usize) -> (&'t str, &'t str),
        known: Vec<KnownEmbeddings<'_>>,
    ) -> Result<Vec<f32>, EngineError> {
        if missing.is_empty() {
            return Ok(Vec::new());
        }
        // A pair's key names it in the teacher's own stages; a teacher that keeps none
        // needs none.
        let hexes: Vec<String> = if self.kept {
            missing.iter().map(|&i| keys[i].to_hex()).collect()
        } else {
            Vec::new()
        };
        let to_score: Vec<PairToScore<'_>> = missing
            .iter()
            .enumerate()
            .map(|(j, &i)| {
                let (query, passage) = texts(i);
                PairToScore {
                    key: hexes.get(j).map_or("", String::as_str),
                    query,
                    passage,
                }
            })
            .collect();
        let ctx = ScoringContext {
            store,
            stage_prefix: self.stage_prefix.clone(),
            label: teacher_label(pipeline, t),
            batcher: pipeline.batcher(),
            workers: pipeline.workers,
            cluster: pipeline.cluster.clone(),
            threads: pipeline.threads,
            quiet: pipeline.quiet,
            known,
        };
        let scores = teacher.score_pairs(&to_score, &ctx)?;
        if scores.len() != to_score.len() {
            return Err(EngineError::Dataflow(format!(
                "teacher {t} returned {} scores for {} pairs; this is a bug",
                scores.len(),
                to_score.len()
            )));
        }
        if self.kept {
            let new_keys: Vec<MemoKey> = missing.iter().map(|&i| keys[i]).collect();
            let mut writer = store.begin(&self.stage, self.key.clone(), cache_schema())?;
            for (chunk, chunk_scores) in new_keys.chunks(CHUNK_ROWS).zip(scores.chunks(CHUNK_ROWS))
            {
                writer.write_part(&[cache_batch(chunk, chunk_scores)?])?;
            }
            // Two runs when the keys were sorted: merged in linear time.
            self.scores
                .extend(new_keys.into_iter().zip(scores.iter().copied()));
            self.scores.sort_by_key(|e| e.0);
            self.scores.dedup_by_key(|e| e.0);
        }
        Ok(scores)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn look_up_finds_held_keys_in_sorted_and_unsorted_order() {
        let held: Vec<(MemoKey, f32)> = [2u128, 3, 5, 8, 13]
            .iter()
            .map(|&k| (MemoKey(k), k as f32 / 2.0))
            .collect();
        let key = |k: u128| MemoKey(k);
        // Sorted: one walk; keys before, between and after the held ones.
        let sorted = [1, 2, 4, 5, 13, 21].map(key);
        assert_eq!(
            look_up(&held, &sorted),
            vec![None, Some(1.0), None, Some(2.5), Some(6.5), None]
        );
        // Unsorted: each by binary search, the same answers key by key.
        let unsorted = [13, 1, 8, 2, 21, 3].map(key);
        assert_eq!(
            look_up(&held, &unsorted),
            vec![Some(6.5), None, Some(4.0), Some(1.0), None, Some(1.5)]
        );
        assert_eq!(look_up(&[], &sorted), vec![None; 6]);
        assert!(look_up(&held, &[]).is_empty());
    }
}
