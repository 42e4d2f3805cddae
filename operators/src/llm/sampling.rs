//! Choosing the next token from a row's logits: greedy (temperature 0), or temperature
//! then nucleus (top-p) sampling with a per-request random stream.
//!
//! Determinism: each request owns a [`SplitMix64`] seeded with its seed, and draws exactly
//! one number per sampled token from it, from its own row of logits. Nothing is shared
//! between rows, so a request's tokens do not depend on which requests share its batch,
//! and the same seed gives the same tokens, bit for bit, wherever the logits are the same.
//!
//! Semantics follow transformers' `TemperatureLogitsWarper` then `TopPLogitsWarper`: the
//! logits are divided by the temperature, softmaxed, and only the smallest set of most
//! probable tokens whose probabilities add up to at least `top_p` is kept (at least one
//! token); the draw is from the kept tokens, renormalised. Probabilities are computed in
//! f64. Ties in probability are ordered by token id.

use serde::{Deserialize, Serialize};

/// How new tokens are drawn (RECIPE.md section 2).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// 0 is greedy decoding (argmax); the recipe samples at 0.8.
    pub temperature: f64,
    /// Nucleus sampling: draw from the smallest set of tokens whose probabilities sum to
    /// at least this; 1.0 keeps every token.
    pub top_p: f64,
    /// Most tokens generated per sequence (the recipe: 50).
    pub max_new_tokens: usize,
    /// End-of-turn is not accepted before this many tokens (the recipe: 1).
    pub min_new_tokens: usize,
}

/// The recipe's temperature.
pub const DEFAULT_TEMPERATURE: f64 = 0.8;
/// The recipe's cap on new tokens: a query is under 20 words.
pub const DEFAULT_MAX_NEW_TOKENS: usize = 50;

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: DEFAULT_TEMPERATURE,
            top_p: 1.0,
            max_new_tokens: DEFAULT_MAX_NEW_TOKENS,
            min_new_tokens: 1,
        }
    }
}

/// SplitMix64 (Steele, Lea and Flood, "Fast splittable pseudorandom number generators",
/// 2014): a 64-bit state advanced by a fixed odd constant and mixed by two
/// multiply-xorshift rounds. Small, fast, and every seed (0 included) gives a good
/// stream.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

/// The golden-ratio increment of SplitMix64.
const SPLITMIX_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(SPLITMIX_GAMMA);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1): the top 53 bits as a fraction.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// The index of the largest logit; the first one on ties (as `torch.argmax`). NaN never
/// wins.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_value = f32::NEG_INFINITY;
    for (i, &x) in logits.iter().enumerate() {
        if x > best_value {
            best = i;
            best_value = x;
        }
    }
    best as u32
}

/// The tokens sampling may draw from and their unnormalised weights (`exp((l - max) / T)`),
/// in the order the draw walks them: the nucleus by decreasing probability when
/// `top_p < 1`, every token by id otherwise. `temperature` must be positive.
pub fn candidates(logits: &[f32], temperature: f64, top_p: f64) -> Vec<(u32, f64)> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let weights: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, ((l as f64 - max) / temperature).exp()))
        .collect();
    if top_p >= 1.0 {
        return weights;
    }
    let total: f64 = weights.iter().map(|w| w.1).sum();
    let needed = top_p * total;
    let by_weight = |a: &(u32, f64), b: &(u32, f64)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    // The nucleus is usually a few tokens of a large vocabulary: sort only a growing
    // prefix (the order is total, so the prefix is the same however it is found).
    let mut k = 64.min(weights.len());
    loop {
        let mut pool = weights.clone();
        if k < pool.len() {
            pool.select_nth_unstable_by(k - 1, by_weight);
            pool.truncate(k);
        }
        pool.sort_unstable_by(by_weight);
        let mut cumulative = 0.0;
        for (n, &(_, w)) in pool.iter().enumerate() {
            cumulative += w;
            if cumulative >= needed {
                pool.truncate(n + 1);
                return pool;
            }
        }
        if k == weights.len() {
            // Rounding left the sum a hair under `needed`: keep everything.
            return pool;
        }
        k = (k * 4).min(weights.len());
    }
}

/// Draws from `candidates` with one number of `rng`.
pub fn draw(candidates: &[(u32, f64)], rng: &mut SplitMix64) -> u32 {
    let total: f64 = candidates.iter().map(|c| c.1).sum();
    let target = rng.next_f64() * total;
    let mut cumulative = 0.0;
    for &(token, w) in candidates {
        cumulative += w;
        if target < cumulative {
            return token;
        }
    }
    // Only reachable through rounding at the very top: the last token with weight.
    candidates
        .iter()
        .rev()
        .find(|c| c.1 > 0.0)
        .map_or(0, |c| c.0)
}

