//! Teacher labelling: from raw cross-encoder scores to normalised, filtered, truncated
//! passage lists (RECIPE.md section 4).
//!
//! [`label_queries`] sees all queries at once (its thresholds are percentiles over all of
//! them). In order:
//!
//! 1. **Check** every query: one score vector per teacher (as many as weights), each as
//!    long as the candidate list, every score finite. A violation is an error, not a drop.
//! 2. **Combine.** One teacher: its raw scores. Several: each teacher's scores are
//!    calibrated by [`ScoreScale::calibrated`] (fitted on all of that teacher's input
//!    scores at `percentile_low`/`percentile_high`), then averaged with the weights:
//!    `sum(w_t * z_t) / sum(w_t)`.
//! 3. **Order** each query's candidates by combined score descending; ties keep the
//!    candidate order (the fused retrieval order), so the result is deterministic.
//! 4. **Source first** (when `require_source_first`): drop a query whose first passage is
//!    not one of its sources. A query without candidates is dropped here too.
//! 5. **Top score**: over the queries still kept, take the `min_top_score_percentile`-th
//!    percentile of their top scores; drop the queries whose top score is below it
//!    (equal is kept).
//! 6. **Normalise**: fit [`ScoreScale`] on all combined scores (every candidate, not only
//!    the first `keep_top`) of the kept queries; map each score to
//!    [`ScoreScale::normalized`].
//! 7. **Truncate** each list to its first `keep_top` passages. The first is the positive.
//!
//! With one teacher the combined score is the raw score, so this is the recipe exactly.
//! Normalising is monotone, so the order of step 3 is the final order.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::combine::{check_query, check_weights, Combiner, ScoredQuery};
use super::normalize::{percentile, ScoreScale};
use super::{MiningError, PassageIdx};

/// The recipe's low normalisation percentile: scores at or below it map to 0.
pub const DEFAULT_PERCENTILE_LOW: f64 = 1.0;
/// The recipe's high normalisation percentile: scores at or above it map to 1.
pub const DEFAULT_PERCENTILE_HIGH: f64 = 99.0;
/// The recipe drops the quarter of queries whose best passage the teacher likes least.
pub const DEFAULT_MIN_TOP_SCORE_PERCENTILE: f64 = 25.0;
/// The recipe's list length for the listwise loss: 1 positive and 19 hard negatives.
pub const DEFAULT_KEEP_TOP: usize = 20;
/// The recipe's 90/10 train/dev split.
pub const DEFAULT_DEV_FRACTION: f64 = 0.1;
/// The recipe's split seed.
pub const DEFAULT_SPLIT_SEED: u64 = 42;

/// Settings of teacher labelling and of the split. The defaults are the recipe's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TeacherConfig {
    /// Percentile of the kept queries' scores that normalises to 0; in `[0, 100)`.
    pub percentile_low: f64,
    /// Percentile that normalises to 1; in `(percentile_low, 100]`.
    pub percentile_high: f64,
    /// Queries whose top score is below this percentile of all kept top scores are
    /// dropped; in `[0, 100]` (0 drops none).
    pub min_top_score_percentile: f64,
    /// Passages kept per query, in teacher order; `>= 1`.
    pub keep_top: usize,
    /// Share of queries in the dev split; in `[0, 1]` (see [`super::split_of`]).
    pub dev_fraction: f64,
    /// Seed of the split hash.
    pub split_seed: u64,
    /// Drop a query unless the teacher ranks one of its sources first.
    pub require_source_first: bool,
}

impl Default for TeacherConfig {
    fn default() -> Self {
        Self {
            percentile_low: DEFAULT_PERCENTILE_LOW,
            percentile_high: DEFAULT_PERCENTILE_HIGH,
            min_top_score_percentile: DEFAULT_MIN_TOP_SCORE_PERCENTILE,
            keep_top: DEFAULT_KEEP_TOP,
            dev_fraction: DEFAULT_DEV_FRACTION,
            split_seed: DEFAULT_SPLIT_SEED,
            require_source_first: true,
        }
    }
}

