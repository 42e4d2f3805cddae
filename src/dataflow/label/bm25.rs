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
use std::hash::BuildHasherDefault;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::thread::JoinHandle;

use serde::Serialize;

use crate::config::TeacherKind;
use crate::corpus::count_records;
use crate::corpus::{BadRecordPolicy, Quarantine, ReadOptions};
use crate::dataflow::passage_texts;
use crate::error::EngineError;
#[cfg(doc)]
use crate::mining::bm25::PassageTerms;
use crate::mining::bm25::{raw_tokens, tokens, Bm25Params, Bm25Stats};
use crate::progress::Progress;
use crate::store::hash_file;
use crate::store::hash_settings;
use crate::store::memo::PrehashedHasher;

use super::teacher::{PairTeacher, PairToScore, ScoringContext};

/// A hash map of keys hashed by FNV-1a ([`PrehashedHasher`]'s hashing of bytes).
type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<PrehashedHasher>>;

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
    /// The corpus statistics being computed ahead ([`PairTeacher::prepare`]).
    preparing: Mutex<Option<JoinHandle<Result<Bm25Stats, EngineError>>>>,
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
            preparing: Mutex::new(None),
        })
    }

    /// The statistics [`PairTeacher::prepare`] started, else computed now.
    fn stats(&self, label: &str, quiet: bool) -> Result<Bm25Stats, EngineError> {
        // A poisoned lock still holds the handle (or none): the statistics are redone.
        let started = self
            .preparing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        match started.map(JoinHandle::join) {
            Some(Ok(stats)) => stats,
            Some(Err(_)) => Err(EngineError::Dataflow(format!(
                "{label}: the thread computing the BM25 statistics panicked"
            ))),
            None => corpus_stats(&self.corpus, self.quarantine.as_deref(), label, quiet),
        }
    }
}

