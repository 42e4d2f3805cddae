//! The student's training pass on the CPU, written out by hand: a forward pass over
//! packed texts that keeps what backward needs, and a backward pass that turns given
//! gradients of the embeddings into gradients of every parameter.
//!
//! This is what gradient caching asks of the student (src/train/gradcache.rs): embed
//! without gradients, then, for given `dL/d(embedding)`, add up `dL/d(parameter)`.
//! candle's autograd computes the same ([`super::Student::embed`] + `backward`, kept for
//! other devices and as the reference the tests compare with), but builds a graph of
//! padded tensors, allocates every intermediate and its gradient, and runs its
//! element-wise backward ops one by one. Here:
//! - Texts are packed (`[tokens, hidden]`, no padding); attention runs per text.
//! - Every product is one `gemm` call over all tokens of a chunk; weight gradients
//!   accumulate in place inside the products (`dW += dY^T X`), across chunks and calls.
//! - Bias + activation and bias + layer norm are single passes that keep the
//!   pre-activation and the normalised rows; attention probabilities are recomputed in
//!   backward rather than kept ([`attention`]).
//! - Memory is bounded by [`CHUNK_TOKENS`] packed tokens per forward-backward, about
//!   `8 * hidden + 2 * intermediate` floats per token and layer (150 KB per token for
//!   MiniLM): 1.2 GB at the default.
//!
//! Contracts: [`embed`] gives the same function as the student's candle encoder (within
//! float rounding; tested against it); [`accumulate`] adds, for every parameter `w`,
//! `sum_rows dot(d_embeddings[row], d embedding[row] / dw)` to `grads`. Products split
//! their output, never a sum, across threads, and row kernels work on whole rows, so the
//! results are the same bits whatever the thread count; the order of texts fixes the
//! order of every sum.

mod attention;
mod backward;
mod forward;
mod params;
mod rows;

use std::ops::Range;

use crate::bert::BertConfig;
use crate::cpu_bert::kernels::Activation;
use crate::cpu_bert::MIN_NORM;
use crate::cpu_path::SupportedPath;
use crate::error::{OperatorError, Result};
use crate::st_config::Pooling;
use attention::Heads;
use backward::BackwardScratch;
use forward::{KeptChunk, LayerActs};
pub use params::Gradients;
pub(crate) use params::Weights;

/// Packed tokens per forward-backward chunk. Activations kept for backward cost about
/// 150 KB per token for MiniLM's shape, so 8,192 tokens hold 1.2 GB; products over 8,192
/// rows are as efficient as over more.
pub const CHUNK_TOKENS: usize = 8192;

pub(super) fn bug(message: String) -> OperatorError {
    OperatorError::Candle(candle_core::Error::Msg(format!(
        "student CPU training kernel: {message} (a bug)"
    )))
}

/// The shape of the network, how it pools, and which compiled copy of the row kernels
/// runs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shape {
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub layers: usize,
    pub vocab: usize,
    pub positions: usize,
    pub eps: f32,
    pub act: Activation,
    pub pooling: Pooling,
    pub normalize: bool,
    /// The CPU path of the row kernels ([`crate::cpu_path`]).
    pub path: SupportedPath,
}

impl Shape {
    /// The shape of `config`'s network, its kernels on the active CPU path (an invalid
    /// `DISTILLERY_CPU` is an error).
    pub(crate) fn new(config: &BertConfig, pooling: Pooling, normalize: bool) -> Result<Self> {
        let act = Activation::parse(&config.hidden_act).ok_or_else(|| {
            bug(format!(
                "hidden_act `{}` passed config validation but has no kernel",
                config.hidden_act
            ))
        })?;
        Ok(Self {
            hidden: config.hidden_size,
            intermediate: config.intermediate_size,
            heads: config.num_attention_heads,
            layers: config.num_hidden_layers,
            vocab: config.vocab_size,
            positions: config.max_position_embeddings,
            eps: config.layer_norm_eps as f32,
            act,
            pooling,
            normalize,
            path: SupportedPath::active()?,
        })
    }

    pub(super) fn attention(&self) -> Heads {
        Heads {
            hidden: self.hidden,
            count: self.heads,
            path: self.path,
        }
    }
}

