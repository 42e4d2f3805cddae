//! An inference-only BERT encoder on plain f32 slices, for CPUs: the same function as
//! [`crate::bert::BertModel`] (same checkpoints, same tensor names, outputs within 1e-5),
//! several times faster.
//!
//! How it differs from the candle path:
//! - No padding. A batch's texts are packed into one `[tokens, hidden]` matrix; the dense
//!   layers run once over all tokens and attention runs per text and head over that text's
//!   own tokens only, so a batch costs what its real tokens cost.
//! - Whole-layer fusion: one `[hidden, 3 * hidden]` product for query, key and value;
//!   residuals accumulate in place inside the products; bias plus activation and bias plus
//!   layer norm are single passes (the `kernels` module); softmax's exponentials are taken in
//!   place and its division is applied to the `head_dim`-wide context rows rather than
//!   the `len`-wide probability rows. Scratch buffers are sized once per pass and pooled
//!   across passes, never allocated per layer.
//! - Threads work on separate texts: a batch is cut into one contiguous group of texts
//!   per rayon thread, with nearly equal token counts, and each group runs the whole
//!   encoder on its own (no synchronisation between layers). A batch of one text runs the
//!   products multi-threaded instead.
//!
//! Contract: [`CpuBert::forward`] returns, for texts given as token ids, the last hidden
//! states of every token, packed in input order; [`CpuBert::embed`] pools and normalises
//! them as sentence-transformers does. Single-segment inputs only (token type 0), as in
//! the candle path. Models whose embeddings are not BERT's (other position tables, token
//! types, a projection) load with [`CpuBert::load_layers`], embed on their own and enter
//! at [`CpuBert::forward_embedded`], which runs the encoder layers alone and has the same
//! contract from there on. The same batch gives the same bits: no reduction depends on
//! thread timing. A text's result does not depend on its batch-mates either: every row of
//! a product is the same bits whatever the product's other rows (a lone row is widened,
//! `matmul::MIN_EXTENT`), and attention, layer norms and pooling are per text
//! (`operators/tests/batch_invariance.rs`).

/// The revision of the kernel's arithmetic: raised whenever a change can move any result
/// by a bit, so that stored results (memo tables, embedding stages, teacher scores)
/// made by another revision are not mixed with this one's. 2: a lone row of a product is
/// widened to two (revision 1 multiplied it through gemm's matrix-vector path).
pub const ARITHMETIC_REVISION: u32 = 2;

pub(crate) mod kernels;
pub(crate) mod matmul;

use std::ops::Range;
use std::sync::Mutex;

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use crate::bert::{BertConfig, Weights};
use crate::cpu_path::{CpuPath, SupportedPath};
use crate::error::{OperatorError, Result};
use crate::st_config::Pooling;
use kernels::{bias_activation, bias_layer_norm, exp_rows, Activation};
use matmul::{gemm, Parallelism, View};

/// Rows per tile of the feed-forward block. 1024 rows of MiniLM's 1536 intermediate
/// floats are 6 MB: the buffer stays bounded whatever the batch, and in the last-level
/// cache; on the 2-core AVX-512 host this ran within 2% of untiled (or slightly faster),
/// while 256-row tiles pay for repacking the weights more often.
const FFN_TILE_ROWS: usize = 1024;

/// torch.nn.functional.normalize's floor on a row's norm: a zero row stays zero.
pub(crate) const MIN_NORM: f32 = 1e-12;

/// A layer's weights, transposed to `[in, out]` row-major.
struct Dense {
    weight: Vec<f32>,
    bias: Vec<f32>,
    d_in: usize,
    d_out: usize,
}

struct Norm {
    gamma: Vec<f32>,
    beta: Vec<f32>,
}

struct Layer {
    /// Query, key and value side by side: `[hidden, 3 * hidden]`.
    qkv: Dense,
    attn_out: Dense,
    attn_norm: Norm,
    inter: Dense,
    out: Dense,
    out_norm: Norm,
}

