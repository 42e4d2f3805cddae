//! Retrieval repair: the exact top-k of a changed passage set, from the top-k lists of
//! the set it changed from, without scoring the unchanged passages again.
//!
//! Every passage has an identity: a hash of its id and the bits of its vector. Between
//! two versions a passage is *kept* (same identity in both), *removed* (only in the old;
//! an edit removes the old vector) or *added* (only in the new; an edit adds the new
//! vector). When the kept passages are in the same relative order in both versions,
//! a query's new top-k is found among
//!
//! - its old list, when that list holds no removed passage: every kept passage outside
//!   the list lost to each of the list's `k` in the old version, with the same score and
//!   (the relative order being the same) the same tie-break, so it loses again; and
//! - the `k` best of the added passages, scored with one product (added x queries).
//!
//! Merging the two by [`better`] over the new positions gives exactly the list a
//! retrieval from scratch gives, tie-breaks included, because a passage's score is the
//! same bits in any block ([`super::TopK`] is tested for that). A query whose old list
//! holds a removed passage, or whose vector is new, is retrieved again in full. When the
//! kept passages change order, ties could break the other way: [`PassageChange::between`]
//! refuses and the caller retrieves everything again.

use std::collections::HashMap;

use super::{better, Hit};

/// A passage's or query's identity: the first 128 bits of blake3 over what decides its
/// scores (and, for a passage, the id the lists name it by).
pub type Identity = u128;

/// Marks an old position with no new one (the passage was removed or edited).
const GONE: u32 = u32::MAX;

fn identity_of(hasher: blake3::Hasher) -> Identity {
    let mut first = [0u8; 16];
    first.copy_from_slice(&hasher.finalize().as_bytes()[..16]);
    u128::from_be_bytes(first)
}

/// The identity of the passage `id` with embedding `vector`.
pub fn passage_identity(id: &str, vector: &[f32]) -> Identity {
    let mut h = blake3::Hasher::new();
    h.update(&(id.len() as u64).to_le_bytes());
    h.update(id.as_bytes());
    h.update(&vector_bytes(vector));
    identity_of(h)
}

/// The identity of a query embedding: its list depends on nothing else.
pub fn query_identity(vector: &[f32]) -> Identity {
    let mut h = blake3::Hasher::new();
    h.update(&vector_bytes(vector));
    identity_of(h)
}

/// A vector's floats as little-endian bytes, in order: hashed in one update (an update
/// per float cost more than the hashing).
fn vector_bytes(vector: &[f32]) -> Vec<u8> {
    vector
        .iter()
        .flat_map(|x| x.to_bits().to_le_bytes())
        .collect()
}

/// How a new passage list relates to the old one, by identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassageChange {
    /// Each old position's new position, or [`GONE`].
    old_to_new: Vec<u32>,
    /// New positions of the added passages, ascending.
    added: Vec<u32>,
    removed: usize,
}

/// Tracks, passage by passage in the new order, how the new list relates to the old
/// (the new passages arrive a stage part at a time).
#[derive(Debug)]
pub struct ChangeTracker {
    old: HashMap<Identity, u32>,
    old_to_new: Vec<u32>,
    added: Vec<u32>,
    next: u32,
    /// The old position of the last kept passage seen.
    last_kept: Option<u32>,
    /// Kept passages changed relative order, or an identity repeats.
    broken: bool,
}

impl ChangeTracker {
    /// Starts from the old list's identities, in their order.
    pub fn new(old: &[Identity]) -> Self {
        let mut map = HashMap::with_capacity(old.len());
        let mut broken = false;
        for (i, id) in old.iter().enumerate() {
            broken |= map.insert(*id, i as u32).is_some();
        }
        Self {
            old: map,
            old_to_new: vec![GONE; old.len()],
            added: Vec::new(),
            next: 0,
            last_kept: None,
            broken,
        }
    }

    /// The next passage of the new list; true when it is added (not in the old list).
    pub fn push(&mut self, identity: Identity) -> bool {
        let position = self.next;
        self.next += 1;
        match self.old.get(&identity) {
            Some(&old) => {
                if self.old_to_new[old as usize] != GONE || self.last_kept.is_some_and(|l| l >= old)
                {
                    self.broken = true;
                }
                self.old_to_new[old as usize] = position;
                self.last_kept = Some(old);
                false
            }
            None => {
                self.added.push(position);
                true
            }
        }
    }