impl TeacherConfig {
    /// Checks every field against the range in its doc.
    pub fn validate(&self) -> Result<(), MiningError> {
        let bad = |field, value: f64, range: &str| {
            Err(MiningError::InvalidConfig {
                field,
                reason: format!("{value} is not in {range}"),
            })
        };
        if !(0.0..100.0).contains(&self.percentile_low) {
            return bad("percentile_low", self.percentile_low, "[0, 100)");
        }
        if !(self.percentile_high > self.percentile_low && self.percentile_high <= 100.0) {
            return bad(
                "percentile_high",
                self.percentile_high,
                &format!("({}, 100]", self.percentile_low),
            );
        }
        if !(0.0..=100.0).contains(&self.min_top_score_percentile) {
            return bad(
                "min_top_score_percentile",
                self.min_top_score_percentile,
                "[0, 100]",
            );
        }
        if self.keep_top == 0 {
            return Err(MiningError::InvalidConfig {
                field: "keep_top",
                reason: "must be at least 1".to_string(),
            });
        }
        if !(0.0..=1.0).contains(&self.dev_fraction) {
            return bad("dev_fraction", self.dev_fraction, "[0, 1]");
        }
        Ok(())
    }
}

/// A kept query's labelled list: passages in teacher order with normalised scores.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelledQuery {
    pub query_id: String,
    pub sources: Vec<PassageIdx>,
    /// At most `keep_top` passages, best first; the first is the positive.
    pub passages: Vec<PassageIdx>,
    /// Normalised scores in `[0, 1]`, non-increasing, one per passage.
    pub scores: Vec<f32>,
}

/// The funnel of teacher labelling; `queries_in` is the sum of the drops and `kept`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TeacherStats {
    pub queries_in: u64,
    /// Queries without any candidate.
    pub dropped_no_candidates: u64,
    /// Queries whose first passage in teacher order is not a source.
    pub dropped_source_not_first: u64,
    /// Queries whose top score is below `top_score_threshold`.
    pub dropped_low_top_score: u64,
    pub kept: u64,
    /// The top-score percentile (combined score units); `None` when no query reached
    /// that step.
    pub top_score_threshold: Option<f64>,
    /// The scale the kept scores were normalised with; `None` when nothing was kept.
    pub scale: Option<(f64, f64)>,
}

impl fmt::Display for TeacherStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "teacher: {} queries in; dropped {} (no candidates), {} (source not ranked \
             first), {} (top score below ",
            self.queries_in,
            self.dropped_no_candidates,
            self.dropped_source_not_first,
            self.dropped_low_top_score,
        )?;
        match self.top_score_threshold {
            Some(t) => write!(f, "{t:.4})")?,
            None => write!(f, "the percentile)")?,
        }
        write!(f, "; kept {}", self.kept)?;
        if let Some((low, high)) = self.scale {
            write!(f, " (scores normalised from [{low:.4}, {high:.4}])")?;
        }
        Ok(())
    }
}

/// A query that passed the source check: its candidates with combined scores, best first.
struct Ranked {
    query_id: String,
    sources: Vec<PassageIdx>,
    order: Vec<(PassageIdx, f64)>,
}