/// A BERT encoder whose weights live in plain vectors; see the module docs.
pub struct CpuBert {
    hidden: usize,
    heads: usize,
    head_dim: usize,
    intermediate: usize,
    vocab: usize,
    max_positions: usize,
    eps: f32,
    act: Activation,
    /// `[vocab, hidden]`.
    word: Vec<f32>,
    /// Position embeddings with token type 0's embedding added: `[positions, hidden]`.
    position: Vec<f32>,
    /// Zeros, the "bias" of the embeddings' layer norm.
    zeros: Vec<f32>,
    emb_norm: Norm,
    layers: Vec<Layer>,
    /// Which compiled copy of the row kernels runs ([`crate::cpu_path`]).
    path: SupportedPath,
    /// Scratch buffers of finished groups, for the next forward pass to reuse (at most
    /// one per thread that ran a group).
    scratch: Mutex<Vec<Scratch>>,
}

fn to_vec(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_device(&Device::Cpu)?.to_vec1::<f32>()?)
}

impl Dense {
    fn load(w: &Weights, name: &str, d_in: usize, d_out: usize) -> Result<Self> {
        let weight = w.get(&format!("{name}.weight"), &[d_out, d_in])?;
        Ok(Self {
            weight: to_vec(&weight.t()?.contiguous()?)?,
            bias: to_vec(&w.get(&format!("{name}.bias"), &[d_out])?)?,
            d_in,
            d_out,
        })
    }

    /// Several layers with the same input side by side: one wider product.
    fn concat(parts: &[Dense]) -> Self {
        let d_in = parts.first().map_or(0, |p| p.d_in);
        let d_out = parts.iter().map(|p| p.d_out).sum();
        let mut weight = Vec::with_capacity(d_in * d_out);
        for row in 0..d_in {
            for p in parts {
                weight.extend_from_slice(&p.weight[row * p.d_out..(row + 1) * p.d_out]);
            }
        }
        Self {
            weight,
            bias: parts.iter().flat_map(|p| p.bias.iter().copied()).collect(),
            d_in,
            d_out,
        }
    }

    /// `dst` (`[rows, d_out]`) `= (accumulate ? dst : 0) + xs * W`; the bias is the
    /// caller's, to fuse it with what follows.
    fn product(&self, dst: &mut [f32], xs: &[f32], accumulate: bool, par: Parallelism) {
        let rows = xs.len() / self.d_in;
        gemm(
            dst,
            View::row_major(rows, self.d_out),
            xs,
            View::row_major(rows, self.d_in),
            &self.weight,
            View::row_major(self.d_in, self.d_out),
            accumulate,
            1.0,
            par,
        );
    }
}

impl Norm {
    fn load(w: &Weights, name: &str, size: usize) -> Result<Self> {
        Ok(Self {
            gamma: to_vec(&w.get(&format!("{name}.weight"), &[size])?)?,
            beta: to_vec(&w.get(&format!("{name}.bias"), &[size])?)?,
        })
    }
}

impl Layer {
    fn load(w: &Weights, c: &BertConfig, i: usize) -> Result<Self> {
        let h = c.hidden_size;
        let p = format!("encoder.layer.{i}");
        let q = Dense::load(w, &format!("{p}.attention.self.query"), h, h)?;
        let k = Dense::load(w, &format!("{p}.attention.self.key"), h, h)?;
        let v = Dense::load(w, &format!("{p}.attention.self.value"), h, h)?;
        Ok(Self {
            qkv: Dense::concat(&[q, k, v]),
            attn_out: Dense::load(w, &format!("{p}.attention.output.dense"), h, h)?,
            attn_norm: Norm::load(w, &format!("{p}.attention.output.LayerNorm"), h)?,
            inter: Dense::load(
                w,
                &format!("{p}.intermediate.dense"),
                h,
                c.intermediate_size,
            )?,
            out: Dense::load(w, &format!("{p}.output.dense"), c.intermediate_size, h)?,
            out_norm: Norm::load(w, &format!("{p}.output.LayerNorm"), h)?,
        })
    }
}