    /// Passages added so far.
    pub fn added(&self) -> usize {
        self.added.len()
    }

    /// The change, or `None` when the kept passages are not in their old relative order
    /// (or identities repeat): then old lists cannot be merged.
    pub fn finish(self) -> Option<PassageChange> {
        if self.broken {
            return None;
        }
        let removed = self.old_to_new.iter().filter(|&&p| p == GONE).count();
        Some(PassageChange {
            old_to_new: self.old_to_new,
            added: self.added,
            removed,
        })
    }
}

impl PassageChange {
    /// The change from `old` to `new` (identities in list order); see
    /// [`ChangeTracker::finish`].
    pub fn between(old: &[Identity], new: &[Identity]) -> Option<PassageChange> {
        let mut tracker = ChangeTracker::new(old);
        for id in new {
            tracker.push(*id);
        }
        tracker.finish()
    }

    /// New positions of the added passages, ascending.
    pub fn added(&self) -> &[u32] {
        &self.added
    }

    /// Old passages with no new position.
    pub fn removed(&self) -> usize {
        self.removed
    }

    /// Nothing added or removed, and every passage where it was.
    pub fn is_identity(&self) -> bool {
        self.added.is_empty()
            && self.removed == 0
            && self
                .old_to_new
                .iter()
                .enumerate()
                .all(|(i, &p)| p as usize == i)
    }

