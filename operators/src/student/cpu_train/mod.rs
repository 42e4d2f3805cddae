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
mod rows;

use std::collections::HashMap;
use std::ops::Range;

use candle_core::{Storage, Tensor, Var};
use rayon::prelude::*;

use crate::bert::BertConfig;
use crate::cpu_bert::kernels::Activation;
use crate::cpu_bert::matmul::{gemm, Parallelism, View};
use crate::error::{OperatorError, Result};
use crate::st_config::Pooling;
use attention::Heads;
use rows::Norm;

/// Packed tokens per forward-backward chunk. Activations kept for backward cost about
/// 150 KB per token for MiniLM's shape, so 8,192 tokens hold 1.2 GB; products over 8,192
/// rows are as efficient as over more.
pub const CHUNK_TOKENS: usize = 8192;

/// torch.nn.functional.normalize's floor on a row's norm.
const MIN_NORM: f32 = 1e-12;

fn bug(message: String) -> OperatorError {
    OperatorError::Candle(candle_core::Error::Msg(format!(
        "student CPU training kernel: {message} (a bug)"
    )))
}

/// The shape of the network and how it pools.
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
}

impl Shape {
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
        })
    }

    fn attention(&self) -> Heads {
        Heads {
            hidden: self.hidden,
            count: self.heads,
        }
    }
}

/// Parameter names of one layer, in the order of [`LayerParams`] / [`LayerGrads`].
const LAYER_TENSORS: [&str; 16] = [
    "attention.self.query.weight",
    "attention.self.query.bias",
    "attention.self.key.weight",
    "attention.self.key.bias",
    "attention.self.value.weight",
    "attention.self.value.bias",
    "attention.output.dense.weight",
    "attention.output.dense.bias",
    "attention.output.LayerNorm.weight",
    "attention.output.LayerNorm.bias",
    "intermediate.dense.weight",
    "intermediate.dense.bias",
    "output.dense.weight",
    "output.dense.bias",
    "output.LayerNorm.weight",
    "output.LayerNorm.bias",
];

/// Embedding parameter names, in the order of [`EmbeddingParams`].
const EMBEDDING_TENSORS: [&str; 5] = [
    "embeddings.word_embeddings.weight",
    "embeddings.position_embeddings.weight",
    "embeddings.token_type_embeddings.weight",
    "embeddings.LayerNorm.weight",
    "embeddings.LayerNorm.bias",
];

/// Every parameter name in kernel order: embeddings, then layer by layer.
fn kernel_names(layers: usize) -> Vec<String> {
    let mut out: Vec<String> = EMBEDDING_TENSORS.iter().map(|s| s.to_string()).collect();
    for l in 0..layers {
        out.extend(
            LAYER_TENSORS
                .iter()
                .map(|s| format!("encoder.layer.{l}.{s}")),
        );
    }
    out
}

/// One tensor per parameter in kernel order, as f32 slices.
struct Params<'a> {
    word: &'a [f32],
    position: &'a [f32],
    token_type: &'a [f32],
    emb_gamma: &'a [f32],
    emb_beta: &'a [f32],
    layers: Vec<[&'a [f32]; 16]>,
}

/// Indices into [`LAYER_TENSORS`].
mod at {
    pub const WQ: usize = 0;
    pub const BQ: usize = 1;
    pub const WK: usize = 2;
    pub const BK: usize = 3;
    pub const WV: usize = 4;
    pub const BV: usize = 5;
    pub const WO: usize = 6;
    pub const BO: usize = 7;
    pub const G1: usize = 8;
    pub const B1: usize = 9;
    pub const WI: usize = 10;
    pub const BI: usize = 11;
    pub const WO2: usize = 12;
    pub const BO2: usize = 13;
    pub const G2: usize = 14;
    pub const B2: usize = 15;
}

/// The student's variables, read in place (each held under candle's read lock for the
/// pass, so nothing copies 90 MB of weights per call).
pub(crate) struct Weights<'v> {
    guards: Vec<(candle_core::StorageRef<'v>, &'v candle_core::Layout)>,
}

impl<'v> Weights<'v> {
    /// Borrows `vars` (by Hugging Face name) in kernel order.
    pub(crate) fn borrow(vars: &'v HashMap<&str, &'v Var>, layers: usize) -> Result<Self> {
        let mut guards = Vec::new();
        for name in kernel_names(layers) {
            let var = vars
                .get(name.as_str())
                .ok_or_else(|| bug(format!("parameter `{name}` is missing")))?;
            guards.push(var.as_tensor().storage_and_layout());
        }
        Ok(Self { guards })
    }