/// Per-group scratch, reused by every layer and, through the pool, by later passes.
#[derive(Default)]
struct Scratch {
    qkv: Vec<f32>,
    ctx: Vec<f32>,
    inter: Vec<f32>,
    scores: Vec<f32>,
    /// 1 / (sum of a score row's exponentials), per query.
    inv_sums: Vec<f32>,
}

impl Scratch {
    /// Sizes every buffer for a group; contents are left as they are, because every
    /// buffer is written before it is read.
    fn fit(&mut self, tokens: usize, longest: usize, hidden: usize, intermediate: usize) {
        self.qkv.resize(tokens * 3 * hidden, 0.0);
        self.ctx.resize(tokens * hidden, 0.0);
        self.inter
            .resize(tokens.min(FFN_TILE_ROWS) * intermediate, 0.0);
        self.scores.resize(longest * longest, 0.0);
        self.inv_sums.resize(longest, 0.0);
    }
}

impl CpuBert {
    /// Reads every weight out of `weights` once (the same names and shapes as
    /// [`crate::bert::BertModel::load`]). The kernels run on the active CPU path
    /// ([`CpuPath::active`]); an invalid `DISTILLERY_CPU` fails the load.
    pub fn load(weights: &Weights, config: &BertConfig) -> Result<Self> {
        let h = config.hidden_size;
        let mut kernel = Self::load_layers(weights, config)?;
        let word =
            to_vec(&weights.get("embeddings.word_embeddings.weight", &[config.vocab_size, h])?)?;
        let mut position = to_vec(&weights.get(
            "embeddings.position_embeddings.weight",
            &[config.max_position_embeddings, h],
        )?)?;
        let token_type = to_vec(&weights.get(
            "embeddings.token_type_embeddings.weight",
            &[config.type_vocab_size, h],
        )?)?;
        for row in position.chunks_exact_mut(h) {
            for (p, t) in row.iter_mut().zip(&token_type[..h]) {
                *p += *t;
            }
        }
        kernel.vocab = config.vocab_size;
        kernel.max_positions = config.max_position_embeddings;
        kernel.word = word;
        kernel.position = position;
        kernel.emb_norm = Norm::load(weights, "embeddings.LayerNorm", h)?;
        Ok(kernel)
    }

