//! Attention over a key/value cache for a batch of rows at different lengths.
//!
//! A step of generation feeds each active row some new tokens (its whole prompt first,
//! then one token at a time), packed one after another: the linear layers see `(T, ·)`
//! matrices with no padding at all. Attention is the only place where rows must be kept
//! apart; [`KvCache`] does it in one of two ways:
//! - [`cpu::CpuKvCache`] (the CPU): each row's keys and values in their own growing
//!   buffer, attention computed row by row by a kernel of ours over exactly the row's
//!   tokens. No padding, no mask, and a row's result does not depend on which other rows
//!   share its batch (the bit-for-bit determinism of sampling relies on this).
//! - [`tensor::TensorKvCache`] (any device, CUDA in practice): rows left-padded to the
//!   longest in the step, a `(rows, kv_heads, columns, head_dim)` cache grown by
//!   concatenation, and an additive mask (causal, and hiding each row's padding columns),
//!   as Hugging Face's batched generation does.
//!
//! Both compute softmax(q k^T / sqrt(d)) v with grouped-query attention (query head h
//! reads key/value head h / (heads / kv_heads)) and causal order within a step.

pub(crate) mod cpu;
pub(crate) mod tensor;

use candle_core::Tensor;

use crate::error::Result;

/// Where one row's new tokens sit in a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RowSpan {
    /// Tokens of this row already in the cache (its position of the first new token).
    pub past: usize,
    /// Offset of the row's first new token in the packed input.
    pub start: usize,
    /// Number of new tokens (at least 1).
    pub len: usize,
}

/// The rows of one step, in cache-slot order: row i of the step is slot i of the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StepRows {
    pub rows: Vec<RowSpan>,
}

impl StepRows {
    /// Packs rows of `(past, new tokens)` one after another.
    pub fn pack(rows: impl IntoIterator<Item = (usize, usize)>) -> Self {
        let mut start = 0;
        let rows = rows
            .into_iter()
            .map(|(past, len)| {
                let span = RowSpan { past, start, len };
                start += len;
                span
            })
            .collect();
        StepRows { rows }
    }

    /// Total new tokens.
    pub fn tokens(&self) -> usize {
        self.rows.last().map_or(0, |r| r.start + r.len)
    }

    /// The position of every packed token.
    pub fn positions(&self) -> Vec<usize> {
        self.rows
            .iter()
            .flat_map(|r| r.past..r.past + r.len)
            .collect()
    }

    /// The packed index of each row's last token (whose logits predict the next one).
    pub fn last_tokens(&self) -> Vec<u32> {
        self.rows
            .iter()
            .map(|r| (r.start + r.len - 1) as u32)
            .collect()
    }
}

/// The shape of attention in one model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AttentionShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub layers: usize,
}

/// A batch's key/value cache, on the CPU or on a tensor device.
pub(crate) enum KvCache {
    Cpu(cpu::CpuKvCache),
    Tensor(tensor::TensorKvCache),
}

impl KvCache {
    /// Prepares the per-step geometry (masks, padding) shared by all layers.
    pub fn begin_step(&mut self, step: &StepRows) -> Result<()> {
        match self {
            KvCache::Cpu(c) => c.begin_step(step),
            KvCache::Tensor(c) => c.begin_step(step),
        }
    }

    /// Appends the step's keys and values of `layer` and returns attention's output,
    /// `(T, heads x head_dim)`, for `q` `(T, heads x head_dim)` and `k`, `v`
    /// `(T, kv_heads x head_dim)` (RoPE applied).
    pub fn attend(&mut self, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        match self {
            KvCache::Cpu(c) => c.attend(layer, q, k, v),
            KvCache::Tensor(c) => c.attend(layer, q, k, v),
        }
    }

    /// Row `slot`'s keys and values (the CPU cache only).
    pub fn snapshot(&self, slot: usize) -> Result<cpu::RowSnapshot> {
        match self {
            KvCache::Cpu(c) => c.snapshot(slot),
            KvCache::Tensor(_) => Err(crate::error::OperatorError::Candle(
                candle_core::Error::Msg("a padded cache has no row snapshots (a bug)".into()),
            )),
        }
    }

    /// Fills the empty row `slot` with a snapshot's keys and values (the CPU cache only).
    pub fn seed(&mut self, slot: usize, snapshot: &cpu::RowSnapshot) -> Result<()> {
        match self {
            KvCache::Cpu(c) => c.seed(slot, snapshot),
            KvCache::Tensor(_) => Err(crate::error::OperatorError::Candle(
                candle_core::Error::Msg("a padded cache cannot be seeded (a bug)".into()),
            )),
        }
    }

    /// Keeps only the rows (slots) listed, in that order; the others are forgotten.
    pub fn retain(&mut self, keep: &[usize]) -> Result<()> {
        match self {
            KvCache::Cpu(c) => {
                c.retain(keep);
                Ok(())
            }
            KvCache::Tensor(c) => c.retain(keep),
        }
    }
}
