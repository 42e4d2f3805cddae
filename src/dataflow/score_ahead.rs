//! Teacher scoring ahead: the candidates stage hands its rows over a chunk at a time as
//! they become final ([`super::candidates::CandidateSink`]), and the teachers whose work
//! is per pair ([`PairTeacher::scores_ahead`]: a cross-encoder) score each chunk's pairs
//! into their pair caches while the next chunk is retrieved. Labelling then finds those
//! pairs in the caches ([`super::label::run_label_stage`] takes them from here, not read
//! back) and scores only what is left, so the examples are the same bits however much
//! was scored ahead: a pair's score does not depend on the pairs batched with it
//! (`operators/tests/batch_invariance.rs`).
//!
//! A chunk's pairs are scored in the order of their keys, as labelling scores its own;
//! a run killed here resumes from the caches (every appended part is atomic) and the
//! teacher's own device stage of the chunk in progress.

use std::collections::HashMap;

use crate::config::Pipeline;
use crate::dataflow::label::pair_cache::{pair_key_of, PairCache};
use crate::dataflow::label::teacher::PairTeacher;
use crate::dataflow::passage_texts;
use crate::error::EngineError;
use crate::schema::CandidateRow;
use crate::store::memo::MemoKey;
use crate::store::StageStore;

/// What scoring ahead did, and the caches it filled, for labelling.
pub struct ScoredAhead {
    /// Per teacher of `[[teachers]]`: its cache as scoring ahead left it, `None` for a
    /// teacher that does not score ahead.
    pub(crate) caches: Vec<Option<PairCache>>,
    /// Per teacher: pairs it scored ahead.
    pub scored: Vec<usize>,
    /// Chunks of candidates received.
    pub chunks: usize,
}

impl ScoredAhead {
    /// Whether any of `teachers` scores ahead: without one the candidates stage need
    /// not stream.
    pub fn wanted(teachers: &[Box<dyn PairTeacher>]) -> bool {
        teachers.iter().any(|t| t.cached() && t.scores_ahead())
    }
}

/// Scores every chunk of candidate rows of `chunks` with the `teachers` that score
/// ahead, through their pair caches; returns when `chunks` ends.
pub fn score_ahead(
    pipeline: &Pipeline,
    teachers: &[Box<dyn PairTeacher>],
    chunks: impl Iterator<Item = Vec<CandidateRow>>,
) -> Result<ScoredAhead, EngineError> {
    let store = StageStore::open(&pipeline.run_dir)?;
    let mut caches = Vec::with_capacity(teachers.len());
    for teacher in teachers {
        caches.push(if teacher.cached() && teacher.scores_ahead() {
            Some(PairCache::open(&store, teacher.as_ref())?)
        } else {
            None
        });
    }
    let mut ahead = ScoredAhead {
        scored: vec![0; teachers.len()],
        caches,
        chunks: 0,
    };
    // Every passage's text and its text's key, read on the first chunk: a chunk's
    // candidates come from anywhere in the corpus.
    let mut passages: Option<HashMap<String, (String, MemoKey)>> = None;
    for rows in chunks {
        ahead.chunks += 1;
        if ahead.caches.iter().all(Option::is_none) {
            continue;
        }
        if passages.is_none() {
            let read = pipeline.retrievers[0].read_options()?;
            let mut all = HashMap::new();
            for item in passage_texts(&pipeline.corpus, &read)? {
                let (id, text) = item?;
                let key = MemoKey::of(text.as_bytes());
                all.insert(id, (text, key));
            }
            passages = Some(all);
        }
        let Some(passages) = &passages else {
            continue;
        };
        // The chunk's distinct pairs in the order of their keys.
        let mut pairs: Vec<(MemoKey, &str, &str)> = Vec::new();
        for r in &rows {
            let query_key = MemoKey::of(r.query_text.as_bytes());
            for c in &r.candidate_ids {
                let Some((text, passage_key)) = passages.get(c) else {
                    return Err(EngineError::Invalid(format!(
                        "candidate passage `{c}` is not in {} any more; the corpus changed \
                         during the run?",
                        pipeline.corpus.display()
                    )));
                };
                pairs.push((
                    pair_key_of(query_key, *passage_key),
                    r.query_text.as_str(),
                    text.as_str(),
                ));
            }
        }
        pairs.sort_unstable_by_key(|p| p.0);
        pairs.dedup_by_key(|p| p.0);
        let keys: Vec<MemoKey> = pairs.iter().map(|p| p.0).collect();
        let texts = |i: usize| (pairs[i].1, pairs[i].2);
        for (t, cache) in ahead.caches.iter_mut().enumerate() {
            if let Some(cache) = cache {
                ahead.scored[t] += cache.score_missing(
                    &store,
                    pipeline,
                    t,
                    teachers[t].as_ref(),
                    &keys,
                    &texts,
                    Vec::new(),
                )?;
            }
        }
    }
    Ok(ahead)
}
