//! Rotary position embeddings for tokens at arbitrary positions.
//!
//! Every token of a step carries its own position (rows of a batch are at different
//! lengths), so there is no cached table: the cosines and sines of a step are computed
//! for exactly its positions, which costs T x d/2 cos/sin evaluations and no memory
//! proportional to the context length. The arithmetic follows transformers'
//! `LlamaRotaryEmbedding` in f32: inverse frequencies 1 / base^(2i/d) (then Llama 3.1's
//! scaling or GGUF's per-frequency divisors), angle = position x frequency rounded to
//! f32, then cos and sin.

use candle_core::{Device, Tensor};

use super::config::{LlmConfig, RopeLayout, RopeScaling};
use crate::error::Result;

/// The rotary embedding of one model.
#[derive(Debug, Clone)]
pub(crate) struct Rope {
    inv_freq: Vec<f32>,
    layout: RopeLayout,
    head_dim: usize,
}

impl Rope {
    pub fn new(config: &LlmConfig) -> Self {
        Rope {
            inv_freq: inverse_frequencies(config),
            layout: config.rope_layout,
            head_dim: config.head_dim,
        }
    }

    /// Cosines and sines for `positions`, each `(T, 1, d/2)`: the per-token layout that
    /// candle's rope kernels accept for inputs shaped `(T, heads, 1, d)`.
    pub fn tables(&self, positions: &[usize], device: &Device) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            let p = p as f32;
            for &f in &self.inv_freq {
                let angle = p * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let shape = (positions.len(), 1, half);
        Ok((
            Tensor::from_vec(cos, shape, device)?,
            Tensor::from_vec(sin, shape, device)?,
        ))
    }

    /// Rotates `x` of shape `(T, heads x d)` (the packed output of a projection) by the
    /// tables of [`Rope::tables`].
    pub fn apply(&self, x: &Tensor, heads: usize, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let t = x.dim(0)?;
        let x = x.reshape((t, heads, 1, self.head_dim))?;
        let y = match self.layout {
            RopeLayout::Halves => candle_nn::rotary_emb::rope(&x, cos, sin)?,
            RopeLayout::Interleaved => candle_nn::rotary_emb::rope_i(&x, cos, sin)?,
        };
        Ok(y.reshape((t, heads * self.head_dim))?)
    }
}

/// The d/2 inverse frequencies, as transformers computes them (f32 arithmetic).
fn inverse_frequencies(config: &LlmConfig) -> Vec<f32> {
    let d = config.head_dim;
    let base = config.rope_theta as f32;
    let plain: Vec<f32> = (0..d / 2)
        .map(|i| 1.0 / base.powf((2 * i) as f32 / d as f32))
        .collect();
    match &config.rope_scaling {
        RopeScaling::None => plain,
        RopeScaling::Factors(factors) => plain
            .iter()
            .zip(factors)
            .map(|(f, divisor)| f / divisor)
            .collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let (factor, low, high, old) = (
                *factor as f32,
                *low_freq_factor as f32,
                *high_freq_factor as f32,
                *original_max_position_embeddings as f32,
            );
            let low_freq_wavelen = old / low;
            let high_freq_wavelen = old / high;
            plain
                .iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    if wavelen < high_freq_wavelen {
                        f
                    } else if wavelen > low_freq_wavelen {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - low) / (high - low);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::config::Family;

    fn config(scaling: RopeScaling, layout: RopeLayout) -> LlmConfig {
        LlmConfig {
            family: Family::Llama,
            vocab_size: 10,
            hidden_size: 8,
            intermediate_size: 16,
            num_layers: 1,
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 4,
            rms_norm_eps: 1e-6,
            rope_theta: 100.0,
            rope_scaling: scaling,
            rope_layout: layout,
            tie_word_embeddings: true,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            max_position_embeddings: 64,
            sliding_window: None,
            eos_token_ids: vec![],
        }
    }

    #[test]
    fn frequencies_are_base_powers() {
        // d = 4: 1/100^0 = 1 and 1/100^(2/4) = 0.1.
        let f = inverse_frequencies(&config(RopeScaling::None, RopeLayout::Halves));
        assert_eq!(f.len(), 2);
        assert!(
            (f[0] - 1.0).abs() < 1e-7 && (f[1] - 0.1).abs() < 1e-7,
            "{f:?}"
        );
        let f = inverse_frequencies(&config(
            RopeScaling::Factors(vec![1.0, 4.0]),
            RopeLayout::Halves,
        ));
        assert!((f[1] - 0.025).abs() < 1e-7, "{f:?}");
    }

    #[test]
    fn halves_and_interleaved_rotate_their_pairs() {
        // Position 1, frequencies (1, 0.1): pair 0 turns by 1 rad, pair 1 by 0.1 rad.
        let x = Tensor::new(&[[1f32, 2., 3., 4.]], &Device::Cpu).unwrap();
        let (c0, s0, c1, s1) = (1f32.cos(), 1f32.sin(), 0.1f32.cos(), 0.1f32.sin());
        let rope = Rope::new(&config(RopeScaling::None, RopeLayout::Halves));
        let (cos, sin) = rope.tables(&[1], &Device::Cpu).unwrap();
        let y: Vec<f32> = rope
            .apply(&x, 1, &cos, &sin)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        // Halves: pairs (x0, x2) and (x1, x3).
        let want = [
            1. * c0 - 3. * s0,
            2. * c1 - 4. * s1,
            1. * s0 + 3. * c0,
            2. * s1 + 4. * c1,
        ];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{y:?} vs {want:?}");
        }
        let rope = Rope::new(&config(RopeScaling::None, RopeLayout::Interleaved));
        let y: Vec<f32> = rope
            .apply(&x, 1, &cos, &sin)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        // Interleaved: pairs (x0, x1) and (x2, x3).
        let want = [
            1. * c0 - 2. * s0,
            1. * s0 + 2. * c0,
            3. * c1 - 4. * s1,
            3. * s1 + 4. * c1,
        ];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{y:?} vs {want:?}");
        }
    }
}