/// Labels all queries (the steps of the module docs) with one weight per teacher; returns
/// the kept queries in input order and the funnel. `config` should have passed
/// [`TeacherConfig::validate`]; the weights and the queries are checked here.
pub fn label_queries(
    config: &TeacherConfig,
    weights: &[f32],
    queries: Vec<ScoredQuery>,
) -> Result<(Vec<LabelledQuery>, TeacherStats), MiningError> {
    check_weights(weights)?;
    for query in &queries {
        check_query(query, weights.len())?;
    }
    let combiner = Combiner::fit(
        (config.percentile_low, config.percentile_high),
        weights,
        &queries,
    );
    let mut stats = TeacherStats {
        queries_in: queries.len() as u64,
        ..TeacherStats::default()
    };

    // Steps 3 and 4: each surviving query with its combined scores in teacher order. A
    // query's raw scores are dropped as soon as they are combined.
    let mut ranked: Vec<Ranked> = Vec::new();
    for query in queries {
        let scores = combiner.combine(&query);
        let ScoredQuery {
            query_id,
            sources,
            candidates,
            ..
        } = query;
        let mut order: Vec<(PassageIdx, f64)> = candidates.into_iter().zip(scores).collect();
        // A stable sort on the score alone keeps the candidate order among ties.
        order.sort_by(|a, b| b.1.total_cmp(&a.1));
        let Some(&(first, _)) = order.first() else {
            stats.dropped_no_candidates += 1;
            continue;
        };
        if config.require_source_first && !sources.contains(&first) {
            stats.dropped_source_not_first += 1;
            continue;
        }
        ranked.push(Ranked {
            query_id,
            sources,
            order,
        });
    }

    // Step 5.
    let tops: Vec<f64> = ranked.iter().map(|r| r.order[0].1).collect();
    let threshold = percentile(&tops, config.min_top_score_percentile);
    stats.top_score_threshold = threshold;
    if let Some(threshold) = threshold {
        let before = ranked.len();
        ranked.retain(|r| r.order[0].1 >= threshold);
        stats.dropped_low_top_score = (before - ranked.len()) as u64;
    }

    // Steps 6 and 7.
    let kept_scores: Vec<f64> = ranked
        .iter()
        .flat_map(|r| r.order.iter().map(|&(_, s)| s))
        .collect();
    let scale = ScoreScale::fit(&kept_scores, config.percentile_low, config.percentile_high);
    stats.scale = scale.map(|s| (s.low, s.high));
    let labelled: Vec<LabelledQuery> = match scale {
        None => Vec::new(),
        Some(scale) => ranked
            .into_iter()
            .map(
                |Ranked {
                     query_id,
                     sources,
                     order,
                 }| {
                    let top = &order[..order.len().min(config.keep_top)];
                    LabelledQuery {
                        query_id,
                        sources,
                        passages: top.iter().map(|&(p, _)| p).collect(),
                        scores: top
                            .iter()
                            .map(|&(_, s)| scale.normalized(s) as f32)
                            .collect(),
                    }
                },
            )
            .collect(),
    };
    stats.kept = labelled.len() as u64;
    Ok((labelled, stats))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(
        id: &str,
        sources: &[PassageIdx],
        candidates: &[PassageIdx],
        scores: &[&[f32]],
    ) -> ScoredQuery {
        ScoredQuery {
            query_id: id.to_string(),
            sources: sources.to_vec(),
            candidates: candidates.to_vec(),
            scores: scores.iter().map(|s| s.to_vec()).collect(),
        }
    }

    /// Min-max normalisation (percentiles 0 and 100), no top-score filter, lists of 3.
    fn plain() -> TeacherConfig {
        TeacherConfig {
            percentile_low: 0.0,
            percentile_high: 100.0,
            min_top_score_percentile: 0.0,
            keep_top: 3,
            ..TeacherConfig::default()
        }
    }

    fn ids(labelled: &[LabelledQuery]) -> Vec<&str> {
        labelled.iter().map(|l| l.query_id.as_str()).collect()
    }

    #[test]
    fn defaults_are_the_recipe_and_invalid_settings_name_their_field() {
        let c = TeacherConfig::default();
        assert_eq!((c.percentile_low, c.percentile_high), (1.0, 99.0));
        assert_eq!((c.min_top_score_percentile, c.keep_top), (25.0, 20));
        assert_eq!(
            (c.dev_fraction, c.split_seed, c.require_source_first),
            (0.1, 42, true)
        );
        assert_eq!(c.validate(), Ok(()));
        let field = |c: TeacherConfig| match c.validate() {
            Err(MiningError::InvalidConfig { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        let d = TeacherConfig::default;
        assert_eq!(
            field(TeacherConfig {
                percentile_low: 100.0,
                ..d()
            }),
            "percentile_low"
        );
        assert_eq!(
            field(TeacherConfig {
                percentile_low: f64::NAN,
                ..d()
            }),
            "percentile_low"
        );
        assert_eq!(
            field(TeacherConfig {
                percentile_high: 1.0,
                ..d()
            }),
            "percentile_high"
        );
        assert_eq!(
            field(TeacherConfig {
                percentile_high: 101.0,
                ..d()
            }),
            "percentile_high"
        );
        let top = TeacherConfig {
            min_top_score_percentile: -1.0,
            ..d()
        };
        assert_eq!(field(top), "min_top_score_percentile");
        assert_eq!(field(TeacherConfig { keep_top: 0, ..d() }), "keep_top");
        assert_eq!(
            field(TeacherConfig {
                dev_fraction: 1.5,
                ..d()
            }),
            "dev_fraction"
        );
    }

    #[test]
    fn source_must_be_first_and_ties_keep_the_candidate_order() {
        let queries = vec![
            q("beaten", &[10], &[10, 11, 12], &[&[5.0, 7.0, 1.0]]),
            // 21 and 20 tie at 3; 21 comes first among the candidates, so it stays first.
            q("tie-lost", &[20], &[21, 20, 22], &[&[3.0, 3.0, 0.0]]),
            q("tie-won", &[30], &[30, 31, 32], &[&[3.0, 3.0, 0.0]]),
            // The second of two sources is first: kept.
            q(
                "second-source",
                &[40, 41],
                &[40, 41, 42],
                &[&[1.0, 6.0, 2.0]],
            ),
        ];
        let (kept, stats) = label_queries(&plain(), &[1.0], queries.clone()).unwrap();
        assert_eq!(ids(&kept), vec!["tie-won", "second-source"]);
        assert_eq!(kept[0].passages, vec![30, 31, 32]);
        assert_eq!(kept[1].passages, vec![41, 42, 40]);
        assert_eq!(
            (stats.queries_in, stats.dropped_source_not_first, stats.kept),
            (4, 2, 2)
        );

        let lenient = TeacherConfig {
            require_source_first: false,
            ..plain()
        };
        let (kept, stats) = label_queries(&lenient, &[1.0], queries).unwrap();
        assert_eq!(kept.len(), 4);
        assert_eq!(kept[0].passages, vec![11, 10, 12]);
        assert_eq!(kept[1].passages, vec![21, 20, 22]);
        assert_eq!(stats.dropped_source_not_first, 0);
    }

    #[test]
    fn queries_below_the_top_score_percentile_are_dropped_and_equal_is_kept() {
        let config = TeacherConfig {
            min_top_score_percentile: 25.0,
            ..plain()
        };
        // Top scores 1, 2, 3, 4: the 25th percentile is 1.75, so only "one" goes.
        let tops = [1.0, 2.0, 3.0, 4.0];
        let names = ["one", "two", "three", "four"];
        let queries: Vec<ScoredQuery> = names
            .iter()
            .zip(tops)
            .map(|(name, top)| q(name, &[0], &[0, 1], &[&[top, 0.0]]))
            .collect();
        let (kept, stats) = label_queries(&config, &[1.0], queries).unwrap();
        assert_eq!(ids(&kept), vec!["two", "three", "four"]);
        assert_eq!(stats.top_score_threshold, Some(1.75));
        assert_eq!(stats.dropped_low_top_score, 1);
        // Top scores 2, 2, 2, 4: the 25th percentile is 2, and a top equal to it stays.
        let queries: Vec<ScoredQuery> = [2.0, 2.0, 2.0, 4.0]
            .iter()
            .enumerate()
            .map(|(i, &top)| q(&format!("q{i}"), &[0], &[0, 1], &[&[top, 0.0]]))
            .collect();
        let (kept, stats) = label_queries(&config, &[1.0], queries).unwrap();
        assert_eq!(kept.len(), 4);
        assert_eq!(stats.top_score_threshold, Some(2.0));
    }

    #[test]
    fn the_top_score_percentile_is_over_queries_that_passed_the_source_check() {
        // Without "beaten" (top 100, source not first) the tops are 1, 2, 3, 4 as above;
        // with it counted the threshold would be 2 and "two" would survive only barely.
        let config = TeacherConfig {
            min_top_score_percentile: 25.0,
            ..plain()
        };
        let mut queries: Vec<ScoredQuery> = [1.0, 2.0, 3.0, 4.0]
            .iter()
            .enumerate()
            .map(|(i, &top)| q(&format!("q{i}"), &[0], &[0, 1], &[&[top, 0.0]]))
            .collect();
        queries.push(q("beaten", &[0], &[0, 1], &[&[0.0, 100.0]]));
        let (_, stats) = label_queries(&config, &[1.0], queries).unwrap();
        assert_eq!(stats.top_score_threshold, Some(1.75));
        assert_eq!(
            (stats.dropped_source_not_first, stats.dropped_low_top_score),
            (1, 1)
        );
    }

    #[test]
    fn scores_are_normalised_over_all_kept_candidates_then_truncated() {
        // Kept scores: a = 10, 6, 8, 2, 4 and b = 9, 3. Min 2 (a's last passage, cut by
        // keep_top 3 but still part of the scale), max 10: s -> (s - 2) / 8.
        let queries = vec![
            q("a", &[1], &[1, 2, 3, 4, 5], &[&[10.0, 6.0, 8.0, 2.0, 4.0]]),
            q("b", &[7], &[7, 8], &[&[9.0, 3.0]]),
        ];
        let (kept, stats) = label_queries(&plain(), &[1.0], queries).unwrap();
        assert_eq!(stats.scale, Some((2.0, 10.0)));
        assert_eq!(kept[0].passages, vec![1, 3, 2]); // 10, 8, 6
        assert_eq!(kept[0].scores, vec![1.0, 0.75, 0.5]);
        assert_eq!(kept[1].passages, vec![7, 8]);
        assert_eq!(kept[1].scores, vec![0.875, 0.125]);
        assert_eq!(kept[1].sources, vec![7]);
    }

    #[test]
    fn default_percentiles_clip_the_tails() {
        // One query with candidates 0..=100 scored by their own number: the 1st
        // percentile is 1 and the 99th is 99, so s -> (s - 1) / 98, clipped.
        let candidates: Vec<PassageIdx> = (0..=100).rev().collect();
        let scores: Vec<f32> = candidates.iter().map(|&c| c as f32).collect();
        let config = TeacherConfig {
            keep_top: 200,
            ..TeacherConfig::default()
        };
        let (kept, stats) = label_queries(
            &config,
            &[1.0],
            vec![q("q", &[100], &candidates, &[&scores])],
        )
        .unwrap();
        assert_eq!(stats.scale, Some((1.0, 99.0)));
        let s = &kept[0].scores;
        assert_eq!(s.len(), 101);
        assert_eq!((s[0], s[1]), (1.0, 1.0)); // 100 -> 99/98 clipped; 99 -> 1
        assert_eq!(s[50], 0.5); // passage 50: 49/98
        assert_eq!((s[99], s[100]), (0.0, 0.0)); // 1 -> 0; 0 -> -1/98 clipped
    }

    #[test]
    fn teacher_weights_take_a_weighted_mean_of_calibrated_scores() {
        // Min-max calibration per teacher: teacher 0 spans 0..10, teacher 1 spans 0..100.
        //   z0 = [1, 0, 0.5], z1 = [0, 1, 0.5] for candidates [1, 2, 3].
        let query = || {
            vec![q(
                "q",
                &[1],
                &[1, 2, 3],
                &[&[10.0, 0.0, 5.0], &[0.0, 100.0, 50.0]],
            )]
        };
        // Weights 3:1: (3 z0 + z1) / 4 = [0.75, 0.25, 0.5]: source first; normalised over
        // [0.25, 0.75]: [1, 0.5, 0].
        let (kept, _) = label_queries(&plain(), &[3.0, 1.0], query()).unwrap();
        assert_eq!(kept[0].passages, vec![1, 3, 2]);
        assert_eq!(kept[0].scores, vec![1.0, 0.5, 0.0]);
        // Only ratios matter: 6:2 is 3:1.
        assert_eq!(
            label_queries(&plain(), &[6.0, 2.0], query()).unwrap().0,
            kept
        );
        // Weights 1:3: [0.25, 0.75, 0.5]: passage 2 first, the query is dropped.
        let (kept, stats) = label_queries(&plain(), &[1.0, 3.0], query()).unwrap();
        assert!(kept.is_empty());
        assert_eq!(stats.dropped_source_not_first, 1);
        // A zero weight silences a teacher: 1:0 orders by teacher 0 alone.
        let (kept, _) = label_queries(&plain(), &[1.0, 0.0], query()).unwrap();
        assert_eq!(kept[0].scores, vec![1.0, 0.5, 0.0]); // [1, 0.5, 0] already spans [0, 1]
    }

    #[test]
    fn one_teacher_uses_raw_scores_whatever_its_weight() {
        let queries = vec![q("q", &[1], &[1, 2, 3], &[&[4.0, 2.0, 3.0]])];
        let one = label_queries(&plain(), &[1.0], queries.clone()).unwrap();
        let other = label_queries(&plain(), &[0.3], queries).unwrap();
        assert_eq!(one, other);
        assert_eq!(one.0[0].scores, vec![1.0, 0.5, 0.0]); // (s - 2) / 2
    }

    #[test]
    fn empty_candidates_and_empty_input_are_counted_not_errors() {
        let queries = vec![
            q("none", &[1], &[], &[&[]]),
            q("q", &[1], &[1, 2], &[&[2.0, 1.0]]),
        ];
        let (kept, stats) = label_queries(&plain(), &[1.0], queries).unwrap();
        assert_eq!(ids(&kept), vec!["q"]);
        assert_eq!((stats.dropped_no_candidates, stats.kept), (1, 1));
        assert_eq!(
            stats.to_string(),
            "teacher: 2 queries in; dropped 1 (no candidates), 0 (source not ranked first), \
             0 (top score below 2.0000); kept 1 (scores normalised from [1.0000, 2.0000])"
        );
        let (kept, stats) = label_queries(&plain(), &[1.0], Vec::new()).unwrap();
        assert!(kept.is_empty());
        assert_eq!((stats.top_score_threshold, stats.scale), (None, None));
    }
}
