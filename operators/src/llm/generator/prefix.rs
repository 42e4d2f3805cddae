//! Shared prompt prefixes: the keys and values of a prefix that many prompts start with
//! (the chat template's header, a query type's instruction and rules) computed once and
//! copied into the rows of every prompt that starts with it, which then prefill only
//! the rest.
//!
//! Which prefixes: a prompt's shared length is the longest prefix it has in common with
//! another prompt of the call or one of the last [`RECENT_PROMPTS`] prompts of earlier
//! calls (found by sorting them all by their token ids: the longest is with a
//! neighbour), at least [`MIN_SHARED_PREFIX`] tokens and always leaving one token of its
//! own (whose logits start its reply). Prefixes computed are kept across calls in a
//! [`PrefixStore`] of bounded size, least recently used first out, and a prompt takes
//! the longest kept prefix it starts with. So a job that sends one request per call
//! computes a query type's prefix at its second request and reuses it from the third.
//!
//! Exactness: on the CPU every token's keys and values depend on the token, its
//! position and the tokens before it only, never on which tokens share its step
//! (row-by-row products and the per-row attention kernel), so a row seeded with a
//! prefix's keys and values holds the same bits as a row that ran the prefix itself,
//! and the tokens generated are the same (tested). The padded cache of other devices is
//! never seeded.

use std::sync::Arc;

use crate::llm::attention::cpu::RowSnapshot;

/// Shortest prefix worth computing on its own: a step of a few tokens costs about a
/// pass over the weights, whatever its length.
pub const MIN_SHARED_PREFIX: usize = 32;
/// Prompts of earlier calls remembered to find prefixes in common with later ones: a
/// few passages' worth of every query type.
pub const RECENT_PROMPTS: usize = 32;
/// Default bound on the keys and values kept for shared prefixes (Qwen2.5-0.5B holds
/// 24 KB a token: about 5,000 tokens).
pub const DEFAULT_PREFIX_CACHE_BYTES: usize = 128 << 20;

/// A prefix and its keys and values.
#[derive(Debug)]
pub(crate) struct SharedPrefix {
    pub tokens: Vec<u32>,
    pub kv: RowSnapshot,
}

/// Prefixes kept across calls, and the last prompts seen.
#[derive(Debug, Default)]
pub(crate) struct PrefixStore {
    /// (prefix, last use).
    entries: Vec<(Arc<SharedPrefix>, u64)>,
    bytes: usize,
    clock: u64,
    /// The last [`RECENT_PROMPTS`] prompts, oldest first.
    recent: Vec<Vec<u32>>,
}

impl PrefixStore {
    /// The last prompts seen, oldest first.
    pub fn recent(&self) -> &[Vec<u32>] {
        &self.recent
    }

    /// Remembers `prompts` as the latest seen.
    pub fn saw(&mut self, prompts: &[Vec<u32>]) {
        for p in prompts {
            if !self.recent.contains(p) {
                self.recent.push(p.clone());
            }
        }
        let over = self.recent.len().saturating_sub(RECENT_PROMPTS);
        self.recent.drain(..over);
    }

    /// The longest kept prefix that `prompt` starts with and leaves a token of its own
    /// after; marks it used.
    pub fn longest_match(&mut self, prompt: &[u32]) -> Option<Arc<SharedPrefix>> {
        self.clock += 1;
        let clock = self.clock;
        let best = self
            .entries
            .iter_mut()
            .filter(|(p, _)| p.tokens.len() < prompt.len() && prompt.starts_with(&p.tokens))
            .max_by_key(|(p, _)| p.tokens.len())?;
        best.1 = clock;
        Some(Arc::clone(&best.0))
    }

