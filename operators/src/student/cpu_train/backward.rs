//! Backward: from the gradient of the pooled embeddings, through every layer to the
//! embedding tables, adding each parameter's gradient in place.

use std::ops::Range;

use super::forward::{threads, KeptChunk, LayerActs};
use super::params::{at, Params};
use super::params::{Gradients, EMBEDDING_TENSORS, LAYER_TENSORS};
use super::{attention, rows, Chunk, Shape, MIN_NORM};
use crate::cpu_bert::matmul::{gemm, View};
use crate::st_config::Pooling;

/// `dW += dY^T X` for `dY` `[t, d_out]`, `X` `[t, d_in]`, `dW` `[d_out, d_in]`.
fn weight_grad(dw: &mut [f32], dy: &[f32], dy_view: View, x: &[f32], x_view: View) {
    gemm(
        dw,
        View::row_major(dy_view.cols, x_view.cols),
        dy,
        dy_view.t(),
        x,
        x_view,
        true,
        1.0,
        threads(),
    );
}

/// Buffers of one layer's backward, reused from layer to layer and call to call
/// (products write them whole, so stale contents never leak).
#[derive(Default)]
pub(crate) struct BackwardScratch {
    d_ff: Vec<f32>,
    d_ctx: Vec<f32>,
    d_qkv: Vec<f32>,
}

/// One layer backward: `dy` holds d(layer output) and becomes d(layer input); the
/// layer's parameter gradients are added to `g` (in [`LAYER_TENSORS`] order).
fn layer_backward(
    w: &[&[f32]; 16],
    shape: &Shape,
    texts: &[Range<usize>],
    acts: &LayerActs,
    dy: &mut [f32],
    g: &mut [Vec<f32>],
    scratch: &mut BackwardScratch,
) {
    let (h, i) = (shape.hidden, shape.intermediate);
    let t = acts.input.len() / h;
    // Output layer norm: dy -> d(post Wo2^T + bo2 + h1).
    {
        let (g2, b2) = g.split_at_mut(at::B2);
        rows::par_layer_norm_backward(
            shape.path,
            dy,
            &acts.xhat2,
            &acts.rstd2,
            w[at::G2],
            &mut g2[at::G2],
            &mut b2[0],
        );
    }
    rows::add_column_sums(&mut g[at::BO2], dy);
    weight_grad(
        &mut g[at::WO2],
        dy,
        View::row_major(t, h),
        &acts.post,
        View::row_major(t, i),
    );
    // d(post) = dy Wo2, then through the activation.
    scratch.d_ff.resize(t * i, 0.0);
    let d_ff = scratch.d_ff.as_mut_slice();
    gemm(
        d_ff,
        View::row_major(t, i),
        dy,
        View::row_major(t, h),
        w[at::WO2],
        View::row_major(h, i),
        false,
        1.0,
        threads(),
    );
    rows::par_activation_backward(shape.path, d_ff, &acts.pre, i, shape.act);
    rows::add_column_sums(&mut g[at::BI], d_ff);
    weight_grad(
        &mut g[at::WI],
        d_ff,
        View::row_major(t, i),
        &acts.h1,
        View::row_major(t, h),
    );
    // d(h1) = dy (residual) + d_ff Wi.
    gemm(
        dy,
        View::row_major(t, h),
        d_ff,
        View::row_major(t, i),
        w[at::WI],
        View::row_major(i, h),
        true,
        1.0,
        threads(),
    );
    // Attention layer norm: dy -> d(ctx Wo^T + bo + input).
    {
        let (g1, b1) = g.split_at_mut(at::B1);
        rows::par_layer_norm_backward(
            shape.path,
            dy,
            &acts.xhat1,
            &acts.rstd1,
            w[at::G1],
            &mut g1[at::G1],
            &mut b1[0],
        );
    }
    rows::add_column_sums(&mut g[at::BO], dy);
    weight_grad(
        &mut g[at::WO],
        dy,
        View::row_major(t, h),
        &acts.ctx,
        View::row_major(t, h),
    );
    scratch.d_ctx.resize(t * h, 0.0);
    let d_ctx = scratch.d_ctx.as_mut_slice();
    gemm(
        d_ctx,
        View::row_major(t, h),
        dy,
        View::row_major(t, h),
        w[at::WO],
        View::row_major(h, h),
        false,
        1.0,
        threads(),
    );
    scratch.d_qkv.resize(t * 3 * h, 0.0);
    let d_qkv = scratch.d_qkv.as_mut_slice();
    attention::backward(&acts.qkv, &acts.ctx, d_ctx, d_qkv, texts, shape.attention());
    // d(input) = dy (residual) + sum over q, k, v of d(proj) W.
    for (k, (wk, bk)) in [(at::WQ, at::BQ), (at::WK, at::BK), (at::WV, at::BV)]
        .into_iter()
        .enumerate()
    {
        let block = View::block(k * h, t, h, 3 * h);
        for row in d_qkv.chunks_exact(3 * h) {
            for (a, x) in g[bk].iter_mut().zip(&row[k * h..(k + 1) * h]) {
                *a += x;
            }
        }
        weight_grad(&mut g[wk], d_qkv, block, &acts.input, View::row_major(t, h));
        gemm(
            dy,
            View::row_major(t, h),
            d_qkv,
            block,
            w[wk],
            View::row_major(h, h),
            true,
            1.0,
            threads(),
        );
    }
}