    /// Reads the encoder layers alone (`encoder.layer.*`), for a model that computes its
    /// own embeddings: such a kernel has no vocabulary, so [`CpuBert::forward`] fails on
    /// any token and [`CpuBert::forward_embedded`] is its entry point.
    pub fn load_layers(weights: &Weights, config: &BertConfig) -> Result<Self> {
        let h = config.hidden_size;
        let act =
            Activation::parse(&config.hidden_act).ok_or_else(|| OperatorError::Unsupported {
                path: "config.json".into(),
                what: "hidden_act",
                value: config.hidden_act.clone(),
                supported: "gelu, gelu_new, gelu_pytorch_tanh, relu",
            })?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| Layer::load(weights, config, i))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            hidden: h,
            heads: config.num_attention_heads,
            head_dim: config.head_dim(),
            intermediate: config.intermediate_size,
            vocab: 0,
            max_positions: 0,
            eps: config.layer_norm_eps as f32,
            act,
            word: Vec::new(),
            position: Vec::new(),
            zeros: vec![0.0; h],
            emb_norm: Norm {
                gamma: Vec::new(),
                beta: Vec::new(),
            },
            layers,
            path: SupportedPath::active()?,
            scratch: Mutex::new(Vec::new()),
        })
    }

    pub fn hidden_size(&self) -> usize {
        self.hidden
    }

    /// The CPU path the kernels run on.
    pub fn cpu_path(&self) -> CpuPath {
        self.path.path()
    }

    /// Runs the kernels on `path` from now on; fails, changing nothing, when this CPU
    /// cannot run it.
    pub fn set_cpu_path(&mut self, path: CpuPath) -> Result<()> {
        self.path = path.check()?;
        Ok(())
    }

    /// Fails on ids outside the vocabulary and texts longer than the position table:
    /// a tokenizer that does not belong to the model, or one without truncation.
    fn check(&self, texts: &[&[u32]]) -> Result<()> {
        if self.word.is_empty() && texts.iter().any(|t| !t.is_empty()) {
            return Err(OperatorError::Unsupported {
                path: "cpu kernel".into(),
                what: "entry point",
                value: "forward on token ids".into(),
                supported: "forward_embedded (this kernel was loaded without embeddings)",
            });
        }
        for ids in texts {
            if ids.len() > self.max_positions {
                return Err(OperatorError::Tokenizer(format!(
                    "a text of {} tokens exceeds the model's {} positions (truncation off?)",
                    ids.len(),
                    self.max_positions
                )));
            }
            if let Some(id) = ids.iter().find(|&&id| id as usize >= self.vocab) {
                return Err(OperatorError::Tokenizer(format!(
                    "token id {id} is outside the model's vocabulary of {}",
                    self.vocab
                )));
            }
        }
        Ok(())
    }

    /// Last hidden states of every token of `texts`, packed: `[sum of lengths, hidden]`,
    /// text after text in input order.
    pub fn forward(&self, texts: &[&[u32]]) -> Result<Vec<f32>> {
        self.check(texts)?;
        let lens: Vec<usize> = texts.iter().map(|t| t.len()).collect();
        let total: usize = lens.iter().sum();
        let mut out = vec![0.0f32; total * self.hidden];
        self.run_groups(&lens, &mut out, |g, chunk| self.embed_ids(&texts[g], chunk));
        Ok(out)
    }

    /// The encoder layers over hidden states the caller embedded (what BERT's embeddings
    /// module outputs, layer norm included): `states` is `[sum of lens, hidden]`, text
    /// after text, and comes back as the last hidden states in the same layout. Texts
    /// attend only to their own tokens, as in [`CpuBert::forward`].
    pub fn forward_embedded(&self, lens: &[usize], mut states: Vec<f32>) -> Result<Vec<f32>> {
        let total: usize = lens.iter().sum();
        if states.len() != total * self.hidden {
            return Err(OperatorError::Candle(candle_core::Error::Msg(format!(
                "forward_embedded: {} floats for {total} tokens of width {}",
                states.len(),
                self.hidden
            ))));
        }
        self.run_groups(lens, &mut states, |_, _| {});
        Ok(states)
    }

    /// Cuts the texts of `lens` into groups (see [`partition`]) and runs `embed`, then
    /// the layers, on each group's rows of `out`; groups in parallel.
    fn run_groups<F>(&self, lens: &[usize], out: &mut [f32], embed: F)
    where
        F: Fn(Range<usize>, &mut [f32]) + Sync,
    {
        let threads = rayon::current_num_threads().max(1);
        let groups = partition(lens, threads);
        if groups.len() <= 1 {
            let par = if threads > 1 {
                Parallelism::Rayon(threads)
            } else {
                Parallelism::None
            };
            embed(0..lens.len(), out);
            self.forward_group(lens, out, par);
            return;
        }
        let mut chunks = Vec::with_capacity(groups.len());
        let mut rest = out;
        for g in &groups {
            let tokens: usize = lens[g.clone()].iter().sum();
            let (chunk, tail) = rest.split_at_mut(tokens * self.hidden);
            chunks.push((g.clone(), chunk));
            rest = tail;
        }
        chunks.into_par_iter().for_each(|(g, chunk)| {
            embed(g.clone(), chunk);
            self.forward_group(&lens[g], chunk, Parallelism::None)
        });
    }

    /// BERT's embeddings of one group of checked texts, into `out` (`[tokens, hidden]`).
    fn embed_ids(&self, texts: &[&[u32]], out: &mut [f32]) {
        let h = self.hidden;
        let mut rows = out.chunks_exact_mut(h);
        for ids in texts {
            for (pos, (&id, row)) in ids.iter().zip(rows.by_ref()).enumerate() {
                let word = &self.word[id as usize * h..(id as usize + 1) * h];
                let position = &self.position[pos * h..(pos + 1) * h];
                for ((x, w), p) in row.iter_mut().zip(word).zip(position) {
                    *x = *w + *p;
                }
            }
        }
        let n = &self.emb_norm;
        bias_layer_norm(self.path, out, &self.zeros, &n.gamma, &n.beta, self.eps);
    }

    /// The encoder layers over one group of embedded texts of `lens`, in place in `out`
    /// (`[tokens, hidden]`).
    fn forward_group(&self, lens: &[usize], out: &mut [f32], par: Parallelism) {
        let h = self.hidden;
        let tokens = out.len() / h;
        let longest = lens.iter().copied().max().unwrap_or(0);
        // A buffer from the pool, when one is free: fresh pages cost a fault each.
        let pooled = self.scratch.lock().ok().and_then(|mut p| p.pop());
        let mut s = pooled.unwrap_or_default();
        s.fit(tokens, longest, h, self.intermediate);
        for layer in &self.layers {
            self.layer(layer, lens, out, &mut s, par);
        }
        if let Ok(mut pool) = self.scratch.lock() {
            pool.push(s);
        }
    }

    fn layer(&self, l: &Layer, lens: &[usize], x: &mut [f32], s: &mut Scratch, par: Parallelism) {
        l.qkv.product(&mut s.qkv, x, false, par);
        add_bias(&mut s.qkv, &l.qkv.bias);
        self.attention(lens, s, par);
        l.attn_out.product(x, &s.ctx, true, par);
        let n = &l.attn_norm;
        bias_layer_norm(self.path, x, &l.attn_out.bias, &n.gamma, &n.beta, self.eps);
        // The feed-forward block a tile of rows at a time: its intermediate activations
        // stay in cache between the product that writes them and the one that reads them.
        for xt in x.chunks_mut(FFN_TILE_ROWS * self.hidden) {
            let rows = xt.len() / self.hidden;
            let inter = &mut s.inter[..rows * self.intermediate];
            l.inter.product(inter, xt, false, par);
            bias_activation(self.path, inter, &l.inter.bias, self.act);
            l.out.product(xt, inter, true, par);
            let n = &l.out_norm;
            bias_layer_norm(self.path, xt, &l.out.bias, &n.gamma, &n.beta, self.eps);
        }
    }

    /// Scaled dot-product attention per text and head, from `s.qkv` into `s.ctx`.
    fn attention(&self, lens: &[usize], s: &mut Scratch, par: Parallelism) {
        let (h, d) = (self.hidden, self.head_dim);
        let scale = 1.0 / (d as f32).sqrt();
        let mut start = 0;
        for &len in lens {
            if len == 0 {
                continue;
            }
            let scores = &mut s.scores[..len * len];
            let square = View::row_major(len, len);
            for head in 0..self.heads {
                // Row t of this text's queries, keys and values for `head`.
                let part =
                    |which: usize| View::block(start * 3 * h + which * h + head * d, len, d, 3 * h);
                gemm(
                    scores,
                    square,
                    &s.qkv,
                    part(0),
                    &s.qkv,
                    part(1).t(),
                    false,
                    scale,
                    par,
                );
                // Softmax, its division deferred to the d-wide context rows below.
                exp_rows(self.path, scores, len, &mut s.inv_sums[..len]);
                let ctx = View::block(start * h + head * d, len, d, h);
                gemm(
                    &mut s.ctx,
                    ctx,
                    scores,
                    square,
                    &s.qkv,
                    part(2),
                    false,
                    1.0,
                    par,
                );
                for (r, inv) in s.inv_sums[..len].iter().enumerate() {
                    let at = (start + r) * h + head * d;
                    for c in &mut s.ctx[at..at + d] {
                        *c *= *inv;
                    }
                }
            }
            start += len;
        }
    }

    /// One pooled (and, with `normalize`, L2-normalised) row per text: `[texts, hidden]`.
    /// An empty text gives a row of zeros.
    pub fn embed(&self, texts: &[&[u32]], pooling: Pooling, normalize: bool) -> Result<Vec<f32>> {
        let h = self.hidden;
        let hidden = self.forward(texts)?;
        let mut pooled = vec![0.0f32; texts.len() * h];
        let mut start = 0;
        for (ids, row) in texts.iter().zip(pooled.chunks_exact_mut(h)) {
            let states = &hidden[start * h..(start + ids.len()) * h];
            start += ids.len();
            match pooling {
                Pooling::Cls => {
                    if let Some(first) = states.chunks_exact(h).next() {
                        row.copy_from_slice(first);
                    }
                }
                Pooling::Mean => {
                    for token in states.chunks_exact(h) {
                        for (r, t) in row.iter_mut().zip(token) {
                            *r += *t;
                        }
                    }
                    // sentence-transformers clamps the count at 1e-9.
                    let count = (ids.len() as f32).max(1e-9);
                    for r in row.iter_mut() {
                        *r /= count;
                    }
                }
            }
            if normalize {
                let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(MIN_NORM);
                for r in row.iter_mut() {
                    *r /= norm;
                }
            }
        }
        Ok(pooled)
    }
}

