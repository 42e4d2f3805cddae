//! Self-attention of packed texts, forward and backward, one text at a time.
//!
//! Layout: `qkv` is `[tokens, 3 * hidden]` (query, key, value side by side; head `h`
//! owns columns `h * d .. (h + 1) * d` of each), `ctx` is `[tokens, hidden]`. A text
//! attends to its own tokens only, so there is no mask and no padding.
//!
//! Backward keeps nothing from forward but `qkv` and `ctx`: it recomputes each head's
//! probabilities (one `len x len` product per head, a few percent of the layer) instead
//! of holding `heads x len^2` floats per text and layer, and it uses
//! `sum_j P_ij dP_ij = dC_i . C_i`, so the softmax backward needs no extra product.
//! With `S = scale Q K^T`, `P = softmax(S)`, `C = P V`:
//! `dV = P^T dC`, `dP = dC V^T`, `dS = P * (dP - rowdot(dC, C))`,
//! `dQ = scale dS K`, `dK = scale dS^T Q`.

use std::ops::Range;

use rayon::prelude::*;

use crate::cpu_bert::kernels::exp_rows;
use crate::cpu_bert::matmul::{gemm, Parallelism, View};
use crate::cpu_path::SupportedPath;

/// Shape of the attention of one layer.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    pub hidden: usize,
    pub count: usize,
    /// Which compiled copy of the softmax kernel runs.
    pub path: SupportedPath,
}

impl Heads {
    fn dim(self) -> usize {
        self.hidden / self.count
    }

    fn scale(self) -> f32 {
        1.0 / (self.dim() as f32).sqrt()
    }
}

/// Scratch of one text: scores or probabilities, and their gradient.
#[derive(Default)]
struct Scratch {
    probs: Vec<f32>,
    grad: Vec<f32>,
    inv: Vec<f32>,
}

impl Scratch {
    fn sized(&mut self, len: usize) {
        self.probs.resize(len * len, 0.0);
        self.grad.resize(len * len, 0.0);
        self.inv.resize(len, 0.0);
    }
}

/// Splits `data` (rows of `width` floats) into the row ranges of `texts`, in order.
fn split_rows<'a>(
    mut data: &'a mut [f32],
    texts: &[Range<usize>],
    width: usize,
) -> Vec<&'a mut [f32]> {
    let mut out = Vec::with_capacity(texts.len());
    let mut at = 0;
    for t in texts {
        let (_, rest) = data.split_at_mut((t.start - at) * width);
        let (mine, rest) = rest.split_at_mut(t.len() * width);
        out.push(mine);
        data = rest;
        at = t.end;
    }
    out
}

/// Probabilities of head `h` of a text of `len` tokens whose rows of `qkv` start at 0:
/// `scratch.probs = softmax(scale Q K^T)`.
fn probabilities(qkv: &[f32], len: usize, h: usize, heads: Heads, scratch: &mut Scratch) {
    let (hd, d) = (heads.hidden, heads.dim());
    let row = 3 * hd;
    gemm(
        &mut scratch.probs,
        View::row_major(len, len),
        qkv,
        View::block(h * d, len, d, row),
        qkv,
        View::block(hd + h * d, len, d, row).t(),
        false,
        heads.scale(),
        Parallelism::None,
    );
    exp_rows(heads.path, &mut scratch.probs, len, &mut scratch.inv);
    for (p_row, inv) in scratch.probs.chunks_exact_mut(len).zip(&scratch.inv) {
        for p in p_row {
            *p *= inv;
        }
    }
}

/// `ctx` of every text from `qkv`, texts in parallel.
pub fn forward(qkv: &[f32], ctx: &mut [f32], texts: &[Range<usize>], heads: Heads) {
    let (hd, d) = (heads.hidden, heads.dim());
    let row = 3 * hd;
    let outs = split_rows(ctx, texts, hd);
    outs.into_par_iter().zip(texts.par_iter()).for_each_init(
        Scratch::default,
        |scratch, (out, t)| {
            let len = t.len();
            let q = &qkv[t.start * row..t.end * row];
            scratch.sized(len);
            for h in 0..heads.count {
                probabilities(q, len, h, heads, scratch);
                gemm(
                    out,
                    View::block(h * d, len, d, hd),
                    &scratch.probs,
                    View::row_major(len, len),
                    q,
                    View::block(2 * hd + h * d, len, d, row),
                    false,
                    1.0,
                    Parallelism::None,
                );
            }
        },
    );
}