    fn params(&self, shape: &Shape) -> Result<Params<'_>> {
        let mut slices = Vec::with_capacity(self.guards.len());
        for (storage, layout) in &self.guards {
            let Storage::Cpu(cpu) = &**storage else {
                return Err(bug("a parameter is not on the CPU".into()));
            };
            let data = cpu.as_slice::<f32>()?;
            let (start, end) = layout
                .contiguous_offsets()
                .ok_or_else(|| bug("a parameter is not contiguous".into()))?;
            slices.push(&data[start..end]);
        }
        let (h, i) = (shape.hidden, shape.intermediate);
        let expect = |k: usize, n: usize| -> Result<()> {
            if slices[k].len() == n {
                Ok(())
            } else {
                Err(bug(format!(
                    "parameter {k} has {} floats, not {n}",
                    slices[k].len()
                )))
            }
        };
        expect(0, shape.vocab * h)?;
        expect(1, shape.positions * h)?;
        let mut layers = Vec::with_capacity(shape.layers);
        for l in 0..shape.layers {
            let base = EMBEDDING_TENSORS.len() + l * LAYER_TENSORS.len();
            let sizes = [
                h * h,
                h,
                h * h,
                h,
                h * h,
                h,
                h * h,
                h,
                h,
                h,
                i * h,
                i,
                h * i,
                h,
                h,
                h,
            ];
            for (k, n) in sizes.iter().enumerate() {
                expect(base + k, *n)?;
            }
            let mut arr: [&[f32]; 16] = [&[]; 16];
            arr.copy_from_slice(&slices[base..base + 16]);
            layers.push(arr);
        }
        Ok(Params {
            word: slices[0],
            position: slices[1],
            token_type: slices[2],
            emb_gamma: slices[3],
            emb_beta: slices[4],
            layers,
        })
    }
}

/// Gradients of every parameter, in kernel order, added to across calls.
pub struct Gradients {
    names: Vec<String>,
    grads: Vec<Vec<f32>>,
}

impl Gradients {
    pub(crate) fn zeros(shape: &Shape, type_vocab: usize) -> Self {
        let (h, i) = (shape.hidden, shape.intermediate);
        let mut grads = vec![
            vec![0.0; shape.vocab * h],
            vec![0.0; shape.positions * h],
            vec![0.0; type_vocab * h],
            vec![0.0; h],
            vec![0.0; h],
        ];
        for _ in 0..shape.layers {
            for n in [
                h * h,
                h,
                h * h,
                h,
                h * h,
                h,
                h * h,
                h,
                h,
                h,
                i * h,
                i,
                h * i,
                h,
                h,
                h,
            ] {
                grads.push(vec![0.0; n]);
            }
        }
        Self {
            names: kernel_names(shape.layers),
            grads,
        }
    }

    /// Each gradient as a tensor shaped like its variable, by parameter name.
    pub(crate) fn into_tensors(
        self,
        shapes: &HashMap<String, Vec<usize>>,
    ) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::with_capacity(self.names.len());
        for (name, g) in self.names.into_iter().zip(self.grads) {
            let dims = shapes
                .get(&name)
                .ok_or_else(|| bug(format!("no shape for `{name}`")))?;
            let t = Tensor::from_vec(g, dims.as_slice(), &candle_core::Device::Cpu)?;
            out.insert(name, t);
        }
        Ok(out)
    }
}

/// What one layer keeps for backward (or reuses in place without gradients).
#[derive(Default)]
struct LayerActs {
    /// Layer input `[T, H]`.
    input: Vec<f32>,
    /// Query, key and value `[T, 3H]`.
    qkv: Vec<f32>,
    /// Attention context `[T, H]`.
    ctx: Vec<f32>,
    xhat1: Vec<f32>,
    rstd1: Vec<f32>,
    /// Attention block output (after its layer norm) `[T, H]`.
    h1: Vec<f32>,
    /// Feed-forward pre-activation and activation `[T, I]`.
    pre: Vec<f32>,
    post: Vec<f32>,
    xhat2: Vec<f32>,
    rstd2: Vec<f32>,
}

