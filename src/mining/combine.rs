//! Combining several teachers' scores into one score per (query, candidate) pair.
//!
//! One teacher: the combined score is its raw score (its weight does not matter), so a
//! single-teacher run follows the recipe exactly. Several teachers: teacher `t`'s scores
//! are calibrated by the increasing affine map [`ScoreScale::calibrated`] fitted on all of
//! its input scores at `percentile_low` and `percentile_high`, so that each teacher's
//! scores span about `[0, 1]` whatever its units (logits, probabilities); the combined
//! score is the weighted mean `sum(w_t * z_t) / sum(w_t)`. Weights need not sum to 1: only
//! their ratios matter, and a zero weight silences a teacher. Calibration does not clip,
//! so a teacher's confident extremes still order the candidates.

use super::normalize::ScoreScale;
use super::{MiningError, PassageIdx};

/// One query's candidates with every teacher's raw scores.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoredQuery {
    pub query_id: String,
    pub sources: Vec<PassageIdx>,
    /// The fused candidate list ([`super::CandidateList::candidates`]), in fused order.
    pub candidates: Vec<PassageIdx>,
    /// `scores[t][i]`: teacher `t`'s raw score of `candidates[i]`.
    pub scores: Vec<Vec<f32>>,
}

/// Checks the weights: at least one, each finite and `>= 0`, not all zero.
pub(super) fn check_weights(weights: &[f32]) -> Result<(), MiningError> {
    if weights.is_empty() {
        return Err(MiningError::InvalidWeights("no teacher".to_string()));
    }
    if let Some(w) = weights.iter().find(|w| !(w.is_finite() && **w >= 0.0)) {
        return Err(MiningError::InvalidWeights(format!(
            "{w} is not a finite number >= 0"
        )));
    }
    if weights.iter().all(|&w| w == 0.0) {
        return Err(MiningError::InvalidWeights("all are zero".to_string()));
    }
    Ok(())
}

/// Checks one query: scores from `teachers` teachers, each as long as the candidate
/// list, all finite.
pub(super) fn check_query(query: &ScoredQuery, teachers: usize) -> Result<(), MiningError> {
    if query.scores.len() != teachers {
        return Err(MiningError::TeacherCount {
            query_id: query.query_id.clone(),
            expected: teachers,
            found: query.scores.len(),
        });
    }
    for (teacher, scores) in query.scores.iter().enumerate() {
        if scores.len() != query.candidates.len() {
            return Err(MiningError::ScoreCount {
                query_id: query.query_id.clone(),
                teacher,
                candidates: query.candidates.len(),
                scores: scores.len(),
            });
        }
        if let Some(i) = scores.iter().position(|s| !s.is_finite()) {
            return Err(MiningError::NonFiniteScore {
                query_id: query.query_id.clone(),
                teacher,
                passage: query.candidates[i],
                score: scores[i],
            });
        }
    }
    Ok(())
}

/// A fitted combination of teachers: a weight and a calibration per teacher.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Combiner {
    weights: Vec<f64>,
    total_weight: f64,
    /// One per teacher; `None` with a single teacher (raw scores are used).
    scales: Option<Vec<ScoreScale>>,
}

impl Combiner {
    /// Fits each teacher's calibration on all of its scores in `queries`, between the
    /// `(low, high)` percentiles (the teacher config's `percentile_low` and
    /// `percentile_high`). The weights and queries must have passed [`check_weights`] and
    /// [`check_query`].
    pub(super) fn fit(
        (percentile_low, percentile_high): (f64, f64),
        weights: &[f32],
        queries: &[ScoredQuery],
    ) -> Self {
        let scales = (weights.len() > 1).then(|| {
            (0..weights.len())
                .map(|t| {
                    let all: Vec<f64> = queries
                        .iter()
                        .flat_map(|q| q.scores[t].iter().map(|&s| f64::from(s)))
                        .collect();
                    // No scores at all means no candidate will ever be combined; the
                    // identity scale stands in.
                    ScoreScale::fit(&all, percentile_low, percentile_high).unwrap_or(ScoreScale {
                        low: 0.0,
                        high: 1.0,
                    })
                })
                .collect()
        });
        let weights: Vec<f64> = weights.iter().map(|&w| f64::from(w)).collect();
        Self {
            total_weight: weights.iter().sum(),
            weights,
            scales,
        }
    }

