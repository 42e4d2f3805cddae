//! Training data: the `examples` table split into train and dev, a seeded shuffle per
//! epoch, and the cut into optimizer steps (accumulated batches) and micro-batches.
//!
//! The order of epoch `e` is a Fisher-Yates shuffle of the train examples (sorted by
//! query id first, so the order never depends on how the table was written) driven by
//! a splitmix64 generator seeded with `(seed, e)`: a resumed run recomputes the same
//! order from the epoch number alone, so its data position is just (epoch, step).

use crate::mining::{Example, Split};

/// A splitmix64 generator: tiny, fast, and the same numbers on every platform.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (Lemire's multiply-shift; the bias is below 2^-32 for any
    /// list a run can hold).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }
}

/// The examples of a run, split.
#[derive(Debug, Clone, Default)]
pub struct TrainingSet {
    pub train: Vec<Example>,
    pub dev: Vec<Example>,
}

impl TrainingSet {
    /// Splits by each example's `split`, each side sorted by query id.
    pub fn new(mut examples: Vec<Example>) -> Self {
        examples.sort_by(|a, b| a.query_id.cmp(&b.query_id));
        let (dev, train) = examples.into_iter().partition(|e| e.split == Split::Dev);
        Self { train, dev }
    }

    /// The train examples' order in epoch `epoch` (indices into `train`).
    pub fn epoch_order(&self, seed: u64, epoch: u64) -> Vec<usize> {
        let mut rng = SplitMix64(seed ^ epoch.wrapping_mul(0xD1B5_4A32_D192_ED03));
        let mut order: Vec<usize> = (0..self.train.len()).collect();
        for i in (1..order.len()).rev() {
            let j = rng.below(i + 1);
            order.swap(i, j);
        }
        order
    }
}

/// Optimizer steps in an epoch of `n` examples with `per_step` queries per step; the
/// last, shorter step is kept (no example is dropped).
pub fn steps_per_epoch(n: usize, per_step: usize) -> u64 {
    n.div_ceil(per_step.max(1)) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(id: &str, split: Split) -> Example {
        Example {
            query_id: id.into(),
            query_text: format!("text {id}"),
            query_type: "human".into(),
            source_ids: vec!["p".into()],
            passage_ids: vec!["p".into()],
            scores: vec![1.0],
            split,
        }
    }

    #[test]
    fn split_sorted_and_shuffled_reproducibly() {
        let set = TrainingSet::new(vec![
            example("c", Split::Train),
            example("a", Split::Train),
            example("d", Split::Dev),
            example("b", Split::Train),
        ]);
        let ids: Vec<&str> = set.train.iter().map(|e| e.query_id.as_str()).collect();
        assert_eq!(ids, vec!["a", "b", "c"]);
        assert_eq!(set.dev.len(), 1);
        let o1 = set.epoch_order(42, 0);
        assert_eq!(o1, set.epoch_order(42, 0));
        let mut sorted = o1.clone();
        sorted.sort();
        assert_eq!(sorted, vec![0, 1, 2]);
        // Over many epochs every permutation of 3 shows up.
        let distinct: std::collections::HashSet<Vec<usize>> =
            (0..60).map(|e| set.epoch_order(42, e)).collect();
        assert_eq!(distinct.len(), 6);
    }

    #[test]
    fn steps_keep_the_last_partial_batch() {
        assert_eq!(steps_per_epoch(4096, 4096), 1);
        assert_eq!(steps_per_epoch(4097, 4096), 2);
        assert_eq!(steps_per_epoch(10, 4), 3);
    }

    #[test]
    fn splitmix_matches_its_reference_values() {
        // splitmix64 seeded with 0: the published first output.
        let mut r = SplitMix64(0);
        assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
    }
}