/// The statistics of `corpus` (skipping bad records into `quarantine` when given), by
/// one streamed pass; `label` names the progress.
fn corpus_stats(
    corpus: &Path,
    quarantine: Option<&Path>,
    label: &str,
    quiet: bool,
) -> Result<Bm25Stats, EngineError> {
    let read = match quarantine {
        None => ReadOptions::default(),
        Some(path) => ReadOptions {
            policy: BadRecordPolicy::Skip(Quarantine::open(path)?),
            ..ReadOptions::default()
        },
    };
    let progress = Progress::new(label, count_records(corpus), quiet);
    let mut stats = Bm25Stats::default();
    for item in passage_texts(corpus, &read)? {
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

/// The progress label of the statistics of teacher `label`.
fn stats_label(label: &str) -> String {
    format!("{label}: bm25 statistics")
}

impl PairTeacher for Bm25Teacher {
    fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Every score moves with the corpus's statistics: computed when needed (a fraction
    /// of a second for SciFact's 1.45M pairs), never stored.
    fn cached(&self) -> bool {
        false
    }

    /// Counting on the CPU only.
    fn uses_device(&self) -> bool {
        false
    }

    /// The corpus statistics: they depend on the corpus alone.
    fn prepare(&self, label: &str, quiet: bool) {
        let (corpus, quarantine) = (self.corpus.clone(), self.quarantine.clone());
        let label = stats_label(label);
        let handle =
            std::thread::spawn(move || corpus_stats(&corpus, quarantine.as_deref(), &label, quiet));
        *self.preparing.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
    }

    fn score_pairs(
        &self,
        pairs: &[PairToScore<'_>],
        ctx: &ScoringContext<'_>,
    ) -> Result<Vec<f32>, EngineError> {
        let stats = self.stats(&stats_label(&ctx.label), ctx.quiet)?;
        let progress = Progress::new(
            &format!("{}: score pairs", ctx.label),
            Some(pairs.len() as u64),
            ctx.quiet,
        );
        // Each distinct query is tokenised once, its terms interned (the query
        // vocabulary) with their idf; each distinct passage's terms are counted once for
        // all its pairs, into a dense table over that vocabulary, so a pair's score is
        // table lookups with no string hashed. The arithmetic is
        // [`Bm25Stats::score_terms`]'s, term by term in query order: the same bits.
        // A text is known by where it lies (the pairs borrow each text from one place,
        // so equal addresses are one text): grouping by address costs an integer
        // comparison where comparing the texts cost a pass over two passages. The order
        // of the groups changes no score.
        let at = |text: &str| (text.as_ptr() as usize, text.len());
        // FNV-1a for these tables' keys (short terms, text addresses): a pair is looked
        // up in them several times, and the standard hasher's cost showed.
        // Each distinct query's terms (by vocabulary index, with their idf), and each
        // pair's query among them.
        let mut vocabulary: FastMap<String, u32> = FastMap::default();
        let mut query_of_text: FastMap<(usize, usize), u32> = FastMap::default();
        let mut queries: Vec<Vec<(u32, f64)>> = Vec::new();
        let query_of: Vec<u32> = pairs
            .iter()
            .map(|p| {
                *query_of_text.entry(at(p.query)).or_insert_with(|| {
                    queries.push(
                        tokens(p.query)
                            .map(|term| {
                                let idf = stats.idf(&term);
                                let next = vocabulary.len() as u32;
                                (*vocabulary.entry(term).or_insert(next), idf)
                            })
                            .collect(),
                    );
                    (queries.len() - 1) as u32
                })
            })
            .collect();
        // The pairs grouped by passage (a counting sort over the passages' first
        // appearances): each group's passage is counted once.
        let mut group_of_text: FastMap<(usize, usize), u32> = FastMap::default();
        let group: Vec<u32> = pairs
            .iter()
            .map(|p| {
                let next = group_of_text.len() as u32;
                *group_of_text.entry(at(p.passage)).or_insert(next)
            })
            .collect();
        let mut starts = vec![0u32; group_of_text.len() + 1];
        for &g in &group {
            starts[g as usize + 1] += 1;
        }
        for g in 1..starts.len() {
            starts[g] += starts[g - 1];
        }
        let mut order = vec![0u32; pairs.len()];
        for (i, &g) in group.iter().enumerate() {
            order[starts[g as usize] as usize] = i as u32;
            starts[g as usize] += 1;
        }
        let passage_of = |i: u32| group[i as usize];
        let per_thread = order.len().div_ceil(ctx.threads.max(1)).max(1);
        let average_length = stats.average_length();
        let mut scored: Vec<Vec<(u32, f32)>> = Vec::new();
        std::thread::scope(|scope| {
            let mut rest = order.as_slice();
            let mut handles = Vec::new();
            while !rest.is_empty() {
                // Cut after the last pair of a passage, so that no passage is counted by
                // two threads.
                let mut end = per_thread.min(rest.len());
                while end < rest.len() && passage_of(rest[end]) == passage_of(rest[end - 1]) {
                    end += 1;
                }
                let (mine, later) = rest.split_at(end);
                rest = later;
                let (progress, params, queries, query_of, vocabulary) =
                    (&progress, self.params, &queries, &query_of, &vocabulary);
                handles.push(scope.spawn(move || {
                    let mut out = Vec::with_capacity(mine.len());
                    let mut counts = PassageCounts::new(vocabulary.len());
                    let mut current = None;
                    for chunk in mine.chunks(PROGRESS_STEP) {
                        for &i in chunk {
                            let pair = &pairs[i as usize];
                            if current != Some(at(pair.passage)) {
                                current = Some(at(pair.passage));
                                counts.count(pair.passage, vocabulary);
                            }
                            let relative_length = if average_length > 0.0 {
                                counts.length as f64 / average_length
                            } else {
                                1.0
                            };
                            let saturation =
                                params.k1 * (1.0 - params.b + params.b * relative_length);
                            let mut score = 0.0;
                            for &(term, idf) in &queries[query_of[i as usize] as usize] {
                                let f = counts.tf[term as usize];
                                if f == 0 {
                                    continue;
                                }
                                let f = f64::from(f);
                                score += idf * f * (params.k1 + 1.0) / (f + saturation);
                            }
                            out.push((i, score as f32));
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

/// One passage's counts of the query vocabulary's terms, in a table over the vocabulary
/// that is cleared term by term between passages.
struct PassageCounts {
    /// Tokens of the passage (every token, in the vocabulary or not).
    length: u64,
    tf: Vec<u32>,
    touched: Vec<u32>,
}

impl PassageCounts {
    fn new(vocabulary: usize) -> Self {
        Self {
            length: 0,
            tf: vec![0; vocabulary],
            touched: Vec::new(),
        }
    }

    /// Counts `passage`'s tokens ([`tokens`], as
    /// [`PassageTerms`](crate::mining::bm25::PassageTerms) does).
    fn count(&mut self, passage: &str, vocabulary: &FastMap<String, u32>) {
        for &t in &self.touched {
            self.tf[t as usize] = 0;
        }
        self.touched.clear();
        self.length = 0;
        let mut lowered = String::new();
        for token in raw_tokens(passage) {
            self.length += 1;
            // `tokens`' lowercasing, into one buffer (ASCII, nearly every token, in place).
            lowered.clear();
            if token.is_ascii() {
                lowered.push_str(token);
                lowered.make_ascii_lowercase();
            } else {
                lowered.push_str(&token.to_lowercase());
            }
            if let Some(&t) = vocabulary.get(lowered.as_str()) {
                if self.tf[t as usize] == 0 {
                    self.touched.push(t);
                }
                self.tf[t as usize] += 1;
            }
        }
    }
}
