//! What gradient caching asks of the student: embeddings without gradients, and, for
//! given gradients of the embeddings, the gradient of every parameter, added up over
//! calls. Two paths compute them:
//! - [`GradientPath::Kernel`]: the hand-written CPU pass of [`super::cpu_train`]
//!   (packed texts, fused row kernels, weight gradients accumulated inside the
//!   products). The default for a student on the CPU.
//! - [`GradientPath::Graph`]: candle's autograd over [`Student::embed`], a chunk of
//!   [`GRAPH_TOKEN_BUDGET`] padded tokens at a time. The path on other devices, and the
//!   reference the kernel is tested against.
//!
//! Both give the same numbers up to float rounding (tests/student_kernel.rs).

use std::collections::HashMap;

use candle_core::{DType, Tensor, Var};

use super::cpu_train::{self, Shape, Weights};
use super::Student;
use crate::batcher::TokenBatch;
use crate::error::Result;

/// Padded tokens per forward pass that keeps candle's graph for backward: bounds the
/// memory of the graph path whatever the batch. Attention keeps `texts x len^2` scores
/// per layer, so at 4,096 tokens a chunk is 32 texts of 128 tokens or 8 of 512 (about
/// 100 MB of scores per layer at 512); measured, 336 texts of 128 tokens in one graph
/// held 18 GB.
pub const GRAPH_TOKEN_BUDGET: usize = 4096;

/// How parameter gradients are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GradientPath {
    /// The hand-written CPU training pass (CPU students only).
    Kernel,
    /// candle's autograd (every device).
    Graph,
}

/// Activations of [`Student::forward_keep`], for [`Student::backward_kept`].
pub struct KeptActivations(cpu_train::Kept);

/// Parameter gradients being added up, in the form of their path.
pub struct Gradients {
    inner: Inner,
}

enum Inner {
    Kernel(cpu_train::Gradients),
    /// One slot per variable of [`Student::vars`], in that order.
    Graph(Vec<Option<Tensor>>),
}

fn token_batch(rows: &[&[u32]]) -> TokenBatch {
    TokenBatch::in_order(rows.iter().map(|ids| ids.to_vec()))
}

/// Consecutive ranges of `rows` whose padded size (`count x longest`) stays within
/// `budget` (a longer single row still gets a range of its own). Order is kept.
fn chunks_by_padded_budget(rows: &[&[u32]], budget: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut longest) = (0, 0);
    for (i, r) in rows.iter().enumerate() {
        let next = longest.max(r.len().max(1));
        if i > start && (i - start + 1) * next > budget {
            out.push(start..i);
            start = i;
            longest = r.len().max(1);
        } else {
            longest = next;
        }
    }
    if start < rows.len() {
        out.push(start..rows.len());
    }
    out
}

impl Student {
    /// The path [`Student::zero_gradients`] takes: the kernel on the CPU, the graph
    /// elsewhere.
    pub fn default_gradient_path(&self) -> GradientPath {
        if self.device.is_cpu() {
            GradientPath::Kernel
        } else {
            GradientPath::Graph
        }
    }