/// The gradient of `qkv` (written, not added) from the gradient of `ctx`, texts in
/// parallel.
pub fn backward(
    qkv: &[f32],
    ctx: &[f32],
    d_ctx: &[f32],
    d_qkv: &mut [f32],
    texts: &[Range<usize>],
    heads: Heads,
) {
    let (hd, d) = (heads.hidden, heads.dim());
    let row = 3 * hd;
    let scale = heads.scale();
    let outs = split_rows(d_qkv, texts, row);
    outs.into_par_iter().zip(texts.par_iter()).for_each_init(
        Scratch::default,
        |scratch, (out, t)| {
            let len = t.len();
            let q = &qkv[t.start * row..t.end * row];
            let c = &ctx[t.start * hd..t.end * hd];
            let dc = &d_ctx[t.start * hd..t.end * hd];
            scratch.sized(len);
            for h in 0..heads.count {
                probabilities(q, len, h, heads, scratch);
                let head = View::block(h * d, len, d, hd);
                // dV = P^T dC.
                gemm(
                    out,
                    View::block(2 * hd + h * d, len, d, row),
                    &scratch.probs,
                    View::row_major(len, len).t(),
                    dc,
                    head,
                    false,
                    1.0,
                    Parallelism::None,
                );
                // dP = dC V^T.
                gemm(
                    &mut scratch.grad,
                    View::row_major(len, len),
                    dc,
                    head,
                    q,
                    View::block(2 * hd + h * d, len, d, row).t(),
                    false,
                    1.0,
                    Parallelism::None,
                );
                // dS = P * (dP - dC . C), row by row.
                for i in 0..len {
                    let at = i * hd + h * d;
                    let delta: f32 = dc[at..at + d]
                        .iter()
                        .zip(&c[at..at + d])
                        .map(|(a, b)| a * b)
                        .sum();
                    let p_row = &scratch.probs[i * len..(i + 1) * len];
                    for (g, p) in scratch.grad[i * len..(i + 1) * len].iter_mut().zip(p_row) {
                        *g = p * (*g - delta);
                    }
                }
                // dQ = scale dS K; dK = scale dS^T Q.
                gemm(
                    out,
                    View::block(h * d, len, d, row),
                    &scratch.grad,
                    View::row_major(len, len),
                    q,
                    View::block(hd + h * d, len, d, row),
                    false,
                    scale,
                    Parallelism::None,
                );
                gemm(
                    out,
                    View::block(hd + h * d, len, d, row),
                    &scratch.grad,
                    View::row_major(len, len).t(),
                    q,
                    View::block(h * d, len, d, row),
                    false,
                    scale,
                    Parallelism::None,
                );
            }
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// f64 attention of one text, for the reference: `ctx` of every head.
    fn reference(qkv: &[f64], len: usize, heads: Heads) -> Vec<f64> {
        let (hd, d) = (heads.hidden, heads.dim());
        let row = 3 * hd;
        let scale = 1.0 / (d as f64).sqrt();
        let mut ctx = vec![0.0; len * hd];
        for h in 0..heads.count {
            for i in 0..len {
                let s: Vec<f64> = (0..len)
                    .map(|j| {
                        (0..d)
                            .map(|k| qkv[i * row + h * d + k] * qkv[j * row + hd + h * d + k])
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for k in 0..d {
                    ctx[i * hd + h * d + k] = (0..len)
                        .map(|j| e[j] / z * qkv[j * row + 2 * hd + h * d + k])
                        .sum();
                }
            }
        }
        ctx
    }

    fn pseudo(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn forward_and_backward_match_f64_differences() {
        let heads = Heads {
            hidden: 4,
            count: 2,
            path: SupportedPath::best(),
        };
        let texts = [0..3, 3..5];
        let tokens = 5;
        let qkv = pseudo(tokens * 12, 7);
        let w = pseudo(tokens * 4, 11); // L = sum(w * ctx)
        let mut ctx = vec![0.0f32; tokens * 4];
        forward(&qkv, &mut ctx, &texts, heads);
        let loss = |x: &[f64]| -> f64 {
            let mut l = 0.0;
            for t in &texts {
                let c = reference(&x[t.start * 12..t.end * 12], t.len(), heads);
                l += c
                    .iter()
                    .zip(&w[t.start * 4..t.end * 4])
                    .map(|(a, b)| a * *b as f64)
                    .sum::<f64>();
            }
            l
        };
        for t in &texts {
            let want = reference(
                &qkv[t.start * 12..t.end * 12]
                    .iter()
                    .map(|&x| x as f64)
                    .collect::<Vec<_>>(),
                t.len(),
                heads,
            );
            for (a, b) in ctx[t.start * 4..t.end * 4].iter().zip(want) {
                assert!((*a as f64 - b).abs() < 1e-6);
            }
        }
        let mut d_qkv = vec![f32::NAN; tokens * 12];
        backward(&qkv, &ctx, &w, &mut d_qkv, &texts, heads);
        let base: Vec<f64> = qkv.iter().map(|&x| x as f64).collect();
        for i in 0..base.len() {
            let mut up = base.clone();
            let mut down = base.clone();
            up[i] += 1e-6;
            down[i] -= 1e-6;
            let want = (loss(&up) - loss(&down)) / 2e-6;
            assert!(
                (d_qkv[i] as f64 - want).abs() < 1e-5,
                "d_qkv[{i}] = {} want {want}",
                d_qkv[i]
            );
        }
    }
}
