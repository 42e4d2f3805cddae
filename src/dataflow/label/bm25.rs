//! The BM25 teacher: Okapi BM25 ([`crate::mining::bm25`]) of the query against the
//! passage, with document frequencies and the average length of the pipeline's whole
//! corpus (held-out passages included: they are part of the collection the statistics
//! describe).
//!
//! The statistics are built only when pairs need scoring, by one streamed pass over the
//! corpus that keeps a term -> document frequency map and never the passages. The
//! fingerprint holds `k1`, `b` and the corpus file's content hash: another corpus means
//! other statistics, so other scores. Scoring is CPU only, split over the engine's
//! threads in contiguous ranges of passages, so a score never depends on the thread
//! count; each distinct passage is tokenised once for all the queries paired with it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::TeacherKind;
use crate::corpus::count_records;
use crate::corpus::{BadRecordPolicy, Quarantine, ReadOptions};
use crate::dataflow::passage_texts;
use crate::error::EngineError;
use crate::mining::bm25::{tokens, Bm25Params, Bm25Stats, PassageTerms};
use crate::progress::Progress;
use crate::store::hash_file;
use crate::store::hash_settings;

use super::teacher::{PairTeacher, PairToScore, ScoringContext};

/// Pairs a scoring thread takes at a time between progress updates.
const PROGRESS_STEP: usize = 4096;

/// A BM25 teacher over one corpus file.
pub struct Bm25Teacher {
    params: Bm25Params,
    corpus: PathBuf,
    /// The run's quarantine when the run skips bad records (each is listed once however
    /// many stages read it); `None` fails on them.
    quarantine: Option<PathBuf>,
    fingerprint: String,
}

/// Every setting a BM25 teacher's scores depend on.
#[derive(Serialize)]
struct Bm25Key<'a> {
    kind: &'a str,
    k1: f64,
    b: f64,
    corpus: &'a str,
}

impl Bm25Teacher {
    /// A BM25 teacher with `params` over `corpus`; `quarantine` is the run's, when it
    /// skips bad records.
    pub fn new(
        params: Bm25Params,
        corpus: &Path,
        quarantine: Option<&Path>,
    ) -> Result<Self, EngineError> {
        let corpus_hash = hash_file(corpus)?;
        let fingerprint = hash_settings(&Bm25Key {
            kind: TeacherKind::BM25,
            k1: params.k1,
            b: params.b,
            corpus: &corpus_hash,
        })?;
        Ok(Self {
            params,
            corpus: corpus.to_path_buf(),
            quarantine: quarantine.map(Path::to_path_buf),
            fingerprint,
        })
    }

    /// The corpus statistics, by one streamed pass.
    pub fn corpus_stats(&self, label: &str, quiet: bool) -> Result<Bm25Stats, EngineError> {
        let read = match &self.quarantine {
            None => ReadOptions::default(),
            Some(path) => ReadOptions {
                policy: BadRecordPolicy::Skip(Quarantine::open(path)?),
                ..ReadOptions::default()
            },
        };
        let progress = Progress::new(label, count_records(&self.corpus), quiet);
        let mut stats = Bm25Stats::default();
        for item in passage_texts(&self.corpus, &read)? {
            let (_, text) = item?;
            stats.add_document(&text);
            progress.inc(1);
        }
        progress.finish();
        if let BadRecordPolicy::Skip(q) = &read.policy {
            q.finish()?;
        }
        Ok(stats)
    }
}

impl PairTeacher for Bm25Teacher {
    fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    fn score_pairs(
        &self,
        pairs: &[PairToScore<'_>],
        ctx: &ScoringContext<'_>,
    ) -> Result<Vec<f32>, EngineError> {
        let stats = self.corpus_stats(&format!("{}: bm25 statistics", ctx.label), ctx.quiet)?;
        let progress = Progress::new(
            &format!("{}: score pairs", ctx.label),
            Some(pairs.len() as u64),
            ctx.quiet,
        );
        // Each distinct passage's terms are counted once for all its pairs, and each
        // distinct query tokenised once: the pairs in passage order, split over the
        // threads in contiguous ranges of passages.
        let mut queries: HashMap<&str, Vec<String>> = HashMap::new();
        for p in pairs {
            queries
                .entry(p.query)
                .or_insert_with(|| tokens(p.query).collect());
        }
        let mut order: Vec<u32> = (0..pairs.len() as u32).collect();
        order.sort_by(|&a, &b| pairs[a as usize].passage.cmp(pairs[b as usize].passage));
        let per_thread = order.len().div_ceil(ctx.threads.max(1)).max(1);
        let mut scored: Vec<Vec<(u32, f32)>> = Vec::new();
        std::thread::scope(|scope| {
            let mut rest = order.as_slice();
            let mut handles = Vec::new();
            while !rest.is_empty() {
                // Cut after the last pair of a passage, so that no passage is counted by
                // two threads.
                let mut end = per_thread.min(rest.len());
                while end < rest.len()
                    && pairs[rest[end] as usize].passage == pairs[rest[end - 1] as usize].passage
                {
                    end += 1;
                }
                let (mine, later) = rest.split_at(end);
                rest = later;
                let (stats, progress, params, queries) = (&stats, &progress, self.params, &queries);
                handles.push(scope.spawn(move || {
                    let mut out = Vec::with_capacity(mine.len());
                    let mut terms: Option<(&str, PassageTerms)> = None;
                    for chunk in mine.chunks(PROGRESS_STEP) {
                        for &i in chunk {
                            let pair = &pairs[i as usize];
                            if terms.as_ref().is_none_or(|(p, _)| *p != pair.passage) {
                                terms = Some((pair.passage, PassageTerms::of(pair.passage)));
                            }
                            let Some((_, counted)) = &terms else { continue };
                            let query = queries.get(pair.query).map_or(&[][..], Vec::as_slice);
                            out.push((i, stats.score_terms(params, query, counted) as f32));
                        }
                        progress.inc(chunk.len() as u64);
                    }
                    out
                }));
            }
            for h in handles {
                scored.push(h.join().unwrap_or_default());
            }
        });
        let mut scores = vec![0.0f32; pairs.len()];
        let mut written = 0;
        for (i, s) in scored.into_iter().flatten() {
            scores[i as usize] = s;
            written += 1;
        }
        if written != pairs.len() {
            return Err(EngineError::Dataflow(
                "a BM25 scoring thread panicked".into(),
            ));
        }
        progress.finish();
        Ok(scores)
    }
}
