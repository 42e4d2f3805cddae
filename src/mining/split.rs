//! Train/dev split by query id.
//!
//! A query is `dev` iff `h < dev_fraction * 2^64`, where `h` is the first 8 bytes (read
//! little-endian as a `u64`) of `blake3(seed.to_le_bytes() ++ query_id)`. The seed has a
//! fixed width, so no two (seed, id) pairs hash the same bytes.
//!
//! The split of a query depends on its id, the seed and the fraction only: adding or
//! removing queries moves no other query between train and dev, so a rerun over a grown
//! query set keeps every earlier query's split (a shuffle of the whole list would not).
//! The dev share of a large set is `dev_fraction` up to sampling noise (standard
//! deviation `sqrt(f (1 - f) / n)`, 0.003 for 10,000 queries at 0.1).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Which part of the examples a query belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// Used for gradient steps.
    Train,
    /// Held back to measure the dev loss after each epoch (early stopping).
    Dev,
}

impl Split {
    /// The name stored in the examples table: `train` or `dev`.
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Dev => "dev",
        }
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Split {
    type Err = String;

    /// Parses `train` or `dev` (exactly, as written by [`Split::as_str`]).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "train" => Ok(Split::Train),
            "dev" => Ok(Split::Dev),
            other => Err(format!("split `{other}` is neither `train` nor `dev`")),
        }
    }
}

/// The split of `query_id` (see the module docs). `dev_fraction` is clamped to `[0, 1]`:
/// 0 puts every query in train, 1 every query in dev; NaN counts as 0.
pub fn split_of(query_id: &str, seed: u64, dev_fraction: f64) -> Split {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&seed.to_le_bytes());
    hasher.update(query_id.as_bytes());
    let digest = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest.as_bytes()[..8]);
    let h = u64::from_le_bytes(first);
    let fraction = if dev_fraction.is_nan() {
        0.0
    } else {
        dev_fraction.clamp(0.0, 1.0)
    };
    // 2^64 as f64 is exact; the product is at most 2^64, so it fits a u128.
    let threshold = (fraction * 18_446_744_073_709_551_616.0) as u128;
    if u128::from(h) < threshold {
        Split::Dev
    } else {
        Split::Train
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("q{i}")).collect()
    }

    #[test]
    fn dev_fraction_over_ten_thousand_ids_is_close_to_the_setting() {
        let dev = ids(10_000)
            .iter()
            .filter(|id| split_of(id, 42, 0.1) == Split::Dev)
            .count();
        // 0.1 +- 0.01 is more than three standard deviations (0.003).
        assert!((900..=1100).contains(&dev), "{dev} dev queries of 10000");
    }

    #[test]
    fn an_ids_split_depends_on_nothing_but_itself_seed_and_fraction() {
        // Deciding the ids of a large set, of a small set, and in reverse order gives
        // each id the same split: there is no state between calls to depend on, and this
        // guards against anyone introducing one (a shuffle, a counter).
        let all = ids(2_000);
        let large: Vec<Split> = all.iter().map(|id| split_of(id, 42, 0.1)).collect();
        let small: Vec<Split> = all[..50].iter().map(|id| split_of(id, 42, 0.1)).collect();
        let mut reversed: Vec<Split> = all.iter().rev().map(|id| split_of(id, 42, 0.1)).collect();
        reversed.reverse();
        assert_eq!(&large[..50], &small[..]);
        assert_eq!(large, reversed);
    }

    #[test]
    fn the_hash_is_blake3_of_the_seed_bytes_then_the_id() {
        // Recompute h for one id by hand from the definition and check the decision.
        let mut bytes = 42u64.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"query-17");
        let digest = blake3::hash(&bytes);
        let h = u64::from_le_bytes(digest.as_bytes()[..8].try_into().unwrap());
        let fraction = h as f64 / 18_446_744_073_709_551_616.0;
        // Just above the id's position it is dev, just below it is train.
        assert_eq!(split_of("query-17", 42, fraction + 1e-9), Split::Dev);
        assert_eq!(split_of("query-17", 42, fraction - 1e-9), Split::Train);
    }

    #[test]
    fn the_seed_changes_the_split() {
        let all = ids(1_000);
        let differ = all
            .iter()
            .filter(|id| split_of(id, 42, 0.5) != split_of(id, 43, 0.5))
            .count();
        // Independent halves disagree on about half the ids.
        assert!((400..=600).contains(&differ), "{differ}");
    }

    #[test]
    fn fractions_zero_and_one_and_out_of_range() {
        for id in ids(200) {
            assert_eq!(split_of(&id, 7, 0.0), Split::Train);
            assert_eq!(split_of(&id, 7, -0.5), Split::Train);
            assert_eq!(split_of(&id, 7, f64::NAN), Split::Train);
            assert_eq!(split_of(&id, 7, 1.0), Split::Dev);
            assert_eq!(split_of(&id, 7, 2.0), Split::Dev);
        }
    }

    #[test]
    fn names_round_trip() {
        assert_eq!(Split::Train.as_str(), "train");
        assert_eq!("dev".parse::<Split>(), Ok(Split::Dev));
        assert_eq!("train".parse::<Split>(), Ok(Split::Train));
        assert!("Dev".parse::<Split>().is_err());
        assert_eq!(serde_json::to_string(&Split::Dev).unwrap(), "\"dev\"");
    }
}
