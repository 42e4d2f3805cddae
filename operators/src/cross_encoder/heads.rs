//! The classification heads, on the first token's last hidden state. All three are one
//! dense layer, an activation and an output layer; they differ in names and activation:
//! - BERT: `bert.pooler.dense` -> tanh -> `classifier` (the pooler is part of the
//!   encoder in the checkpoint, hence the prefix);
//! - ELECTRA: `classifier.dense` -> GELU (exact, erf-based) -> `classifier.out_proj`;
//! - XLM-RoBERTa: `classifier.dense` -> tanh -> `classifier.out_proj`.
//!
//! Dropout sits between these in transformers and is the identity in eval mode.

use candle_core::Tensor;

use super::checkpoint::Checkpoint;
use super::config::{Family, ModelConfig};
use crate::error::{OperatorError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Activation {
    Tanh,
    GeluErf,
}

pub(crate) struct Head {
    /// `[hidden, hidden]`, transposed for a plain product.
    dense_t: Tensor,
    dense_bias: Tensor,
    act: Activation,
    /// `[hidden, num_labels]`, transposed.
    out_t: Tensor,
    out_bias: Tensor,
}

impl Head {
    pub fn load(ckpt: &Checkpoint, c: &ModelConfig) -> Result<Self> {
        let (h, labels) = (c.encoder.hidden_size, c.num_labels);
        let (dense_weight, dense_bias, act, out) = match c.family {
            Family::Bert => (
                ckpt.encoder("pooler.dense.weight", &[h, h])?,
                ckpt.encoder("pooler.dense.bias", &[h])?,
                Activation::Tanh,
                "classifier",
            ),
            Family::Electra | Family::XlmRoberta => (
                ckpt.head("classifier.dense.weight", &[h, h])?,
                ckpt.head("classifier.dense.bias", &[h])?,
                if c.family == Family::Electra {
                    Activation::GeluErf
                } else {
                    Activation::Tanh
                },
                "classifier.out_proj",
            ),
        };
        // The output layer's rows are the labels: a mismatch means config.json and the
        // weights disagree on num_labels, and the error says so.
        let with_labels = |e: OperatorError| match e {
            OperatorError::BadTensor {
                path,
                name,
                message,
            } => OperatorError::BadTensor {
                path,
                name,
                message: format!(
                    "{message} (its first dimension is num_labels, {labels} in config.json)"
                ),
            },
            other => other,
        };
        let out_weight = ckpt
            .head(&format!("{out}.weight"), &[labels, h])
            .map_err(with_labels)?;
        let out_bias = ckpt
            .head(&format!("{out}.bias"), &[labels])
            .map_err(with_labels)?;
        Ok(Self {
            dense_t: dense_weight.t()?.contiguous()?,
            dense_bias,
            act,
            out_t: out_weight.t()?.contiguous()?,
            out_bias,
        })
    }

    /// `first`: `[rows, hidden]` (each text's first token) -> logits `[rows, num_labels]`.
    pub fn forward(&self, first: &Tensor) -> Result<Tensor> {
        let x = first
            .matmul(&self.dense_t)?
            .broadcast_add(&self.dense_bias)?;
        let x = match self.act {
            Activation::Tanh => x.tanh()?,
            Activation::GeluErf => x.gelu_erf()?,
        };
        Ok(x.matmul(&self.out_t)?.broadcast_add(&self.out_bias)?)
    }
}
