//! A teacher's pair cache: every score a teacher gave any run, kept in an append-only
//! stage keyed per pair by a hash of the query text and the passage text
//! ([`pair_key`]), so a pair is never scored twice by the same teacher. The labelling
//! stage and the scoring that runs ahead of it while candidates stream
//! ([`crate::dataflow::score_ahead`]) both score through it.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, Float32Array, StringArray};
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

/// The schema of a teacher's score stages: pair key, score.
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
/// SciFact passage is in some 280 pairs; hashing it for each was most of a rerun). The
/// cache stores [`MemoKey::to_hex`] of it.
pub(crate) fn pair_key_of(query: MemoKey, passage: MemoKey) -> MemoKey {
    let mut both = [0u8; 32];
    both[..16].copy_from_slice(&query.0.to_be_bytes());
    both[16..].copy_from_slice(&passage.0.to_be_bytes());
    MemoKey::of(&both)
}

/// The input hash of every teacher cache stage: the cache holds the pairs any run asked
/// for. Its version names the pair-key scheme; a cache of another scheme is started
/// again (its keys would never match).
const TEACHER_CACHE_INPUT: &str = "append-only cache; pair keys of text keys";

pub(crate) fn read_scores(
    store: &StageStore,
    stage: &str,
    into: &mut MemoMap<f32>,
) -> Result<(), EngineError> {
    for batch in store.read(stage)? {
        let batch = batch?;
        let bad = || EngineError::Invalid(format!("stage {stage}: not a teacher score table"));
        let p = batch
            .column_by_name(COL_PAIR)
            .and_then(|c| c.as_any().downcast_ref::<StringArray>())
            .ok_or_else(bad)?;
        let s = batch
            .column_by_name(COL_SCORE)
            .and_then(|c| c.as_any().downcast_ref::<Float32Array>())
            .ok_or_else(bad)?;
        for i in 0..batch.num_rows() {
            let key = MemoKey::from_hex(p.value(i)).ok_or_else(bad)?;
            into.insert(key, s.value(i));
        }
    }
    Ok(())
}

/// Teacher `t`'s scores of the pairs `keys` names (sorted, distinct [`pair_key`]s;
/// `texts(i)` is pair `i`'s query and passage text) through its pair cache
/// ([`PairCache`]). Returns every pair's score by key and how many were scored now.
pub(crate) fn scores_through_cache<'t>(
    store: &StageStore,
    pipeline: &Pipeline,
    t: usize,
    teacher: &dyn teacher::PairTeacher,
    keys: &[MemoKey],
    texts: &dyn Fn(usize) -> (&'t str, &'t str),
    known: Vec<KnownEmbeddings<'_>>,
) -> Result<(MemoMap<f32>, usize), EngineError> {
    let mut cache = PairCache::open(store, teacher)?;
    let now = cache.score_missing(store, pipeline, t, teacher, keys, texts, known)?;
    Ok((cache.scores, now))
}

/// A teacher's pair cache: the append-only stage of every pair score it gave any run
/// (`teacher-<16 hex digits of its fingerprint>-cache`), held in memory by key. For a
/// teacher that is not cached ([`teacher::PairTeacher::cached`]) it keeps the scores of
/// this stage only, and writes nothing.
pub(crate) struct PairCache {
    stage: String,
    key: StageKey,
    stage_prefix: String,
    scores: MemoMap<f32>,
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
        let mut scores = MemoMap::default();
        let kept = teacher.cached();
        if kept && matches!(store.status(&stage, &key)?, StageStatus::Partial { .. }) {
            read_scores(store, &stage, &mut scores)?;
        }
        Ok(Self {
            stage,
            key,
            stage_prefix,
            scores,
            kept,
        })
    }

    /// The scores held, by pair key.
    pub(crate) fn into_scores(self) -> MemoMap<f32> {
        self.scores
    }

    /// Scores the pairs of `keys` (sorted, distinct [`pair_key`]s; `texts(i)` is pair
    /// `i`'s query and passage text) that the cache lacks with teacher `t` and appends
    /// them to it (a part at a time, each atomic). Returns how many were scored.
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
        let missing: Vec<usize> = (0..keys.len())
            .filter(|&i| !self.scores.contains_key(&keys[i]))
            .collect();
        if missing.is_empty() {
            return Ok(0);
        }
        // A pair's key names it in the cache and in the teacher's own stages; a teacher
        // that keeps neither needs none.
        let hexes: Vec<String> = if self.kept {
            missing.iter().map(|&i| keys[i].to_hex()).collect()
        } else {
            vec![String::new(); missing.len()]
        };
        let to_score: Vec<PairToScore<'_>> = missing
            .iter()
            .zip(&hexes)
            .map(|(&i, hex)| {
                let (query, passage) = texts(i);
                PairToScore {
                    key: hex,
                    query,
                    passage,
                }
            })
            .collect();
        let kind = pipeline
            .teachers
            .get(t)
            .map_or("teacher", |s| s.kind.name());
        let ctx = ScoringContext {
            store,
            stage_prefix: self.stage_prefix.clone(),
            label: format!("teacher {t} ({kind})"),
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
            let mut writer = store.begin(&self.stage, self.key.clone(), scores_schema())?;
            for (chunk, chunk_scores) in hexes.chunks(CHUNK_ROWS).zip(scores.chunks(CHUNK_ROWS)) {
                writer.write_part(&[scores_batch(chunk, chunk_scores.to_vec())?])?;
            }
        }
        let now = missing.len();
        self.scores
            .extend(missing.into_iter().map(|i| keys[i]).zip(scores));
        Ok(now)
    }
}
