//! Candidate selection: from each retriever's ranked list to one fused candidate list per
//! query (RECIPE.md section 3).
//!
//! [`select_candidates`] decides one query on its own, so a stage can run it per query as
//! retrieval results stream in. The checks run in this order and a dropped query is
//! counted under the first that fails:
//!
//! 1. **Held-out source** ([`CandidateDrop::HeldOutSource`]): one of the query's sources is
//!    a held-out passage. Such a query was written for the synthetic test set; training on
//!    it would leak the test set.
//! 2. **No retriever** ([`CandidateDrop::NoRetriever`]): each retriever's list is cut to
//!    `retrieve_top`; a list counts only if a source passage is among its first
//!    `source_in_top` (on the retriever's own ranks, held-out passages included). A query
//!    without any counting list (or without sources) is dropped: no retriever understood
//!    it, so its negatives would be noise.
//! 3. The counting lists are fused ([`super::fuse`], on the retrievers' own ranks), every
//!    held-out passage is removed (held-out passages never become training candidates),
//!    and the fused list is cut to `fused_top`.
//! 4. **Source cut** ([`CandidateDrop::SourceCut`]): no source passage survived the cut.
//!    The positive must be among the candidates the teacher scores.
//! 5. **Too few candidates** ([`CandidateDrop::TooFewCandidates`]): fewer than
//!    `min_candidates` remain; the listwise loss needs a full list.

use std::collections::HashSet;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::rrf::{fuse, DEFAULT_RRF_K};
use super::{MiningError, PassageIdx};

/// The recipe's retrieval depth per retriever.
pub const DEFAULT_RETRIEVE_TOP: usize = 100;
/// The recipe's "source in that retriever's top 20".
pub const DEFAULT_SOURCE_IN_TOP: usize = 20;
/// The recipe's minimum fused list length: the 20 passages the listwise loss ranks.
pub const DEFAULT_MIN_CANDIDATES: usize = 20;
/// Fused lists are cut to the depth of one retriever's list, so the teacher scores at most
/// 100 pairs per query however many retrievers there are.
pub const DEFAULT_FUSED_TOP: usize = DEFAULT_RETRIEVE_TOP;

/// Settings of candidate selection. The defaults are the recipe's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CandidateConfig {
    /// Reciprocal rank fusion constant `k` in `1 / (k + rank)`; finite, `>= 0`.
    pub rrf_k: f64,
    /// Passages kept from each retriever's list (its top `retrieve_top`); `>= 1`.
    pub retrieve_top: usize,
    /// A retriever's list counts for a query only if a source passage is in its top
    /// `source_in_top`; `1..=retrieve_top`.
    pub source_in_top: usize,
    /// A query needs at least this many fused candidates (source included); `>= 1`.
    pub min_candidates: usize,
    /// The fused list is cut to its first `fused_top` passages; `>= min_candidates`.
    pub fused_top: usize,
}

impl Default for CandidateConfig {
    fn default() -> Self {
        Self {
            rrf_k: DEFAULT_RRF_K,
            retrieve_top: DEFAULT_RETRIEVE_TOP,
            source_in_top: DEFAULT_SOURCE_IN_TOP,
            min_candidates: DEFAULT_MIN_CANDIDATES,
            fused_top: DEFAULT_FUSED_TOP,
        }
    }
}

impl CandidateConfig {
    /// Checks every field against the range in its doc.
    pub fn validate(&self) -> Result<(), MiningError> {
        let bad = |field, reason: &str| {
            Err(MiningError::InvalidConfig {
                field,
                reason: reason.to_string(),
            })
        };
        if !(self.rrf_k.is_finite() && self.rrf_k >= 0.0) {
            return bad(
                "rrf_k",
                &format!("{} is not a finite number >= 0", self.rrf_k),
            );
        }
        if self.retrieve_top == 0 {
            return bad("retrieve_top", "must be at least 1");
        }
        if self.source_in_top == 0 || self.source_in_top > self.retrieve_top {
            return bad(
                "source_in_top",
                &format!(
                    "{} is not in 1..={} (retrieve_top)",
                    self.source_in_top, self.retrieve_top
                ),
            );
        }
        if self.min_candidates == 0 {
            return bad("min_candidates", "must be at least 1");
        }
        if self.fused_top < self.min_candidates {
            return bad(
                "fused_top",
                &format!(
                    "{} is below min_candidates ({}): every query would be dropped",
                    self.fused_top, self.min_candidates
                ),
            );
        }
        Ok(())
    }
}