impl LayerActs {
    fn sized(&mut self, t: usize, shape: &Shape) {
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
fn threads() -> Parallelism {
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

/// One chunk of packed texts: token ids and each text's token range.
struct Chunk {
    ids: Vec<u32>,
    positions: Vec<usize>,
    texts: Vec<Range<usize>>,
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

    fn tokens(&self) -> usize {
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

/// Embedding layer forward: `out = LN(word[id] + position[p] + type[0])`, keeping the
/// normalised rows and `1/std` in `xhat` / `rstd`.
fn embed_forward(
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
fn layer_forward(
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
        &mut acts.h1,
        &mut acts.xhat1,
        &mut acts.rstd1,
        w[at::BO],
        norm1,
    );
    // post = act(h1 Wi^T + bi).
    linear(&mut acts.pre, &acts.h1, w[at::WI], t, h, i, false);
    rows::par_bias_activation_keep(&mut acts.pre, &mut acts.post, w[at::BI], shape.act);
    // out = LN(post Wo2^T + bo2 + h1).
    out.copy_from_slice(&acts.h1);
    linear(out, &acts.post, w[at::WO2], t, i, h, true);
    let norm2 = Norm {
        gamma: w[at::G2],
        beta: w[at::B2],
        eps: shape.eps,
    };
    rows::par_layer_norm_keep(out, &mut acts.xhat2, &mut acts.rstd2, w[at::BO2], norm2);
}

/// Pools the last hidden states `[T, H]` of `chunk`'s texts into `out` (`[texts, H]`),
/// normalised when the model normalises; returns each text's pooled norm (before
/// normalising), for backward.
fn pool(shape: &Shape, chunk: &Chunk, hidden: &[f32], out: &mut [f32]) -> Vec<f32> {
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

/// Embeddings `[rows, hidden]` of `rows` (token ids), without keeping anything.
pub(crate) fn embed(weights: &Weights<'_>, shape: &Shape, rows: &[&[u32]]) -> Result<Vec<f32>> {
    validate(rows, shape)?;
    let p = weights.params(shape)?;
    let h = shape.hidden;
    let mut out = vec![0.0; rows.len() * h];
    let mut acts = LayerActs::default();
    let mut next = Vec::new();
    for range in chunks(rows, CHUNK_TOKENS) {
        let chunk = Chunk::new(&rows[range.clone()]);
        let t = chunk.tokens();
        acts.sized(t, shape);
        next.resize(t * h, 0.0);
        embed_forward(
            &p,
            shape,
            &chunk,
            &mut acts.input,
            &mut acts.xhat1,
            &mut acts.rstd1,
        );
        for w in &p.layers {
            layer_forward(w, shape, &chunk.texts, &mut acts, &mut next);
            std::mem::swap(&mut acts.input, &mut next);
        }
        pool(
            shape,
            &chunk,
            &acts.input,
            &mut out[range.start * h..range.end * h],
        );
    }
    Ok(out)
}

/// Adds to `grads` the gradient of `sum_rows dot(d_embeddings[row], embedding(row))`
/// with respect to every parameter. `d_embeddings` is `[rows, hidden]`.
pub(crate) fn accumulate(
    weights: &Weights<'_>,
    shape: &Shape,
    rows: &[&[u32]],
    d_embeddings: &[f32],
    grads: &mut Gradients,
) -> Result<()> {
    validate(rows, shape)?;
    let h = shape.hidden;
    if d_embeddings.len() != rows.len() * h {
        return Err(bug(format!(
            "{} embedding gradients for {} rows of width {h}",
            d_embeddings.len(),
            rows.len()
        )));
    }
    let p = weights.params(shape)?;
    let mut layers: Vec<LayerActs> = (0..shape.layers).map(|_| LayerActs::default()).collect();
    let mut emb_xhat = Vec::new();
    let mut emb_rstd = Vec::new();
    let mut last = Vec::new();
    for range in chunks(rows, CHUNK_TOKENS) {
        let chunk = Chunk::new(&rows[range.clone()]);
        let t = chunk.tokens();
        if t == 0 {
            continue;
        }
        // Forward, keeping every layer's activations.
        emb_xhat.resize(t * h, 0.0);
        emb_rstd.resize(t, 0.0);
        last.resize(t * h, 0.0);
        for a in layers.iter_mut() {
            a.sized(t, shape);
        }
        if let Some(first) = layers.first_mut() {
            embed_forward(
                &p,
                shape,
                &chunk,
                &mut first.input,
                &mut emb_xhat,
                &mut emb_rstd,
            );
        } else {
            embed_forward(&p, shape, &chunk, &mut last, &mut emb_xhat, &mut emb_rstd);
        }
        for l in 0..shape.layers {
            let (this, rest) = layers[l..].split_at_mut(1);
            let out = match rest.first_mut() {
                Some(next) => &mut next.input,
                None => &mut last,
            };
            layer_forward(&p.layers[l], shape, &chunk.texts, &mut this[0], out);
        }
        // d(last hidden) from d(embedding): through normalisation and pooling.
        let mut pooled = vec![0.0; chunk.texts.len() * h];
        let norms = pool(shape, &chunk, &last, &mut pooled);
        let mut dy = vec![0.0f32; t * h];
        let d_emb = &d_embeddings[range.start * h..range.end * h];
        for (((tr, de), e), &norm) in chunk
            .texts
            .iter()
            .zip(d_emb.chunks_exact(h))
            .zip(pooled.chunks_exact(h))
            .zip(&norms)
        {
            if tr.is_empty() {
                continue;
            }
            let du: Vec<f32> = if shape.normalize {
                // e = u / |u|: du = (de - e (e . de)) / |u| (a clamped norm passes de / eps).
                if norm > MIN_NORM {
                    let dot: f32 = e.iter().zip(de).map(|(a, b)| a * b).sum();
                    e.iter()
                        .zip(de)
                        .map(|(ei, d)| (d - ei * dot) / norm)
                        .collect()
                } else {
                    de.iter().map(|d| d / norm).collect()
                }
            } else {
                de.to_vec()
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
        // Backward, layer by layer.
        for l in (0..shape.layers).rev() {
            let base = EMBEDDING_TENSORS.len() + l * LAYER_TENSORS.len();
            layer_backward(
                &p.layers[l],
                shape,
                &chunk.texts,
                &layers[l],
                &mut dy,
                &mut grads.grads[base..base + LAYER_TENSORS.len()],
            );
        }
        embed_backward(
            shape,
            &chunk,
            &p,
            &emb_xhat,
            &emb_rstd,
            &mut dy,
            &mut grads.grads[..EMBEDDING_TENSORS.len()],
        );
    }
    Ok(())
}

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

/// One layer backward: `dy` holds d(layer output) and becomes d(layer input); the
/// layer's parameter gradients are added to `g` (in [`LAYER_TENSORS`] order).
fn layer_backward(
    w: &[&[f32]; 16],
    shape: &Shape,
    texts: &[Range<usize>],
    acts: &LayerActs,
    dy: &mut Vec<f32>,
    g: &mut [Vec<f32>],
) {
    let (h, i) = (shape.hidden, shape.intermediate);
    let t = acts.input.len() / h;
    // Output layer norm: dy -> d(post Wo2^T + bo2 + h1).
    {
        let (g2, b2) = g.split_at_mut(at::B2);
        rows::par_layer_norm_backward(
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
    let mut d_ff = vec![0.0f32; t * i];
    gemm(
        &mut d_ff,
        View::row_major(t, i),
        dy,
        View::row_major(t, h),
        w[at::WO2],
        View::row_major(h, i),
        false,
        1.0,
        threads(),
    );
    rows::par_activation_backward(&mut d_ff, &acts.pre, i, shape.act);
    rows::add_column_sums(&mut g[at::BI], &d_ff);
    weight_grad(
        &mut g[at::WI],
        &d_ff,
        View::row_major(t, i),
        &acts.h1,
        View::row_major(t, h),
    );
    // d(h1) = dy (residual) + d_ff Wi.
    gemm(
        dy,
        View::row_major(t, h),
        &d_ff,
        View::row_major(t, i),
        w[at::WI],
        View::row_major(i, h),
        true,
        1.0,
        threads(),
    );
    drop(d_ff);
    // Attention layer norm: dy -> d(ctx Wo^T + bo + input).
    {
        let (g1, b1) = g.split_at_mut(at::B1);
        rows::par_layer_norm_backward(
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
    let mut d_ctx = vec![0.0f32; t * h];
    gemm(
        &mut d_ctx,
        View::row_major(t, h),
        dy,
        View::row_major(t, h),
        w[at::WO],
        View::row_major(h, h),
        false,
        1.0,
        threads(),
    );
    let mut d_qkv = vec![0.0f32; t * 3 * h];
    attention::backward(
        &acts.qkv,
        &acts.ctx,
        &d_ctx,
        &mut d_qkv,
        texts,
        shape.attention(),
    );
    drop(d_ctx);
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
        weight_grad(
            &mut g[wk],
            &d_qkv,
            block,
            &acts.input,
            View::row_major(t, h),
        );
        gemm(
            dy,
            View::row_major(t, h),
            &d_qkv,
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
        rows::par_layer_norm_backward(dy, xhat, rstd, p.emb_gamma, &mut g3[3], &mut b4[0]);
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