    /// Repairs one query's `old` list (old positions, best first) in place: its
    /// passages moved to their new positions and merged with `added_best`, the query's
    /// best added passages as a retrieval over the added passages alone gives them
    /// (positions among [`Self::added`]). Returns false, leaving `old` unspecified, when
    /// the list held a removed passage: the query must be retrieved again in full.
    pub fn repair(&self, old: &mut Vec<Hit>, added_best: &[Hit], k: usize) -> bool {
        for hit in old.iter_mut() {
            match self.old_to_new.get(hit.passage as usize) {
                Some(&p) if p != GONE => hit.passage = p,
                _ => return false,
            }
        }
        old.extend(added_best.iter().map(|h| Hit {
            passage: self.added[h.passage as usize],
            score: h.score,
        }));
        old.sort_by(better);
        old.truncate(k);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::super::exact_top_k;
    use super::super::tests::{bits, seeded_values as pseudo_random};
    use super::*;

    struct Corpus {
        ids: Vec<String>,
        vectors: Vec<Vec<f32>>,
    }

    impl Corpus {
        fn identities(&self) -> Vec<Identity> {
            self.ids
                .iter()
                .zip(&self.vectors)
                .map(|(id, v)| passage_identity(id, v))
                .collect()
        }
        fn matrix(&self) -> Vec<f32> {
            self.vectors.concat()
        }
    }

    /// Repairs `old_corpus`'s lists for `new_corpus` as the stage does, retrieving in
    /// full the queries it must; returns the lists and how many were retrieved again.
    fn repaired(
        old_corpus: &Corpus,
        new_corpus: &Corpus,
        queries: &[f32],
        dim: usize,
        k: usize,
    ) -> Option<(Vec<Vec<Hit>>, usize)> {
        let old_lists = exact_top_k(queries, &old_corpus.matrix(), dim, k, 2).unwrap();
        let change = PassageChange::between(&old_corpus.identities(), &new_corpus.identities())?;
        let added: Vec<f32> = change
            .added()
            .iter()
            .flat_map(|&p| new_corpus.vectors[p as usize].clone())
            .collect();
        let added_best = exact_top_k(queries, &added, dim, k, 2).unwrap();
        let full = exact_top_k(queries, &new_corpus.matrix(), dim, k, 2).unwrap();
        let mut again = 0;
        let lists = old_lists
            .into_iter()
            .zip(added_best)
            .enumerate()
            .map(|(qi, (mut list, best))| {
                if change.repair(&mut list, &best, k) {
                    list
                } else {
                    again += 1;
                    full[qi].clone()
                }
            })
            .collect();
        Some((lists, again))
    }

    #[test]
    fn repaired_lists_equal_a_retrieval_from_scratch() {
        let dim = 16;
        let np = 400;
        let values = pseudo_random(7, np * dim);
        let old = Corpus {
            ids: (0..np).map(|i| format!("p{i}")).collect(),
            vectors: values.chunks(dim).map(<[f32]>::to_vec).collect(),
        };
        let queries = pseudo_random(11, 60 * dim);
        // A few passages copy another's vector: ties that break by position.
        let mut old = old;
        for (from, to) in [(3, 250), (10, 11), (399, 0)] {
            old.vectors[to] = old.vectors[from].clone();
        }
        let fresh = pseudo_random(13, 20 * dim);
        let mut new = Corpus {
            ids: old.ids.clone(),
            vectors: old.vectors.clone(),
        };
        // Edits (one of them a passage whose vector becomes another's: a new tie).
        new.vectors[5] = fresh[..dim].to_vec();
        new.vectors[120] = fresh[dim..2 * dim].to_vec();
        new.vectors[300] = new.vectors[42].clone();
        // Removals, among them passages that rank high for some queries.
        for i in [390, 201, 77, 2] {
            new.ids.remove(i);
            new.vectors.remove(i);
        }
        // Additions in the middle and at the end; one duplicates an old passage's vector.
        new.ids.insert(50, "n0".into());
        new.vectors.insert(50, fresh[2 * dim..3 * dim].to_vec());
        new.ids.push("n1".into());
        new.vectors.push(new.vectors[7].clone());
        new.ids.push("n2".into());
        new.vectors.push(fresh[3 * dim..4 * dim].to_vec());
        for k in [1, 5, 10, 100, 500] {
            let (lists, again) = repaired(&old, &new, &queries, dim, k).unwrap();
            let scratch = exact_top_k(&queries, &new.matrix(), dim, k, 2).unwrap();
            assert_eq!(bits(&lists), bits(&scratch), "k = {k}");
            if k == 500 {
                // Every list holds every old passage: each lost one.
                assert_eq!(again, 60);
            }
            if k == 1 {
                assert!(again < 60, "k = 1: {again} of 60 retrieved again");
            }
        }
    }

    #[test]
    fn counts_the_change() {
        let id = |s: &str| passage_identity(s, &[1.0, 2.0]);
        let old = [id("a"), id("b"), id("c"), id("d")];
        let new = [id("a"), id("x"), id("c"), id("d"), id("y")];
        let change = PassageChange::between(&old, &new).unwrap();
        assert_eq!(change.added(), &[1, 4]);
        assert_eq!(change.removed(), 1);
        assert!(!change.is_identity());
        assert!(PassageChange::between(&old, &old).unwrap().is_identity());
        // The same ids with another vector are another passage.
        assert_ne!(
            passage_identity("a", &[1.0, 2.0]),
            passage_identity("a", &[1.0, 2.5])
        );
        // -0.0 and 0.0 score the same but are other bits: another identity (safe side).
        assert_ne!(query_identity(&[0.0]), query_identity(&[-0.0]));
    }

    #[test]
    fn kept_passages_in_another_order_refuse_repair() {
        let id = |s: &str| passage_identity(s, &[1.0]);
        let old = [id("a"), id("b"), id("c")];
        assert!(PassageChange::between(&old, &[id("b"), id("a"), id("c")]).is_none());
        // A repeated identity too.
        assert!(PassageChange::between(&old, &[id("a"), id("a"), id("c")]).is_none());
        assert!(PassageChange::between(&[id("a"), id("a")], &[id("a")]).is_none());
        // Removing and adding keep the order of the rest.
        assert!(PassageChange::between(&old, &[id("z"), id("a"), id("c"), id("q")]).is_some());
    }

    #[test]
    fn a_list_that_lost_a_passage_is_not_repaired() {
        let id = |s: &str| passage_identity(s, &[1.0]);
        let change = PassageChange::between(&[id("a"), id("b")], &[id("b")]).unwrap();
        let mut list = vec![Hit {
            passage: 0,
            score: 1.0,
        }];
        assert!(!change.repair(&mut list, &[], 1));
        let mut list = vec![Hit {
            passage: 1,
            score: 1.0,
        }];
        assert!(change.repair(&mut list, &[], 1));
        assert_eq!(list[0].passage, 0);
    }
}