fn add_bias(rows: &mut [f32], bias: &[f32]) {
    for row in rows.chunks_exact_mut(bias.len()) {
        for (x, b) in row.iter_mut().zip(bias) {
            *x += *b;
        }
    }
}

/// Cuts `lens.len()` texts into at most `parts` contiguous, non-empty groups whose token
/// counts are as even as a greedy left-to-right cut makes them.
fn partition(lens: &[usize], parts: usize) -> Vec<Range<usize>> {
    let n = lens.len();
    let parts = parts.clamp(1, n.max(1));
    let total: usize = lens.iter().sum();
    let mut groups = Vec::with_capacity(parts);
    let mut start = 0;
    let mut before = 0usize;
    for (i, &len) in lens.iter().enumerate() {
        let boundary = groups.len() + 1;
        if boundary < parts && i > start {
            // Cut before text i when that lands nearer the even share than cutting after
            // it, or when each remaining group needs one of the remaining texts.
            let target = (total * boundary) as f64 / parts as f64;
            let after = (before + len) as f64;
            let nearer = after > target && after - target > target - before as f64;
            if nearer || n - i == parts - boundary {
                groups.push(start..i);
                start = i;
            }
        }
        before += len;
    }
    if n > 0 {
        groups.push(start..n);
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_balances_tokens_and_keeps_groups_non_empty() {
        // 10 + 10 | 10 + 10: the even split of 40 tokens.
        assert_eq!(partition(&[10, 10, 10, 10], 2), vec![0..2, 2..4]);
        // One long text: 100 | 1 + 1 + 1.
        assert_eq!(partition(&[100, 1, 1, 1], 2), vec![0..1, 1..4]);
        // Three texts, three parts: one each, even when the first holds most tokens.
        assert_eq!(partition(&[100, 1, 1], 3), vec![0..1, 1..2, 2..3]);
        assert_eq!(partition(&[1, 1, 100], 3), vec![0..1, 1..2, 2..3]);
        // More parts than texts, or no texts.
        assert_eq!(partition(&[5, 5], 4), vec![0..1, 1..2]);
        assert_eq!(partition(&[], 2), Vec::<Range<usize>>::new());
        // Sorted longest first as the batcher sends them: 36 tokens, share 18; 8+7 = 15
        // and 8+7+6 = 21 miss it by 3 each, and a tie keeps text 2 in the first group.
        assert_eq!(partition(&[8, 7, 6, 5, 4, 3, 2, 1], 2), vec![0..3, 3..8]);
    }

    #[test]
    fn dense_concat_interleaves_rows() {
        let a = Dense {
            weight: vec![1.0, 2.0],
            bias: vec![0.5],
            d_in: 2,
            d_out: 1,
        };
        let b = Dense {
            weight: vec![3.0, 4.0, 5.0, 6.0],
            bias: vec![0.25, 0.75],
            d_in: 2,
            d_out: 2,
        };
        let c = Dense::concat(&[a, b]);
        // Row 0 of the [2, 3] result is a's row 0 then b's row 0.
        assert_eq!(c.weight, vec![1.0, 3.0, 4.0, 2.0, 5.0, 6.0]);
        assert_eq!(c.bias, vec![0.5, 0.25, 0.75]);
        assert_eq!((c.d_in, c.d_out), (2, 3));
    }
}
