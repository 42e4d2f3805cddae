//! Reciprocal rank fusion of ranked passage lists.
//!
//! A passage's fused score is `sum over lists of 1 / (k + rank)`, its rank in a list
//! 1-based; a list that does not contain it contributes nothing. Contracts:
//!
//! - **Order.** Fused score descending; ties by best (smallest) single rank, then by
//!   passage position ascending. The output never depends on the order of the lists.
//! - **Exact ties.** A passage's terms are summed in ascending rank order, so two passages
//!   holding the same ranks (in different lists) get bit-identical scores and fall to the
//!   tie-break rather than to floating-point rounding.
//! - **Duplicates.** A passage listed twice in one list counts once, at its first (best)
//!   rank; later positions of the list keep their ranks.

use std::collections::BTreeMap;

use super::PassageIdx;

/// The recipe's fusion constant (Cormack et al. 2009, and the paper's scripts): large
/// enough that rank 1 in one list is worth little more than rank 10 (1/61 vs 1/70), so
/// agreement between retrievers outweighs any single retriever's top ranks.
pub const DEFAULT_RRF_K: f64 = 60.0;

/// One passage of a fused list.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FusedHit {
    pub passage: PassageIdx,
    /// `sum over lists of 1 / (k + rank)`.
    pub score: f64,
    /// The passage's best 1-based rank in any list.
    pub best_rank: u32,
    /// How many lists contain the passage.
    pub lists: u32,
}

/// Fuses ranked lists (each best first) with constant `k` (`k >= 0`; the settings that
/// reach this are validated by [`super::CandidateConfig::validate`]). Returns every
/// passage of every list once, in the order described in the module docs.
pub fn fuse<L: AsRef<[PassageIdx]>>(lists: &[L], k: f64) -> Vec<FusedHit> {
    // passage -> its rank in each list that holds it
    let mut ranks: BTreeMap<PassageIdx, Vec<u32>> = BTreeMap::new();
    for list in lists {
        let list = list.as_ref();
        let mut seen = std::collections::HashSet::with_capacity(list.len());
        for (i, &passage) in list.iter().enumerate() {
            if seen.insert(passage) {
                let rank = u32::try_from(i + 1).unwrap_or(u32::MAX);
                ranks.entry(passage).or_default().push(rank);
            }
        }
    }
    let mut fused: Vec<FusedHit> = ranks
        .into_iter()
        .map(|(passage, mut r)| {
            r.sort_unstable();
            let score = r.iter().map(|&rank| 1.0 / (k + f64::from(rank))).sum();
            FusedHit {
                passage,
                score,
                best_rank: r[0],
                lists: u32::try_from(r.len()).unwrap_or(u32::MAX),
            }
        })
        .collect();
    fused.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then(a.best_rank.cmp(&b.best_rank))
            .then(a.passage.cmp(&b.passage))
    });
    fused
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(fused: &[FusedHit]) -> Vec<PassageIdx> {
        fused.iter().map(|h| h.passage).collect()
    }

    #[test]
    fn two_lists_by_hand() {
        // A = [1, 2, 3], B = [3, 1, 4], k = 60:
        //   1: 1/61 + 1/62 = 0.016393 + 0.016129 = 0.032522
        //   3: 1/63 + 1/61 = 0.015873 + 0.016393 = 0.032266
        //   2: 1/62                             = 0.016129
        //   4: 1/63                             = 0.015873
        let fused = fuse(&[vec![1, 2, 3], vec![3, 1, 4]], 60.0);
        assert_eq!(order(&fused), vec![1, 3, 2, 4]);
        assert!((fused[0].score - (1.0 / 61.0 + 1.0 / 62.0)).abs() < 1e-15);
        assert!((fused[1].score - (1.0 / 63.0 + 1.0 / 61.0)).abs() < 1e-15);
        assert!((fused[2].score - 1.0 / 62.0).abs() < 1e-15);
        assert_eq!((fused[1].best_rank, fused[1].lists), (1, 2));
        assert_eq!((fused[3].best_rank, fused[3].lists), (3, 1));
    }

    #[test]
    fn three_lists_agreement_beats_one_top_rank() {
        // A = [7, 8, 9], B = [8, 9, 7], C = [9, 10, 8], k = 60:
        //   7: 1/61 + 1/63         = 0.032266
        //   8: 1/62 + 1/61 + 1/63  = 0.048395
        //   9: 1/63 + 1/62 + 1/61  = 0.048395, the same ranks {1, 2, 3} as 8: a tie,
        //      broken by best rank (both 1), then by passage (8 first)
        //   10: 1/62               = 0.016129
        let fused = fuse(&[vec![7, 8, 9], vec![8, 9, 7], vec![9, 10, 8]], 60.0);
        assert_eq!(order(&fused), vec![8, 9, 7, 10]);
        assert_eq!(fused[0].score.to_bits(), fused[1].score.to_bits());
        assert!((fused[0].score - (1.0 / 61.0 + 1.0 / 62.0 + 1.0 / 63.0)).abs() < 1e-15);
        assert!((fused[2].score - (1.0 / 61.0 + 1.0 / 63.0)).abs() < 1e-15);
    }

    #[test]
    fn equal_scores_tie_break_by_best_rank_then_passage() {
        // A = [6, 5, 4], B = [3, 5, 4], C = [0, 1, 3], k = 0 (scores are 1 / rank):
        //   3: 1/1 + 1/3 = 1.333
        //   0: 1/1       = 1.0, best rank 1
        //   6: 1/1       = 1.0, best rank 1 (ties with 0: passage 0 first)
        //   5: 1/2 + 1/2 = 1.0, best rank 2 (same score, worse best rank)
        //   4: 1/3 + 1/3 = 0.667
        //   1: 1/2       = 0.5
        let fused = fuse(&[vec![6, 5, 4], vec![3, 5, 4], vec![0, 1, 3]], 0.0);
        assert_eq!(order(&fused), vec![3, 0, 6, 5, 4, 1]);
        assert_eq!(fused[1].score, 1.0);
        assert_eq!(fused[3].score, 1.0);
        assert_eq!(fused[3].best_rank, 2);
    }

    #[test]
    fn list_order_does_not_matter() {
        let a = vec![4, 2, 9, 1];
        let b = vec![2, 4, 1, 3];
        let c = vec![9, 3, 2];
        let one = fuse(&[a.clone(), b.clone(), c.clone()], 60.0);
        let other = fuse(&[c, a, b], 60.0);
        assert_eq!(one, other);
    }

    #[test]
    fn duplicates_in_a_list_count_once_at_the_best_rank() {
        let fused = fuse(&[vec![5, 5, 6]], 60.0);
        assert_eq!(order(&fused), vec![5, 6]);
        assert!((fused[0].score - 1.0 / 61.0).abs() < 1e-15);
        assert!((fused[1].score - 1.0 / 63.0).abs() < 1e-15);
        assert_eq!(fused[0].lists, 1);
    }

    #[test]
    fn no_lists_or_empty_lists_fuse_to_nothing() {
        assert!(fuse::<Vec<PassageIdx>>(&[], 60.0).is_empty());
        assert!(fuse(&[Vec::<PassageIdx>::new()], 60.0).is_empty());
    }
}
