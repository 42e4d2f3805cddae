//! The teacher check: the teachers' reranking of a retriever's candidates.
//!
//! The recipe's premise is that the teacher ranks better than the student it trains;
//! a user should see that before paying for training. Each query's candidates (a
//! retriever's top-k, in its order) are ordered by the teachers' combined score,
//! calibrated and weighted exactly as labelling combines them ([`super::combine`]),
//! highest first; equal scores keep the retriever's order. Evaluating that ranking with
//! the query set's judgements gives the teachers' metrics beside the retriever's.

use super::combine::{check_query, check_weights, Combiner, ScoredQuery};
use super::{MiningError, PassageIdx, TeacherConfig};

/// Every query's candidates in the teachers' order, each with its combined score;
/// `queries` in any order, the result in the same order.
pub fn rerank(
    config: &TeacherConfig,
    weights: &[f32],
    queries: &[ScoredQuery],
) -> Result<Vec<Vec<(PassageIdx, f64)>>, MiningError> {
    check_weights(weights)?;
    for query in queries {
        check_query(query, weights.len())?;
    }
    let combiner = Combiner::fit(
        (config.percentile_low, config.percentile_high),
        weights,
        queries,
    );
    Ok(queries
        .iter()
        .map(|query| {
            let combined = combiner.combine(query);
            let mut ranked: Vec<(usize, f64)> = combined.into_iter().enumerate().collect();
            // Stable: equal scores keep the retriever's order.
            ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
            ranked
                .into_iter()
                .map(|(i, score)| (query.candidates[i], score))
                .collect()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(id: &str, candidates: &[PassageIdx], scores: &[&[f32]]) -> ScoredQuery {
        ScoredQuery {
            query_id: id.into(),
            sources: Vec::new(),
            candidates: candidates.to_vec(),
            scores: scores.iter().map(|s| s.to_vec()).collect(),
        }
    }

    #[test]
    fn one_teacher_orders_by_its_raw_score_and_ties_keep_the_retrievers_order() {
        let config = TeacherConfig::default();
        let queries = [query("a", &[7, 3, 9, 4], &[&[0.1, 0.9, 0.5, 0.5]])];
        let ranked = rerank(&config, &[1.0], &queries).unwrap();
        let order: Vec<PassageIdx> = ranked[0].iter().map(|&(p, _)| p).collect();
        // 3 (0.9), then 9 and 4 tied at 0.5 in the retriever's order, then 7.
        assert_eq!(order, [3, 9, 4, 7]);
        assert!((ranked[0][0].1 - 0.9).abs() < 1e-7);
    }

    #[test]
    fn two_teachers_combine_as_labelling_does() {
        // Percentiles 0 and 100 (min-max per teacher over both queries), weights 1:3.
        // Teacher 0 spans [0, 4], teacher 1 [0, 1]:
        //   query a: z0 = [1, 0, 0.5], z1 = [0, 1, 0.5] -> [0.25, 0.75, 0.5]
        //   query b: z0 = [0.25],      z1 = [0]         -> [0.0625]
        let config = TeacherConfig {
            percentile_low: 0.0,
            percentile_high: 100.0,
            ..TeacherConfig::default()
        };
        let queries = [
            query("a", &[0, 1, 2], &[&[4.0, 0.0, 2.0], &[0.0, 1.0, 0.5]]),
            query("b", &[5], &[&[1.0], &[0.0]]),
        ];
        let ranked = rerank(&config, &[1.0, 3.0], &queries).unwrap();
        assert_eq!(ranked[0], vec![(1, 0.75), (2, 0.5), (0, 0.25)]);
        assert_eq!(ranked[1], vec![(5, 0.0625)]);
        assert!(rerank(&config, &[1.0], &queries).is_err());
    }
}