    /// Runs `f` on the variables borrowed in place, the kernel's shape and its reusable
    /// buffers.
    fn with_weights<R>(
        &self,
        f: impl FnOnce(&Weights<'_>, &Shape, &mut cpu_train::Scratch) -> Result<R>,
    ) -> Result<R> {
        let shape = self.kernel_shape;
        let vars: HashMap<&str, &Var> = self.named.iter().map(|(n, v)| (n.as_str(), v)).collect();
        let weights = Weights::borrow(&vars, shape.layers)?;
        let mut scratch = self.kernel_scratch.lock().map_err(|_| {
            crate::error::OperatorError::Candle(candle_core::Error::Msg(
                "the student kernel's buffers were poisoned by a panic".into(),
            ))
        })?;
        f(&weights, &shape, &mut scratch)
    }

    /// Embeddings `[rows, dim]` of token-id rows, nothing recorded: the kernel's forward
    /// on the CPU, candle's graph-free forward (a chunk of [`GRAPH_TOKEN_BUDGET`] padded
    /// tokens at a time) elsewhere.
    pub fn embed_rows(&self, rows: &[&[u32]]) -> Result<Tensor> {
        if self.device.is_cpu() {
            let flat = self.with_weights(|w, shape, s| cpu_train::embed(w, shape, rows, s))?;
            return Ok(Tensor::from_vec(
                flat,
                (rows.len(), self.dim()),
                &self.device,
            )?);
        }
        let mut parts = Vec::new();
        for c in chunks_by_padded_budget(rows, GRAPH_TOKEN_BUDGET) {
            parts.push(self.embed_no_grad(&token_batch(&rows[c]))?);
        }
        if parts.is_empty() {
            return Ok(Tensor::zeros((0, self.dim()), DType::F32, &self.device)?);
        }
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// Zero gradients on the default path.
    pub fn zero_gradients(&self) -> Gradients {
        self.zero_gradients_on(self.default_gradient_path())
    }

    /// Zero gradients on `path` (the kernel path on a non-CPU student falls back to the
    /// graph).
    pub fn zero_gradients_on(&self, path: GradientPath) -> Gradients {
        let inner = match path {
            GradientPath::Kernel if self.device.is_cpu() => Inner::Kernel(
                cpu_train::Gradients::zeros(&self.kernel_shape, self.config.type_vocab_size),
            ),
            _ => Inner::Graph(vec![None; self.named.len()]),
        };
        Gradients { inner }
    }

    /// Adds to `grads` the gradient of `sum_rows dot(d_embeddings[row], embed(row))`
    /// with respect to every variable; `d_embeddings` is `[rows, dim]`.
    pub fn accumulate_gradients(
        &self,
        rows: &[&[u32]],
        d_embeddings: &Tensor,
        grads: &mut Gradients,
    ) -> Result<()> {
        match &mut grads.inner {
            Inner::Kernel(g) => {
                let d: Vec<f32> = d_embeddings
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1()?;
                self.with_weights(|w, shape, s| cpu_train::accumulate(w, shape, rows, &d, g, s))
            }
            Inner::Graph(total) => {
                let vars = self.vars();
                for c in chunks_by_padded_budget(rows, GRAPH_TOKEN_BUDGET) {
                    let e = self.embed(&token_batch(&rows[c.clone()]))?;
                    let surrogate = (&e * d_embeddings.narrow(0, c.start, c.len())?)?.sum_all()?;
                    let g = surrogate.backward()?;
                    for (slot, var) in total.iter_mut().zip(&vars) {
                        if let Some(grad) = g.get(var.as_tensor()) {
                            *slot = Some(match slot.take() {
                                None => grad.clone(),
                                Some(acc) => (acc + grad)?,
                            });
                        }
                    }
                }
                Ok(())
            }
        }
    }

    /// Embeddings `[rows, dim]` of token-id rows, keeping every activation the
    /// backward pass needs, so that [`Student::backward_kept`] runs no second forward:
    /// plain (not cached) training of a batch that fits in memory whole (about 150 KB per
    /// token for MiniLM's shape). The CPU kernel only; elsewhere an error.
    pub fn forward_keep(&self, rows: &[&[u32]]) -> Result<(Tensor, KeptActivations)> {
        if !self.device.is_cpu() {
            return Err(crate::error::OperatorError::Candle(
                candle_core::Error::Msg(
                    "forward_keep runs the CPU training kernel; this student is not on the CPU"
                        .into(),
                ),
            ));
        }
        let (flat, kept) =
            self.with_weights(|w, shape, s| cpu_train::forward_keep(w, shape, rows, s))?;
        let t = Tensor::from_vec(flat, (rows.len(), self.dim()), &self.device)?;
        Ok((t, KeptActivations(kept)))
    }

    /// Adds to kernel-path `grads` the gradient of `sum_rows dot(d_embeddings[row],
    /// embedding(row))` from activations kept by [`Student::forward_keep`] (the weights
    /// must not have changed in between).
    pub fn backward_kept(
        &self,
        kept: KeptActivations,
        d_embeddings: &Tensor,
        grads: &mut Gradients,
    ) -> Result<()> {
        let Inner::Kernel(g) = &mut grads.inner else {
            return Err(crate::error::OperatorError::Candle(
                candle_core::Error::Msg(
                    "backward_kept needs kernel-path gradients (zero_gradients_on(Kernel))".into(),
                ),
            ));
        };
        let d: Vec<f32> = d_embeddings
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        self.with_weights(|w, shape, s| cpu_train::backward_kept(w, shape, kept.0, &d, g, s))
    }

    /// The gradients as tensors, one slot per variable of [`Student::vars`] (in that
    /// order); `None` for a variable that received none.
    pub fn gradient_tensors(&self, grads: Gradients) -> Result<Vec<Option<Tensor>>> {
        match grads.inner {
            Inner::Graph(total) => Ok(total),
            Inner::Kernel(g) => {
                let shapes: HashMap<String, Vec<usize>> = self
                    .named
                    .iter()
                    .map(|(n, v)| (n.clone(), v.dims().to_vec()))
                    .collect();
                let mut by_name = g.into_tensors(&shapes)?;
                Ok(self.named.iter().map(|(n, _)| by_name.remove(n)).collect())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_keep_order_and_respect_the_token_budget() {
        let rows: Vec<Vec<u32>> = [3, 5, 2, 8, 1, 20].iter().map(|&n| vec![0; n]).collect();
        let refs: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
        // Budget 10: [3,5] pads to 2 x 5 = 10; adding 2 keeps 3 x 5 = 15 > 10, so it starts
        // a chunk; [2, 8] = 16 > 10 splits again; [8, 1] = 16 > 10; [1] then [20] alone.
        let c = chunks_by_padded_budget(&refs, 10);
        assert_eq!(c, vec![0..2, 2..3, 3..4, 4..5, 5..6]);
        assert_eq!(chunks_by_padded_budget(&refs, 1000), vec![0..6]);
        assert!(chunks_by_padded_budget(&[], 10).is_empty());
    }
}
