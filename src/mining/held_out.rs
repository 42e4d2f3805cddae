//! The held-out passages: the recipe's synthetic test set, never training candidates.
//!
//! The choice is the `count` passages with the smallest `blake3(seed.to_le_bytes() ++
//! id)`: it depends on the ids, the seed and the count only, so generation (which
//! generates their test queries) and mining (which keeps them out of every candidate
//! list) agree, and adding passages can only displace chosen ones, never reshuffle the
//! rest.

use std::collections::HashSet;

use super::PassageIdx;

/// The seeded hash of `id` the choice ranks by, smallest first.
pub fn held_out_rank(id: &str, seed: u64) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(&seed.to_le_bytes());
    h.update(id.as_bytes());
    *h.finalize().as_bytes()
}

/// The `count` passages with the smallest seeded hash of their id: a choice that does
/// not move when other passages are added or removed.
pub fn held_out_passages(ids: &[String], count: usize, seed: u64) -> HashSet<PassageIdx> {
    let mut keyed: Vec<([u8; 32], PassageIdx)> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (held_out_rank(id, seed), i as PassageIdx))
        .collect();
    keyed.sort();
    keyed.into_iter().take(count).map(|(_, i)| i).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_out_choice_is_stable_when_the_corpus_grows() {
        let ids: Vec<String> = (0..1000).map(|i| format!("p{i}")).collect();
        let a = held_out_passages(&ids, 10, 42);
        assert_eq!(a.len(), 10);
        let mut more = ids.clone();
        more.extend((1000..1100).map(|i| format!("p{i}")));
        let b = held_out_passages(&more, 10, 42);
        // Added passages can only displace chosen ones, never reshuffle the rest.
        let a_ids: HashSet<&str> = a.iter().map(|&i| ids[i as usize].as_str()).collect();
        let b_ids: HashSet<&str> = b.iter().map(|&i| more[i as usize].as_str()).collect();
        let kept = a_ids.intersection(&b_ids).count();
        let displaced_by_new = b_ids
            .iter()
            .filter(|id| !a_ids.contains(*id))
            .all(|id| id[1..].parse::<usize>().map(|n| n >= 1000).unwrap_or(false));
        assert!(displaced_by_new);
        assert!(kept >= 8, "kept {kept}");
        assert_ne!(a, held_out_passages(&ids, 10, 7));
    }
}