/// One query's retrieval results.
#[derive(Debug, Clone, PartialEq)]
pub struct QueryRetrievals {
    pub query_id: String,
    /// The passages the query was written for, or judged relevant to.
    pub sources: Vec<PassageIdx>,
    /// One list per retriever, best first (as [`crate::retrieval::exact_top_k`] returns).
    pub lists: Vec<Vec<PassageIdx>>,
}

/// A kept query and its fused candidates.
#[derive(Debug, Clone, PartialEq)]
pub struct CandidateList {
    pub query_id: String,
    pub sources: Vec<PassageIdx>,
    /// Fused order, best first; no held-out passage; at least one source; between
    /// `min_candidates` and `fused_top` passages, each once.
    pub candidates: Vec<PassageIdx>,
    /// How many retrievers' lists counted (had a source in their top `source_in_top`).
    pub retrievers_kept: usize,
}

/// Why a query was dropped (see the module docs for the order of the checks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CandidateDrop {
    /// A source passage is held out.
    HeldOutSource,
    /// No retriever had a source passage in its top `source_in_top`.
    NoRetriever,
    /// No source passage is among the first `fused_top` fused candidates.
    SourceCut,
    /// Fewer than `min_candidates` fused candidates.
    TooFewCandidates,
}

/// Selects one query's candidates; `Err` is the reason it is dropped, not a failure.
/// `config` should have passed [`CandidateConfig::validate`].
pub fn select_candidates(
    config: &CandidateConfig,
    held_out: &HashSet<PassageIdx>,
    query: QueryRetrievals,
) -> Result<CandidateList, CandidateDrop> {
    let QueryRetrievals {
        query_id,
        sources,
        lists,
    } = query;
    if sources.iter().any(|s| held_out.contains(s)) {
        return Err(CandidateDrop::HeldOutSource);
    }
    let kept: Vec<&[PassageIdx]> = lists
        .iter()
        .map(|list| &list[..list.len().min(config.retrieve_top)])
        .filter(|list| {
            list[..list.len().min(config.source_in_top)]
                .iter()
                .any(|p| sources.contains(p))
        })
        .collect();
    if kept.is_empty() {
        return Err(CandidateDrop::NoRetriever);
    }
    let candidates: Vec<PassageIdx> = fuse(&kept, config.rrf_k)
        .into_iter()
        .map(|hit| hit.passage)
        .filter(|p| !held_out.contains(p))
        .take(config.fused_top)
        .collect();
    if !candidates.iter().any(|p| sources.contains(p)) {
        return Err(CandidateDrop::SourceCut);
    }
    if candidates.len() < config.min_candidates {
        return Err(CandidateDrop::TooFewCandidates);
    }
    Ok(CandidateList {
        query_id,
        sources,
        candidates,
        retrievers_kept: kept.len(),
    })
}

/// The funnel of candidate selection: how many queries came in, how many were dropped for
/// each reason, how many were kept. `queries_in` is the sum of the others.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CandidateStats {
    pub queries_in: u64,
    pub dropped_held_out_source: u64,
    pub dropped_no_retriever: u64,
    pub dropped_source_cut: u64,
    pub dropped_too_few_candidates: u64,
    pub kept: u64,
    /// Candidates over all kept queries (for the mean).
    pub candidates_kept: u64,
}

impl CandidateStats {
    /// Counts one query's outcome.
    pub fn record(&mut self, outcome: &Result<CandidateList, CandidateDrop>) {
        self.queries_in += 1;
        match outcome {
            Ok(list) => {
                self.kept += 1;
                self.candidates_kept += list.candidates.len() as u64;
            }
            Err(CandidateDrop::HeldOutSource) => self.dropped_held_out_source += 1,
            Err(CandidateDrop::NoRetriever) => self.dropped_no_retriever += 1,
            Err(CandidateDrop::SourceCut) => self.dropped_source_cut += 1,
            Err(CandidateDrop::TooFewCandidates) => self.dropped_too_few_candidates += 1,
        }
    }

    /// Adds another worker's counts.
    pub fn merge(&mut self, other: &Self) {
        self.queries_in += other.queries_in;
        self.dropped_held_out_source += other.dropped_held_out_source;
        self.dropped_no_retriever += other.dropped_no_retriever;
        self.dropped_source_cut += other.dropped_source_cut;
        self.dropped_too_few_candidates += other.dropped_too_few_candidates;
        self.kept += other.kept;
        self.candidates_kept += other.candidates_kept;
    }

