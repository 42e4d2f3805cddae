//! The architecture of a decoder LLM, from Hugging Face's `config.json` (plus
//! `generation_config.json`) or from a GGUF file's metadata.
//!
//! Llama, Qwen2 and Mistral are one architecture here: pre-norm decoder layers of
//! RMSNorm, grouped-query attention with rotary position embeddings, and a SwiGLU MLP.
//! They differ only in what [`LlmConfig`] records: biases on the q/k/v projections
//! (Qwen2), tied embeddings, the RoPE base and Llama 3.1's frequency scaling, and a
//! sliding attention window (Mistral v0.1), which distillery does not implement: it
//! refuses sequences longer than the window instead (full attention is exact below it).

use std::path::Path;

use crate::error::{OperatorError, Result};

mod gguf;
mod hf;

/// The model families this module runs, by `model_type` (config.json) or
/// `general.architecture` (GGUF).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Llama,
    Qwen2,
    Mistral,
}

/// What an error lists as supported `model_type`s.
pub const SUPPORTED_MODEL_TYPES: &str = "llama, qwen2, mistral";
/// What an error lists as supported GGUF architectures (llama.cpp writes Mistral
/// models as `llama`).
pub const SUPPORTED_GGUF_ARCHITECTURES: &str = "llama, qwen2";

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Qwen2 => "qwen2",
            Family::Mistral => "mistral",
        }
    }
}

/// How the rotary embedding pairs the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeLayout {
    /// Dimension i with i + d/2 (Hugging Face checkpoints; GGUF `qwen2`).
    Halves,
    /// Dimension 2i with 2i + 1 (GGUF `llama`, whose q/k rows were permuted by the
    /// converter to this order).
    Interleaved,
}

/// How the RoPE frequencies are derived from the base.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// base^(-2i/d).
    None,
    /// Llama 3.1's scaling (`rope_type: llama3`): low frequencies divided by `factor`,
    /// high ones kept, a smooth blend between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// One divisor per frequency, as GGUF's `rope_freqs.weight` stores Llama 3.1's
    /// scaling.
    Factors(Vec<f32>),
}

/// Everything the decoder needs to know about its shape.
#[derive(Debug, Clone, PartialEq)]
pub struct LlmConfig {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub rope_layout: RopeLayout,
    /// The output projection is the token embedding matrix.
    pub tie_word_embeddings: bool,
    /// Biases on the q, k and v projections (Qwen2; Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// A bias on the output projection (Llama with `attention_bias`).
    pub o_bias: bool,
    /// Biases on the MLP projections (Llama with `mlp_bias`).
    pub mlp_bias: bool,
    pub max_position_embeddings: usize,
    /// Tokens a query may look back over, where the model restricts it.
    pub sliding_window: Option<usize>,
    /// End-of-sequence ids from the configuration files (config.json and
    /// generation_config.json, or GGUF's eos/eot ids).
    pub eos_token_ids: Vec<u32>,
}

/// transformers' (and llama.cpp's) default RoPE base for all three families.
pub(crate) const DEFAULT_ROPE_THETA: f64 = 10_000.0;

impl LlmConfig {
    /// Shapes that cannot be a valid decoder are configuration errors, not panics later.
    pub(crate) fn check(&self, path: &Path) -> Result<()> {
        let bad = |message: String| {
            Err(OperatorError::BadConfig {
                path: path.to_path_buf(),
                what: "model config",
                message,
            })
        };
        if self.vocab_size == 0 || self.hidden_size == 0 || self.num_layers == 0 {
            return bad("vocab_size, hidden_size and the number of layers must be positive".into());
        }
        if self.num_heads == 0
            || self.num_kv_heads == 0
            || !self.num_heads.is_multiple_of(self.num_kv_heads)
        {
            return bad(format!(
                "{} attention heads cannot share {} key/value heads evenly",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "head dimension {} must be even (rotary pairs)",
                self.head_dim
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return bad(format!(
                "rms_norm_eps {} is not a small positive number",
                self.rms_norm_eps
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return bad(format!("rope_theta {} must be positive", self.rope_theta));
        }
        if let RopeScaling::Factors(f) = &self.rope_scaling {
            if f.len() != self.head_dim / 2 {
                return bad(format!(
                    "rope_freqs.weight has {} factors, the head needs {}",
                    f.len(),
                    self.head_dim / 2
                ));
            }
        }
        Ok(())
    }
}
