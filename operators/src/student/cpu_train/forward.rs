//! Forward: embeddings, encoder layers and pooling over one chunk of packed texts,
//! keeping in [`LayerActs`] what backward needs.

use std::ops::Range;

use rayon::prelude::*;

use super::params::{at, Params};
use super::rows::{self, Norm};
use super::{attention, Chunk, Shape, MIN_NORM};
use crate::cpu_bert::matmul::{gemm, Parallelism, View};
use crate::st_config::Pooling;

/// What one layer keeps for backward (or reuses in place without gradients).
#[derive(Default)]
pub(super) struct LayerActs {
    /// Layer input `[T, H]`.
    pub(super) input: Vec<f32>,
    /// Query, key and value `[T, 3H]`.
    pub(super) qkv: Vec<f32>,
    /// Attention context `[T, H]`.
    pub(super) ctx: Vec<f32>,
    pub(super) xhat1: Vec<f32>,
    pub(super) rstd1: Vec<f32>,
    /// Attention block output (after its layer norm) `[T, H]`.
    pub(super) h1: Vec<f32>,
    /// Feed-forward pre-activation and activation `[T, I]`.
    pub(super) pre: Vec<f32>,
    pub(super) post: Vec<f32>,
    pub(super) xhat2: Vec<f32>,
    pub(super) rstd2: Vec<f32>,
}

impl LayerActs {
    pub(super) fn sized(&mut self, t: usize, shape: &Shape) {
        let (h, i) = (shape.hidden, shape.intermediate);
        self.input.resize(t * h, 0.0);
        self.qkv.resize(t * 3 * h, 0.0);
        self.ctx.resize(t * h, 0.0);
        self.xhat1.resize(t * h, 0.0);
        self.rstd1.resize(t, 0.0);
        self.h1.resize(t * h, 0.0);
        self.pre.resize(t * i, 0.0);
        self.post.resize(t * i, 0.0);
        self.xhat2.resize(t * h, 0.0);
        self.rstd2.resize(t, 0.0);
    }
}

/// Parallelism of the products over all tokens of a chunk.
pub(super) fn threads() -> Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => Parallelism::None,
        n => Parallelism::Rayon(n),
    }
}

/// `out = x W^T (+ out when accumulate)` for `x` `[t, d_in]` and `W` `[d_out, d_in]`.
fn linear(
    out: &mut [f32],
    x: &[f32],
    w: &[f32],
    t: usize,
    d_in: usize,
    d_out: usize,
    accumulate: bool,
) {
    gemm(
        out,
        View::row_major(t, d_out),
        x,
        View::row_major(t, d_in),
        w,
        View::row_major(d_out, d_in).t(),
        accumulate,
        1.0,
        threads(),
    );
}

/// Embedding layer forward: `out = LN(word[id] + position[p] + type[0])`, keeping the
/// normalised rows and `1/std` in `xhat` / `rstd`.
pub(super) fn embed_forward(
    p: &Params<'_>,
    shape: &Shape,
    chunk: &Chunk,
    out: &mut [f32],
    xhat: &mut [f32],
    rstd: &mut [f32],
) {
    let h = shape.hidden;
    let type0 = &p.token_type[..h];
    for ((row, &id), &pos) in out
        .chunks_exact_mut(h)
        .zip(&chunk.ids)
        .zip(&chunk.positions)
    {
        let word = &p.word[id as usize * h..(id as usize + 1) * h];
        let position = &p.position[pos * h..(pos + 1) * h];
        for (((x, w), q), t) in row.iter_mut().zip(word).zip(position).zip(type0) {
            *x = w + q + t;
        }
    }
    let zeros = vec![0.0; h];
    rows::par_layer_norm_keep(
        shape.path,
        out,
        xhat,
        rstd,
        &zeros,
        Norm {
            gamma: p.emb_gamma,
            beta: p.emb_beta,
            eps: shape.eps,
        },
    );
}