/// One chunk of packed texts: token ids and each text's token range.
pub(super) struct Chunk {
    pub(super) ids: Vec<u32>,
    pub(super) positions: Vec<usize>,
    pub(super) texts: Vec<Range<usize>>,
}

impl Chunk {
    fn new(rows: &[&[u32]]) -> Self {
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut texts = Vec::with_capacity(rows.len());
        for r in rows {
            let start = ids.len();
            ids.extend_from_slice(r);
            positions.extend(0..r.len());
            texts.push(start..ids.len());
        }
        Self {
            ids,
            positions,
            texts,
        }
    }

    pub(super) fn tokens(&self) -> usize {
        self.ids.len()
    }
}

/// Consecutive ranges of `rows` of at most `budget` tokens each (a longer text gets a
/// chunk of its own). Order is kept.
fn chunks(rows: &[&[u32]], budget: usize) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut tokens) = (0, 0);
    for (i, r) in rows.iter().enumerate() {
        if i > start && tokens + r.len() > budget {
            out.push(start..i);
            start = i;
            tokens = 0;
        }
        tokens += r.len();
    }
    if start < rows.len() {
        out.push(start..rows.len());
    }
    out
}

/// Checks every id and length before any work, naming the offending row.
fn validate(rows: &[&[u32]], shape: &Shape) -> Result<()> {
    for (r, ids) in rows.iter().enumerate() {
        if ids.len() > shape.positions {
            return Err(OperatorError::Candle(candle_core::Error::Msg(format!(
                "row {r} has {} tokens, more than the model's {} positions \
                 (tokenize truncates; this batch was built elsewhere)",
                ids.len(),
                shape.positions
            ))));
        }
        if let Some(id) = ids.iter().find(|&&id| id as usize >= shape.vocab) {
            return Err(OperatorError::Candle(candle_core::Error::Msg(format!(
                "row {r} has token id {id}, outside the vocabulary of {}",
                shape.vocab
            ))));
        }
    }
    Ok(())
}

/// Buffers reused from call to call: chunks' activations (about 1.2 GB each for MiniLM at
/// [`CHUNK_TOKENS`]) and backward's buffers. Fresh buffers of that size are mapped anew
/// by the allocator on every call and faulted in 4 KB page by 4 KB page: measured, that
/// was a quarter of a training step. `chunks` holds as many chunks' buffers as the
/// largest [`forward_keep`] so far kept at once (one for [`accumulate`]), `embed` the
/// two layers' buffers of the forward pass without gradients.
#[derive(Default)]
pub struct Scratch {
    chunks: Vec<Vec<LayerActs>>,
    embed: Vec<LayerActs>,
    backward: BackwardScratch,
}

/// Embeddings `[rows, hidden]` of `rows` (token ids), without keeping anything.
pub(crate) fn embed(
    weights: &Weights<'_>,
    shape: &Shape,
    rows: &[&[u32]],
    scratch: &mut Scratch,
) -> Result<Vec<f32>> {
    validate(rows, shape)?;
    let p = weights.params(shape)?;
    let h = shape.hidden;
    let mut out = vec![0.0; rows.len() * h];
    if scratch.embed.len() < 2 {
        scratch.embed.resize_with(2, LayerActs::default);
    }
    let (acts, spare) = scratch.embed.split_at_mut(1);
    let acts = &mut acts[0];
    let next = &mut spare[0].input;
    for range in chunks(rows, CHUNK_TOKENS) {
        let chunk = Chunk::new(&rows[range.clone()]);
        let t = chunk.tokens();
        acts.sized(t, shape);
        next.resize(t * h, 0.0);
        forward::embed_forward(
            &p,
            shape,
            &chunk,
            &mut acts.input,
            &mut acts.xhat1,
            &mut acts.rstd1,
        );
        for w in &p.layers {
            forward::layer_forward(w, shape, &chunk.texts, acts, next);
            std::mem::swap(&mut acts.input, next);
        }
        forward::pool(
            shape,
            &chunk,
            &acts.input,
            &mut out[range.start * h..range.end * h],
        );
    }
    Ok(out)
}