/// Embedding backward: `dy` (d of the embedding layer norm's output) is consumed; the
/// word, position, token-type and norm gradients are added to `g`.
fn embed_backward(
    shape: &Shape,
    chunk: &Chunk,
    p: &Params<'_>,
    xhat: &[f32],
    rstd: &[f32],
    dy: &mut [f32],
    g: &mut [Vec<f32>],
) {
    let h = shape.hidden;
    {
        let (g3, b4) = g.split_at_mut(4);
        rows::par_layer_norm_backward(
            shape.path,
            dy,
            xhat,
            rstd,
            p.emb_gamma,
            &mut g3[3],
            &mut b4[0],
        );
    }
    for ((row, &id), &pos) in dy.chunks_exact(h).zip(&chunk.ids).zip(&chunk.positions) {
        for (a, x) in g[0][id as usize * h..(id as usize + 1) * h]
            .iter_mut()
            .zip(row)
        {
            *a += x;
        }
        for (a, x) in g[1][pos * h..(pos + 1) * h].iter_mut().zip(row) {
            *a += x;
        }
        for (a, x) in g[2][..h].iter_mut().zip(row) {
            *a += x;
        }
    }
}

/// d(last hidden states) `[T, H]` of a chunk from d(its embeddings) `[texts, H]`:
/// through normalisation (`e = u / |u|`: `du = (de - e (e . de)) / |u|`; a clamped
/// norm passes `de / eps`) and pooling (mean: `du / len` to every token; CLS: `du` to
/// the first).
fn pooled_backward(shape: &Shape, kept: &KeptChunk, d_emb: &[f32]) -> Vec<f32> {
    let h = shape.hidden;
    let mut dy = vec![0.0f32; kept.chunk.tokens() * h];
    for (((tr, de), e), &norm) in kept
        .chunk
        .texts
        .iter()
        .zip(d_emb.chunks_exact(h))
        .zip(kept.pooled.chunks_exact(h))
        .zip(&kept.norms)
    {
        if tr.is_empty() {
            continue;
        }
        let du: Vec<f32> = if !shape.normalize {
            de.to_vec()
        } else if norm > MIN_NORM {
            let dot: f32 = e.iter().zip(de).map(|(a, b)| a * b).sum();
            e.iter()
                .zip(de)
                .map(|(ei, d)| (d - ei * dot) / norm)
                .collect()
        } else {
            de.iter().map(|d| d / norm).collect()
        };
        match shape.pooling {
            Pooling::Mean => {
                let inv = 1.0 / tr.len() as f32;
                for row in dy[tr.start * h..tr.end * h].chunks_exact_mut(h) {
                    for (y, d) in row.iter_mut().zip(&du) {
                        *y = d * inv;
                    }
                }
            }
            Pooling::Cls => dy[tr.start * h..(tr.start + 1) * h].copy_from_slice(&du),
        }
    }
    dy
}

/// Backward over one kept chunk: adds every parameter's gradient of
/// `sum_texts dot(d_emb[text], embedding(text))` to `grads`.
pub(super) fn backward_chunk(
    p: &Params<'_>,
    shape: &Shape,
    kept: &KeptChunk,
    d_emb: &[f32],
    grads: &mut Gradients,
    scratch: &mut BackwardScratch,
) {
    if kept.chunk.tokens() == 0 {
        return;
    }
    let mut dy = pooled_backward(shape, kept, d_emb);
    for l in (0..shape.layers).rev() {
        let base = EMBEDDING_TENSORS.len() + l * LAYER_TENSORS.len();
        layer_backward(
            &p.layers[l],
            shape,
            &kept.chunk.texts,
            &kept.layers[l],
            &mut dy,
            &mut grads.grads[base..base + LAYER_TENSORS.len()],
            scratch,
        );
    }
    embed_backward(
        shape,
        &kept.chunk,
        p,
        &kept.emb_xhat,
        &kept.emb_rstd,
        &mut dy,
        &mut grads.grads[..EMBEDDING_TENSORS.len()],
    );
}