/// The next token of a row: greedy at temperature 0, sampled otherwise.
pub fn next_token(logits: &[f32], temperature: f64, top_p: f64, rng: &mut SplitMix64) -> u32 {
    if temperature == 0.0 {
        argmax(logits)
    } else {
        draw(&candidates(logits, temperature, top_p), rng)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_matches_the_published_sequence() {
        // The first outputs for seed 0 (the reference C implementation by Vigna).
        let mut r = SplitMix64::new(0);
        assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
        assert_eq!(r.next_u64(), 0x06C4_5D18_8009_454F);
    }

    #[test]
    fn argmax_takes_the_first_of_ties_and_skips_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 0.5, f32::NAN]), 1);
    }

    /// Logits ln(0.5), ln(0.3), ln(0.15), ln(0.05): probabilities 0.5, 0.3, 0.15, 0.05.
    fn four() -> Vec<f32> {
        [0.5f64, 0.3, 0.15, 0.05]
            .iter()
            .map(|p| p.ln() as f32)
            .collect()
    }

    fn probabilities(c: &[(u32, f64)]) -> Vec<(u32, f64)> {
        let total: f64 = c.iter().map(|x| x.1).sum();
        c.iter().map(|&(t, w)| (t, w / total)).collect()
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        // 0.5 < 0.7 <= 0.5 + 0.3: the nucleus is {0, 1}, renormalised to 5/8 and 3/8.
        let c = probabilities(&candidates(&four(), 1.0, 0.7));
        assert_eq!(c.iter().map(|x| x.0).collect::<Vec<_>>(), vec![0, 1]);
        assert!(
            (c[0].1 - 0.625).abs() < 1e-6 && (c[1].1 - 0.375).abs() < 1e-6,
            "{c:?}"
        );
        // Exactly 0.8 = 0.5 + 0.3 is reached with two tokens as well.
        assert_eq!(candidates(&four(), 1.0, 0.8).len(), 2);
        // 0.81 needs the third token; 0.4 is reached by the first alone.
        assert_eq!(candidates(&four(), 1.0, 0.81).len(), 3);
        assert_eq!(candidates(&four(), 1.0, 0.4).len(), 1);
        // top_p = 1 keeps all, in id order.
        let all = candidates(&four(), 1.0, 1.0);
        assert_eq!(
            all.iter().map(|x| x.0).collect::<Vec<_>>(),
            vec![0, 1, 2, 3]
        );
    }

    #[test]
    fn temperature_sharpens_before_top_p() {
        // At T = 0.5 the probabilities go as p^2: 0.25, 0.09, 0.0225, 0.0025 over 0.365,
        // i.e. 0.6849, 0.2466, 0.0616, 0.0068: top-p 0.9 keeps {0, 1} (0.9315).
        let c = probabilities(&candidates(&four(), 0.5, 0.9));
        assert_eq!(c.len(), 2);
        assert!((c[0].1 - 0.25 / 0.34).abs() < 1e-6, "{c:?}");
    }

    #[test]
    fn nucleus_found_beyond_the_first_prefix() {
        // 1,000 equal logits: top-p 0.5 needs 500 tokens, more than the first prefix of 64;
        // ties are ordered by id.
        let c = candidates(&[0.0; 1000], 1.0, 0.5);
        assert_eq!(c.len(), 500);
        assert_eq!(
            c.iter().map(|x| x.0).collect::<Vec<_>>(),
            (0..500).collect::<Vec<_>>()
        );
    }

    #[test]
    fn draws_follow_the_distribution() {
        // 20,000 draws from 0.5 / 0.3 / 0.15 / 0.05: each frequency within 1.5 points
        // (more than 4 standard deviations of a binomial at these counts).
        let c = candidates(&four(), 1.0, 1.0);
        let mut rng = SplitMix64::new(7);
        let mut counts = [0usize; 4];
        for _ in 0..20_000 {
            counts[draw(&c, &mut rng) as usize] += 1;
        }
        for (n, p) in counts.iter().zip([0.5, 0.3, 0.15, 0.05]) {
            assert!((*n as f64 / 20_000.0 - p).abs() < 0.015, "{counts:?}");
        }
    }

    #[test]
    fn the_draw_walks_cumulative_weights() {
        // Weights 1, 2, 1 (total 4): u in [0, .25) -> 0, [.25, .75) -> 1, [.75, 1) -> 2.
        // Find seeds whose first number falls in each interval and check the choice.
        let c = vec![(0u32, 1.0), (1, 2.0), (2, 1.0)];
        for seed in 0..50u64 {
            let u = SplitMix64::new(seed).next_f64();
            let want = if u < 0.25 {
                0
            } else if u < 0.75 {
                1
            } else {
                2
            };
            assert_eq!(
                draw(&c, &mut SplitMix64::new(seed)),
                want,
                "seed {seed}, u {u}"
            );
        }
    }
}