    /// Keeps `prefix`, dropping the least recently used ones past `budget` bytes (a
    /// prefix larger than the budget is not kept).
    pub fn insert(&mut self, prefix: Arc<SharedPrefix>, budget: usize) {
        let size = prefix.kv.bytes();
        if size > budget || self.entries.iter().any(|(p, _)| p.tokens == prefix.tokens) {
            return;
        }
        while self.bytes + size > budget {
            let Some(oldest) = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(i, _)| i)
            else {
                break;
            };
            let (gone, _) = self.entries.swap_remove(oldest);
            self.bytes -= gone.kv.bytes();
        }
        self.clock += 1;
        self.bytes += size;
        self.entries.push((prefix, self.clock));
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

/// Each prompt's longest common prefix with any other prompt of `prompts` or of `seen`,
/// cut to leave one token of its own; 0 below [`MIN_SHARED_PREFIX`].
pub(crate) fn shared_lengths(prompts: &[Vec<u32>], seen: &[Vec<u32>]) -> Vec<usize> {
    let all: Vec<&Vec<u32>> = prompts.iter().chain(seen).collect();
    let mut order: Vec<usize> = (0..all.len()).collect();
    order.sort_by(|&a, &b| all[a].cmp(all[b]).then(a.cmp(&b)));
    let mut shared = vec![0; all.len()];
    for pair in order.windows(2) {
        let (a, b) = (all[pair[0]], all[pair[1]]);
        let common = a.iter().zip(b).take_while(|(x, y)| x == y).count();
        shared[pair[0]] = shared[pair[0]].max(common);
        shared[pair[1]] = shared[pair[1]].max(common);
    }
    shared
        .into_iter()
        .zip(prompts)
        .map(|(s, p)| {
            let s = s.min(p.len().saturating_sub(1));
            if s >= MIN_SHARED_PREFIX {
                s
            } else {
                0
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(start: u32, len: usize) -> Vec<u32> {
        (start..start + len as u32).collect()
    }

    #[test]
    fn shared_lengths_are_the_longest_common_prefix_with_any_other_prompt() {
        let head = ids(0, 40);
        let a = [head.clone(), ids(100, 5)].concat();
        let b = [head.clone(), ids(200, 5)].concat();
        // c shares 45 tokens with d and 40 with a and b.
        let c = [head.clone(), ids(300, 5), ids(400, 3)].concat();
        let d = [head.clone(), ids(300, 5), ids(500, 3)].concat();
        // e shares only 10 tokens: below the minimum.
        let e = [ids(0, 10), ids(600, 40)].concat();
        // f is all prefix: it keeps its last token for itself.
        let f = head.clone();
        let got = shared_lengths(&[a.clone(), b, c, d, e, f], &[]);
        assert_eq!(got, vec![40, 40, 45, 45, 0, 39]);
        // Prompts seen in earlier calls count, and only this call's get lengths; a
        // prompt seen before (the same again) shares all but its last token.
        let g = [head.clone(), ids(700, 5)].concat();
        assert_eq!(shared_lengths(&[g], std::slice::from_ref(&a)), vec![40]);
        assert_eq!(
            shared_lengths(std::slice::from_ref(&a), std::slice::from_ref(&a)),
            vec![44]
        );
    }

    #[test]
    fn the_store_remembers_the_last_prompts() {
        let mut store = PrefixStore::default();
        let prompts: Vec<Vec<u32>> = (0..RECENT_PROMPTS as u32 + 3).map(|i| ids(i, 3)).collect();
        store.saw(&prompts[..2]);
        store.saw(&prompts[..2]);
        assert_eq!(store.recent(), &prompts[..2]);
        store.saw(&prompts);
        assert_eq!(store.recent(), &prompts[3..]);
    }

    fn prefix(tokens: Vec<u32>) -> Arc<SharedPrefix> {
        let layers = vec![(vec![0f32; tokens.len()], vec![0f32; tokens.len()])];
        Arc::new(SharedPrefix {
            kv: RowSnapshot::for_tests(layers),
            tokens,
        })
    }

    #[test]
    fn the_store_gives_the_longest_match_and_drops_the_least_recently_used() {
        let mut store = PrefixStore::default();
        // 8 bytes a token (a key and a value of one f32).
        store.insert(prefix(ids(0, 40)), 8 * 100);
        store.insert(prefix(ids(0, 50)), 8 * 100);
        let prompt = ids(0, 60);
        assert_eq!(store.longest_match(&prompt).unwrap().tokens.len(), 50);
        // Not a strict prefix of a 50-token prompt equal to it: the 40 one.
        assert_eq!(store.longest_match(&ids(0, 50)).unwrap().tokens.len(), 40);
        assert!(store.longest_match(&ids(1, 60)).is_none());
        // Over budget: the least recently used (the 50 one, last used before the 40's
        // use) goes.
        store.insert(prefix(ids(1000, 20)), 8 * 100);
        assert_eq!(store.len(), 2);
        assert_eq!(store.longest_match(&prompt).unwrap().tokens.len(), 40);
        // A prefix larger than the budget is not kept.
        store.insert(prefix(ids(5000, 200)), 8 * 100);
        assert_eq!(store.len(), 2);
    }
}