    /// The query's combined scores, aligned with its candidates.
    pub(super) fn combine(&self, query: &ScoredQuery) -> Vec<f64> {
        let Some(scales) = &self.scales else {
            return query.scores[0].iter().map(|&s| f64::from(s)).collect();
        };
        (0..query.candidates.len())
            .map(|i| {
                let mut sum = 0.0;
                for (t, scale) in scales.iter().enumerate() {
                    sum += self.weights[t] * scale.calibrated(f64::from(query.scores[t][i]));
                }
                sum / self.total_weight
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(candidates: usize, scores: &[&[f32]]) -> ScoredQuery {
        ScoredQuery {
            query_id: "q7".to_string(),
            sources: vec![0],
            candidates: (0..candidates as u32).collect(),
            scores: scores.iter().map(|s| s.to_vec()).collect(),
        }
    }

    #[test]
    fn bad_weights_are_errors() {
        for weights in [&[][..], &[-1.0], &[f32::NAN], &[f32::INFINITY], &[0.0, 0.0]] {
            let err = check_weights(weights).unwrap_err();
            assert!(
                matches!(err, MiningError::InvalidWeights(_)),
                "{weights:?}: {err}"
            );
        }
        assert_eq!(check_weights(&[0.0, 2.0]), Ok(()));
    }

    #[test]
    fn bad_scores_are_errors_naming_the_query_teacher_and_passage() {
        let err = check_query(&q(2, &[&[1.0, 0.0]]), 2).unwrap_err();
        assert_eq!(
            err.to_string(),
            "query `q7`: scores from 1 teachers, 2 weights"
        );
        let err = check_query(&q(2, &[&[1.0, 0.0], &[1.0]]), 2).unwrap_err();
        assert_eq!(
            err.to_string(),
            "query `q7`: teacher 1 gave 1 scores for 2 candidates"
        );
        let err = check_query(&q(2, &[&[1.0, f32::NAN]]), 1).unwrap_err();
        assert_eq!(
            err.to_string(),
            "query `q7`: teacher 0 scored passage 1 as NaN"
        );
        let err = check_query(&q(2, &[&[f32::NEG_INFINITY, 0.0]]), 1).unwrap_err();
        assert_eq!(
            err.to_string(),
            "query `q7`: teacher 0 scored passage 0 as -inf"
        );
        assert_eq!(check_query(&q(2, &[&[1.0, 0.0], &[3.0, 4.0]]), 2), Ok(()));
    }

    #[test]
    fn calibration_is_fitted_per_teacher_over_all_queries() {
        // Percentiles 0 and 100 (min-max). Teacher 0 spans [0, 10] and teacher 1 [-1, 1]
        // over both queries. Weights 1:1:
        //   query a: z0 = [1, 0.2], z1 = [0, 1]   -> [0.5, 0.6]
        //   query b: z0 = [0],      z1 = [0.5]    -> [0.25]
        let min_max = (0.0, 100.0);
        let queries = [q(2, &[&[10.0, 2.0], &[-1.0, 1.0]]), q(1, &[&[0.0], &[0.0]])];
        let combiner = Combiner::fit(min_max, &[1.0, 1.0], &queries);
        assert_eq!(combiner.combine(&queries[0]), vec![0.5, 0.6]);
        assert_eq!(combiner.combine(&queries[1]), vec![0.25]);
        // One teacher: raw scores, weight ignored.
        let one = [q(2, &[&[10.0, 2.0]])];
        let raw = Combiner::fit(min_max, &[5.0], &one).combine(&one[0]);
        assert_eq!(raw, vec![10.0, 2.0]);
    }
}