/// One layer forward from `acts.input` into `out`, filling the rest of `acts`.
pub(super) fn layer_forward(
    w: &[&[f32]; 16],
    shape: &Shape,
    texts: &[Range<usize>],
    acts: &mut LayerActs,
    out: &mut [f32],
) {
    let (h, i) = (shape.hidden, shape.intermediate);
    let t = acts.input.len() / h;
    // Query, key and value into their column blocks of qkv.
    for (k, (wk, bk)) in [(at::WQ, at::BQ), (at::WK, at::BK), (at::WV, at::BV)]
        .into_iter()
        .enumerate()
    {
        gemm(
            &mut acts.qkv,
            View::block(k * h, t, h, 3 * h),
            &acts.input,
            View::row_major(t, h),
            w[wk],
            View::row_major(h, h).t(),
            false,
            1.0,
            threads(),
        );
        let bias = w[bk];
        acts.qkv
            .par_chunks_mut(3 * h * rows::ROWS_PER_TASK)
            .for_each(|block| {
                for row in block.chunks_exact_mut(3 * h) {
                    for (x, b) in row[k * h..(k + 1) * h].iter_mut().zip(bias) {
                        *x += b;
                    }
                }
            });
    }
    attention::forward(&acts.qkv, &mut acts.ctx, texts, shape.attention());
    // h1 = LN(ctx Wo^T + bo + input).
    acts.h1.copy_from_slice(&acts.input);
    linear(&mut acts.h1, &acts.ctx, w[at::WO], t, h, h, true);
    let norm1 = Norm {
        gamma: w[at::G1],
        beta: w[at::B1],
        eps: shape.eps,
    };
    rows::par_layer_norm_keep(
        shape.path,
        &mut acts.h1,
        &mut acts.xhat1,
        &mut acts.rstd1,
        w[at::BO],
        norm1,
    );
    // post = act(h1 Wi^T + bi).
    linear(&mut acts.pre, &acts.h1, w[at::WI], t, h, i, false);
    rows::par_bias_activation_keep(
        shape.path,
        &mut acts.pre,
        &mut acts.post,
        w[at::BI],
        shape.act,
    );
    // out = LN(post Wo2^T + bo2 + h1).
    out.copy_from_slice(&acts.h1);
    linear(out, &acts.post, w[at::WO2], t, i, h, true);
    let norm2 = Norm {
        gamma: w[at::G2],
        beta: w[at::B2],
        eps: shape.eps,
    };
    rows::par_layer_norm_keep(
        shape.path,
        out,
        &mut acts.xhat2,
        &mut acts.rstd2,
        w[at::BO2],
        norm2,
    );
}

/// Pools the last hidden states `[T, H]` of `chunk`'s texts into `out` (`[texts, H]`),
/// normalised when the model normalises; returns each text's pooled norm (before
/// normalising), for backward.
pub(super) fn pool(shape: &Shape, chunk: &Chunk, hidden: &[f32], out: &mut [f32]) -> Vec<f32> {
    let h = shape.hidden;
    let mut norms = Vec::with_capacity(chunk.texts.len());
    for (t, row) in chunk.texts.iter().zip(out.chunks_exact_mut(h)) {
        row.fill(0.0);
        if !t.is_empty() {
            match shape.pooling {
                Pooling::Mean => {
                    for tok in hidden[t.start * h..t.end * h].chunks_exact(h) {
                        for (o, x) in row.iter_mut().zip(tok) {
                            *o += x;
                        }
                    }
                    let inv = 1.0 / t.len() as f32;
                    for o in row.iter_mut() {
                        *o *= inv;
                    }
                }
                Pooling::Cls => row.copy_from_slice(&hidden[t.start * h..(t.start + 1) * h]),
            }
        }
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt().max(MIN_NORM);
        if shape.normalize {
            for o in row.iter_mut() {
                *o /= norm;
            }
        }
        norms.push(norm);
    }
    norms
}

/// Everything backward needs from the forward pass over one chunk.
pub(super) struct KeptChunk {
    pub(super) chunk: Chunk,
    pub(super) layers: Vec<LayerActs>,
    /// The embedding layer norm's normalised rows and `1 / std`.
    pub(super) emb_xhat: Vec<f32>,
    pub(super) emb_rstd: Vec<f32>,
    /// The pooled (and, when the model normalises, normalised) embeddings `[texts, H]`.
    pub(super) pooled: Vec<f32>,
    /// Each text's pooled norm before normalising.
    pub(super) norms: Vec<f32>,
}

/// Forward over one chunk, keeping every layer's activations.
/// `layers` are buffers to reuse (any number; more are made as needed).
pub(super) fn forward_chunk(
    p: &Params<'_>,
    shape: &Shape,
    chunk: Chunk,
    mut layers: Vec<LayerActs>,
) -> KeptChunk {
    let (h, t) = (shape.hidden, chunk.tokens());
    layers.resize_with(shape.layers, LayerActs::default);
    for a in layers.iter_mut() {
        a.sized(t, shape);
    }
    let mut emb_xhat = vec![0.0; t * h];
    let mut emb_rstd = vec![0.0; t];
    let mut last = vec![0.0; t * h];
    match layers.first_mut() {
        Some(first) => embed_forward(
            p,
            shape,
            &chunk,
            &mut first.input,
            &mut emb_xhat,
            &mut emb_rstd,
        ),
        None => embed_forward(p, shape, &chunk, &mut last, &mut emb_xhat, &mut emb_rstd),
    }
    for l in 0..shape.layers {
        let (this, rest) = layers[l..].split_at_mut(1);
        let out = match rest.first_mut() {
            Some(next) => &mut next.input,
            None => &mut last,
        };
        layer_forward(&p.layers[l], shape, &chunk.texts, &mut this[0], out);
    }
    let mut pooled = vec![0.0; chunk.texts.len() * h];
    let norms = pool(shape, &chunk, &last, &mut pooled);
    KeptChunk {
        chunk,
        layers,
        emb_xhat,
        emb_rstd,
        pooled,
        norms,
    }
}