    /// Mean candidates per kept query; 0 when none was kept.
    pub fn mean_candidates(&self) -> f64 {
        if self.kept == 0 {
            0.0
        } else {
            self.candidates_kept as f64 / self.kept as f64
        }
    }
}

impl fmt::Display for CandidateStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "candidates: {} queries in; dropped {} (held-out source), {} (no retriever had \
             the source in its top list), {} (source cut from the fused list), {} (too few \
             candidates); kept {} ({:.1} candidates each on average)",
            self.queries_in,
            self.dropped_held_out_source,
            self.dropped_no_retriever,
            self.dropped_source_cut,
            self.dropped_too_few_candidates,
            self.kept,
            self.mean_candidates()
        )
    }
}

/// [`select_candidates`] over many queries: the kept lists in input order, and the funnel.
pub fn select_candidates_all(
    config: &CandidateConfig,
    held_out: &HashSet<PassageIdx>,
    queries: impl IntoIterator<Item = QueryRetrievals>,
) -> (Vec<CandidateList>, CandidateStats) {
    let mut stats = CandidateStats::default();
    let mut kept = Vec::new();
    for query in queries {
        let outcome = select_candidates(config, held_out, query);
        stats.record(&outcome);
        if let Ok(list) = outcome {
            kept.push(list);
        }
    }
    (kept, stats)
}