/// Activations of a forward pass kept for [`backward_kept`], chunk by chunk.
pub struct Kept {
    rows: usize,
    chunks: Vec<(Range<usize>, KeptChunk)>,
}

fn check_gradients(rows: usize, d_embeddings: &[f32], h: usize) -> Result<()> {
    if d_embeddings.len() == rows * h {
        Ok(())
    } else {
        Err(bug(format!(
            "{} embedding gradients for {rows} rows of width {h}",
            d_embeddings.len()
        )))
    }
}

/// Embeddings `[rows, hidden]` of `rows`, keeping every activation backward needs
/// (about 150 KB per token for MiniLM's shape: for batches that fit in memory whole).
pub(crate) fn forward_keep(
    weights: &Weights<'_>,
    shape: &Shape,
    rows: &[&[u32]],
    scratch: &mut Scratch,
) -> Result<(Vec<f32>, Kept)> {
    validate(rows, shape)?;
    let p = weights.params(shape)?;
    let h = shape.hidden;
    let mut out = vec![0.0; rows.len() * h];
    let mut kept = Kept {
        rows: rows.len(),
        chunks: Vec::new(),
    };
    for range in chunks(rows, CHUNK_TOKENS) {
        let reuse = scratch.chunks.pop().unwrap_or_default();
        let c = forward::forward_chunk(&p, shape, Chunk::new(&rows[range.clone()]), reuse);
        out[range.start * h..range.end * h].copy_from_slice(&c.pooled);
        kept.chunks.push((range, c));
    }
    Ok((out, kept))
}

/// Adds to `grads` the gradient of `sum_rows dot(d_embeddings[row], embedding(row))`
/// with respect to every parameter, from the activations of [`forward_keep`] (the
/// weights must not have changed since).
pub(crate) fn backward_kept(
    weights: &Weights<'_>,
    shape: &Shape,
    kept: Kept,
    d_embeddings: &[f32],
    grads: &mut Gradients,
    scratch: &mut Scratch,
) -> Result<()> {
    let h = shape.hidden;
    check_gradients(kept.rows, d_embeddings, h)?;
    let p = weights.params(shape)?;
    for (range, c) in kept.chunks {
        backward::backward_chunk(
            &p,
            shape,
            &c,
            &d_embeddings[range.start * h..range.end * h],
            grads,
            &mut scratch.backward,
        );
        scratch.chunks.push(c.layers);
    }
    Ok(())
}

/// Adds to `grads` the gradient of `sum_rows dot(d_embeddings[row], embedding(row))`
/// with respect to every parameter; `d_embeddings` is `[rows, hidden]`. Runs forward
/// and backward a chunk at a time, so memory is bounded by [`CHUNK_TOKENS`].
pub(crate) fn accumulate(
    weights: &Weights<'_>,
    shape: &Shape,
    rows: &[&[u32]],
    d_embeddings: &[f32],
    grads: &mut Gradients,
    scratch: &mut Scratch,
) -> Result<()> {
    validate(rows, shape)?;
    let h = shape.hidden;
    check_gradients(rows.len(), d_embeddings, h)?;
    let p = weights.params(shape)?;
    for range in chunks(rows, CHUNK_TOKENS) {
        let reuse = scratch.chunks.pop().unwrap_or_default();
        let c = forward::forward_chunk(&p, shape, Chunk::new(&rows[range.clone()]), reuse);
        backward::backward_chunk(
            &p,
            shape,
            &c,
            &d_embeddings[range.start * h..range.end * h],
            grads,
            &mut scratch.backward,
        );
        scratch.chunks.push(c.layers);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_keep_order_and_the_token_budget() {
        let rows: Vec<Vec<u32>> = [3, 5, 2, 8, 1, 20].iter().map(|&n| vec![0; n]).collect();
        let refs: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
        // Budget 10: 3 + 5 + 2 = 10 fits; 8 starts a chunk, + 1 = 9; 20 alone.
        assert_eq!(chunks(&refs, 10), vec![0..3, 3..5, 5..6]);
        assert_eq!(chunks(&refs, 1000), vec![0..6]);
        assert!(chunks(&[], 10).is_empty());
    }
}