/// [`select_candidates_all`] over queries `0..n` (`query(i)` gives query `i`'s
/// retrievals), on `threads` threads, each over a contiguous range of queries: the same
/// lists, in the same order, and the same funnel.
pub fn select_candidates_on_threads(
    config: &CandidateConfig,
    held_out: &HashSet<PassageIdx>,
    n: usize,
    query: impl Fn(usize) -> QueryRetrievals + Sync,
    threads: usize,
) -> (Vec<CandidateList>, CandidateStats) {
    let per_thread = n.div_ceil(threads.max(1)).max(1);
    let query = &query;
    let parts: Vec<std::thread::Result<(Vec<CandidateList>, CandidateStats)>> =
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..n)
                .step_by(per_thread)
                .map(|start| {
                    let end = (start + per_thread).min(n);
                    scope.spawn(move || {
                        select_candidates_all(config, held_out, (start..end).map(query))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join()).collect()
        });
    let mut kept = Vec::with_capacity(n);
    let mut stats = CandidateStats::default();
    for part in parts {
        // A selection that panicked is a bug; its panic goes on here.
        let (part_kept, part_stats) = part.unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        kept.extend(part_kept);
        stats.merge(&part_stats);
    }
    (kept, stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Small settings so lists stay readable: lists of 6, source in the top 2, at least 3
    /// candidates, fused lists cut to 5.
    fn small() -> CandidateConfig {
        CandidateConfig {
            rrf_k: 60.0,
            retrieve_top: 6,
            source_in_top: 2,
            min_candidates: 3,
            fused_top: 5,
        }
    }

    fn query(sources: &[PassageIdx], lists: &[&[PassageIdx]]) -> QueryRetrievals {
        QueryRetrievals {
            query_id: "q".to_string(),
            sources: sources.to_vec(),
            lists: lists.iter().map(|l| l.to_vec()).collect(),
        }
    }

    fn none() -> HashSet<PassageIdx> {
        HashSet::new()
    }

    #[test]
    fn defaults_are_the_recipe_and_valid() {
        let c = CandidateConfig::default();
        assert_eq!((c.rrf_k, c.retrieve_top, c.source_in_top), (60.0, 100, 20));
        assert_eq!((c.min_candidates, c.fused_top), (20, 100));
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn invalid_settings_name_their_field() {
        let field = |c: CandidateConfig| match c.validate() {
            Err(MiningError::InvalidConfig { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        let d = CandidateConfig::default;
        assert_eq!(field(CandidateConfig { rrf_k: -1.0, ..d() }), "rrf_k");
        assert_eq!(
            field(CandidateConfig {
                rrf_k: f64::NAN,
                ..d()
            }),
            "rrf_k"
        );
        assert_eq!(
            field(CandidateConfig {
                retrieve_top: 0,
                ..d()
            }),
            "retrieve_top"
        );
        assert_eq!(
            field(CandidateConfig {
                source_in_top: 101,
                ..d()
            }),
            "source_in_top"
        );
        assert_eq!(
            field(CandidateConfig {
                min_candidates: 0,
                ..d()
            }),
            "min_candidates"
        );
        assert_eq!(
            field(CandidateConfig {
                fused_top: 19,
                ..d()
            }),
            "fused_top"
        );
    }

    #[test]
    fn kept_query_fuses_only_the_lists_with_the_source_on_top() {
        // Retriever A has source 1 at rank 2 (counts), B at rank 3 (does not count),
        // C at rank 1 (counts). Fusing A and C with k = 60:
        //   1: 1/62 + 1/61 = 0.032522   (A rank 2, C rank 1)
        //   5: 1/61 + 1/63 = 0.032266   (A rank 1, C rank 3)
        //   6: 1/63        = 0.015873   (A rank 3)
        //   7: 1/62        = 0.016129   (C rank 2)
        //   8: 1/64        = 0.015625   (A rank 4)
        // B's 9 must not appear.
        let q = query(&[1], &[&[5, 1, 6, 8], &[9, 5, 1], &[1, 7, 5]]);
        let list = select_candidates(&small(), &none(), q).unwrap();
        assert_eq!(list.candidates, vec![1, 5, 7, 6, 8]);
        assert_eq!(list.retrievers_kept, 2);
        assert_eq!(list.sources, vec![1]);
    }

    #[test]
    fn lists_are_cut_to_retrieve_top_and_fused_lists_to_fused_top() {
        // Each list has 8 passages; only the first 6 count. Source 0 first in both.
        let lists: [&[PassageIdx]; 2] =
            [&[0, 1, 2, 3, 4, 5, 6, 7], &[0, 11, 12, 13, 14, 15, 16, 17]];
        let deep = CandidateConfig {
            fused_top: 100,
            ..small()
        };
        let list = select_candidates(&deep, &none(), query(&[0], &lists)).unwrap();
        // 0 (two lists), then each rank r of A before the same rank of B (passage order);
        // 6, 7, 16, 17 sit below the 6th rank and never appear.
        assert_eq!(list.candidates, vec![0, 1, 11, 2, 12, 3, 13, 4, 14, 5, 15]);
        let list = select_candidates(&small(), &none(), query(&[0], &lists)).unwrap();
        assert_eq!(list.candidates, vec![0, 1, 11, 2, 12]);
    }

    #[test]
    fn a_second_source_can_keep_the_list() {
        let q = query(&[40, 2], &[&[7, 2, 8, 9]]);
        let list = select_candidates(&small(), &none(), q).unwrap();
        assert_eq!(list.candidates, vec![7, 2, 8, 9]);
    }

    #[test]
    fn held_out_source_drops_the_query_even_when_another_source_is_fine() {
        let held: HashSet<PassageIdx> = [3].into();
        let q = query(&[1, 3], &[&[1, 2, 4, 5]]);
        assert_eq!(
            select_candidates(&small(), &held, q),
            Err(CandidateDrop::HeldOutSource)
        );
    }

    #[test]
    fn held_out_candidates_are_removed_but_ranks_stay_the_retrievers() {
        // 2 is held out. Source 1 is at rank 2 of the raw list, so the list counts;
        // without 2 the fused list is [1, 4, 5].
        let held: HashSet<PassageIdx> = [2].into();
        let q = query(&[1], &[&[2, 1, 4, 5]]);
        let list = select_candidates(&small(), &held, q).unwrap();
        assert_eq!(list.candidates, vec![1, 4, 5]);
        // With the source at rank 3 behind a held-out passage, the list does not count.
        let q = query(&[1], &[&[2, 4, 1, 5]]);
        assert_eq!(
            select_candidates(&small(), &held, q),
            Err(CandidateDrop::NoRetriever)
        );
    }

    #[test]
    fn no_retriever_when_the_source_is_too_deep_or_absent_or_there_is_no_source() {
        let deep = query(&[1], &[&[4, 5, 1, 6], &[7, 8, 9, 1]]);
        assert_eq!(
            select_candidates(&small(), &none(), deep),
            Err(CandidateDrop::NoRetriever)
        );
        let absent = query(&[1], &[&[4, 5, 6]]);
        assert_eq!(
            select_candidates(&small(), &none(), absent),
            Err(CandidateDrop::NoRetriever)
        );
        let sourceless = query(&[], &[&[4, 5, 6]]);
        assert_eq!(
            select_candidates(&small(), &none(), sourceless),
            Err(CandidateDrop::NoRetriever)
        );
        let no_lists = query(&[1], &[]);
        assert_eq!(
            select_candidates(&small(), &none(), no_lists),
            Err(CandidateDrop::NoRetriever)
        );
    }

    #[test]
    fn source_cut_from_the_fused_list_drops_the_query() {
        // Source 4 is third in the only list; the list counts (source_in_top 3) but the
        // fused list is cut to its first 2 passages, [1, 2].
        let config = CandidateConfig {
            source_in_top: 3,
            fused_top: 2,
            min_candidates: 1,
            ..small()
        };
        let q = query(&[4], &[&[1, 2, 4]]);
        assert_eq!(
            select_candidates(&config, &none(), q),
            Err(CandidateDrop::SourceCut)
        );
        let q = query(&[2], &[&[1, 2, 4]]);
        assert_eq!(
            select_candidates(&config, &none(), q).unwrap().candidates,
            vec![1, 2]
        );
    }

    #[test]
    fn too_few_candidates_drops_the_query_and_the_minimum_itself_is_kept() {
        let two = query(&[1], &[&[1, 2]]);
        assert_eq!(
            select_candidates(&small(), &none(), two),
            Err(CandidateDrop::TooFewCandidates)
        );
        // Held-out removal can push a query under the minimum.
        let held: HashSet<PassageIdx> = [3].into();
        let three_minus_one = query(&[1], &[&[1, 2, 3]]);
        assert_eq!(
            select_candidates(&small(), &held, three_minus_one),
            Err(CandidateDrop::TooFewCandidates)
        );
        let three = query(&[1], &[&[1, 2, 3]]);
        assert_eq!(
            select_candidates(&small(), &none(), three)
                .unwrap()
                .candidates
                .len(),
            3
        );
    }

    #[test]
    fn the_funnel_counts_every_query_once_under_its_reason() {
        let held: HashSet<PassageIdx> = [99].into();
        let queries = vec![
            query(&[1], &[&[1, 2, 3, 4]]),       // kept, 4 candidates
            query(&[99], &[&[99, 2, 3]]),        // held-out source
            query(&[1], &[&[2, 3, 4, 1]]),       // no retriever
            query(&[1], &[&[1, 2]]),             // too few
            query(&[1], &[&[1, 2, 3], &[1, 5]]), // kept, 4 candidates: 1, 2, 5, 3
            query(&[1], &[&[1, 2, 3, 99]]),      // kept, 3 candidates (99 removed)
        ];
        let (kept, stats) = select_candidates_all(&small(), &held, queries.clone());
        assert_eq!(kept.len(), 3);
        assert_eq!(kept[1].candidates, vec![1, 2, 5, 3]);
        let expected = CandidateStats {
            queries_in: 6,
            dropped_held_out_source: 1,
            dropped_no_retriever: 1,
            dropped_source_cut: 0,
            dropped_too_few_candidates: 1,
            kept: 3,
            candidates_kept: 11,
        };
        assert_eq!(stats, expected);
        assert!((stats.mean_candidates() - 11.0 / 3.0).abs() < 1e-12);
        let mut twice = stats.clone();
        twice.merge(&stats);
        assert_eq!(
            (twice.queries_in, twice.kept, twice.candidates_kept),
            (12, 6, 22)
        );
        assert_eq!(
            stats.to_string(),
            "candidates: 6 queries in; dropped 1 (held-out source), 1 (no retriever had the \
             source in its top list), 0 (source cut from the fused list), 1 (too few \
             candidates); kept 3 (3.7 candidates each on average)"
        );
        assert_eq!(CandidateStats::default().mean_candidates(), 0.0);

        // On threads, over ranges of the same queries: the same lists in the same order,
        // the same funnel, for any number of threads (more threads than queries too).
        for threads in 1..=8 {
            let (on_threads, stats_on_threads) = select_candidates_on_threads(
                &small(),
                &held,
                queries.len(),
                |i| queries[i].clone(),
                threads,
            );
            assert_eq!(on_threads, kept, "{threads} threads");
            assert_eq!(stats_on_threads, expected, "{threads} threads");
        }
    }
}
