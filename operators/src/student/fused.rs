//! Layer norm, softmax and erf GELU as single candle operations with hand-written
//! backward passes, on the CPU.
//!
//! Composed from candle's elementwise operations, these three dominate the student's
//! backward pass, because every composed step allocates a full tensor and its gradient
//! another. Here each is one pass forward and one pass backward over rows. Measured on
//! MiniLM's shapes (16 x 128 tokens, 2 cores, best of 3, forward / backward in ms):
//!
//! | | composed | here |
//! |---|---|---|
//! | layer norm, 2048 x 384 | 12 / 93 | 2 / 29 |
//! | attention softmax, 16 x 12 x 128 x 128 | 52 / 209 | 20 / 56 |
//! | erf GELU, 2048 x 1536 | 38 / 229 | 48 / 95 |
//!
//! (The largest matmul, 2048 x 384 by 384 x 1536, is about 20 / 66.)
//!
//! The functions take the fused path for contiguous-or-not f32 tensors on the CPU and
//! fall back to candle's composed, differentiable operations elsewhere (CUDA), so the
//! student computes the same function on every device. Backward passes are themselves
//! unrecorded operations: no second derivatives, which training never asks for.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;

/// Rows handed to one rayon task: enough work per task (64 rows of 128-384 floats) that
/// scheduling costs nothing next to it.
const ROWS_PER_TASK: usize = 64;

fn fused(xs: &Tensor) -> bool {
    xs.device().is_cpu() && xs.dtype() == DType::F32
}

/// The f32 data of a contiguous CPU tensor's storage.
fn data<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    let (start, end) = l.contiguous_offsets().ok_or_else(|| {
        candle_core::Error::Msg("fused student op: input is not contiguous".into())
    })?;
    Ok(&s.as_slice::<f32>()?[start..end])
}

fn width(l: &Layout) -> candle_core::Result<usize> {
    l.shape()
        .dims()
        .last()
        .copied()
        .filter(|&w| w > 0)
        .ok_or_else(|| candle_core::Error::Msg("fused student op: empty last dimension".into()))
}

/// Applies `f` to matching rows of `out` and of each input (all `w` wide).
fn rows_par<const N: usize, F>(out: &mut [f32], inputs: [&[f32]; N], w: usize, f: F)
where
    F: Fn(&mut [f32], [&[f32]; N]) + Sync,
{
    out.par_chunks_mut(w * ROWS_PER_TASK)
        .enumerate()
        .for_each(|(task, chunk)| {
            let base = task * w * ROWS_PER_TASK;
            for (r, row) in chunk.chunks_mut(w).enumerate() {
                let at = base + r * w;
                f(row, inputs.map(|x| &x[at..at + w]));
            }
        });
}

fn mean(xs: &[f32]) -> f32 {
    xs.iter().sum::<f32>() / xs.len() as f32
}

/// Softmax over the last dimension.
pub(super) fn softmax_last_dim(xs: &Tensor) -> candle_core::Result<Tensor> {
    if fused(xs) {
        xs.contiguous()?.apply_op1(Softmax)
    } else {
        candle_nn::ops::softmax(xs, D::Minus1)
    }
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "student-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w) = (data(s, l)?, width(l)?);
        let mut out = vec![0f32; x.len()];
        rows_par(&mut out, [x], w, |y, ins| {
            let max = ins[0].iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0;
            for (o, &v) in y.iter_mut().zip(ins[0]) {
                *o = (v - max).exp();
                sum += *o;
            }
            y.iter_mut().for_each(|o| *o /= sum);
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(&g.contiguous()?, &SoftmaxGrad)?))
    }
}

/// `dx = y * (g - sum(g * y))` per row, from the softmax output `y` and its gradient `g`.
struct SoftmaxGrad;

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "student-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (y, g, w) = (data(s1, l1)?, data(s2, l2)?, width(l1)?);
        let mut out = vec![0f32; y.len()];
        rows_par(&mut out, [y, g], w, |dx, ins| {
            let dot: f32 = ins[0].iter().zip(ins[1]).map(|(a, b)| a * b).sum();
            for ((d, &yv), &gv) in dx.iter_mut().zip(ins[0]).zip(ins[1]) {
                *d = yv * (gv - dot);
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// 1 / sqrt(2), the argument scale of erf in GELU.
const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1 / sqrt(2 pi), the standard normal density's factor.
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

/// transformers' "gelu": `x * Phi(x)` with the exact (erf) normal distribution.
pub(super) fn gelu_erf(xs: &Tensor) -> candle_core::Result<Tensor> {
    if fused(xs) {
        xs.contiguous()?.apply_op1(GeluErf)
    } else {
        xs.gelu_erf()
    }
}

struct GeluErf;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "student-gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w) = (data(s, l)?, width(l)?);
        let mut out = vec![0f32; x.len()];
        rows_par(&mut out, [x], w, |y, ins| {
            for (o, &v) in y.iter_mut().zip(ins[0]) {
                *o = 0.5 * v * (1.0 + candle_core::cpu::erf::erf_f32(v * FRAC_1_SQRT_2));
            }
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&g.contiguous()?, &GeluErfGrad)?))
    }
}

/// `dx = g * (Phi(x) + x * phi(x))`.
struct GeluErfGrad;

impl CustomOp2 for GeluErfGrad {
    fn name(&self) -> &'static str {
        "student-gelu-erf-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, g, w) = (data(s1, l1)?, data(s2, l2)?, width(l1)?);
        let mut out = vec![0f32; x.len()];
        rows_par(&mut out, [x, g], w, |dx, ins| {
            for ((d, &xv), &gv) in dx.iter_mut().zip(ins[0]).zip(ins[1]) {
                let cdf = 0.5 * (1.0 + candle_core::cpu::erf::erf_f32(xv * FRAC_1_SQRT_2));
                let pdf = FRAC_1_SQRT_2PI * (-0.5 * xv * xv).exp();
                *d = gv * (cdf + xv * pdf);
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Layer norm over the last dimension: `(x - mean) / sqrt(var + eps) * weight + bias`,
/// the population variance, as torch's `LayerNorm`.
pub(super) fn layer_norm(
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f32,
) -> candle_core::Result<Tensor> {
    if fused(xs) {
        xs.contiguous()?.apply_op3(
            &weight.contiguous()?,
            &bias.contiguous()?,
            LayerNorm { eps },
        )
    } else {
        candle_nn::ops::layer_norm_slow(xs, weight, bias, eps)
    }
}

/// Mean and 1 / standard deviation of a row.
fn moments(x: &[f32], eps: f32) -> (f32, f32) {
    let m = mean(x);
    let var = x.iter().map(|v| (v - m) * (v - m)).sum::<f32>() / x.len() as f32;
    (m, 1.0 / (var + eps).sqrt())
}

struct LayerNorm {
    eps: f32,
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "student-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, gamma, beta, w) = (data(s1, l1)?, data(s2, l2)?, data(s3, l3)?, width(l1)?);
        if gamma.len() != w || beta.len() != w {
            candle_core::bail!(
                "layer norm: weight {} / bias {} for rows of {w}",
                gamma.len(),
                beta.len()
            );
        }
        let mut out = vec![0f32; x.len()];
        rows_par(&mut out, [x], w, |y, ins| {
            let (m, r) = moments(ins[0], self.eps);
            for (((o, &v), &ga), &be) in y.iter_mut().zip(ins[0]).zip(gamma).zip(beta) {
                *o = (v - m) * r * ga + be;
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let dx = x.apply_op3_no_bwd(weight, &g, &LayerNormGrad { eps: self.eps })?;
        let h = weight.dim(0)?;
        let rows = x.elem_count() / h;
        let normalised = x.apply_op1_no_bwd(&Normalise { eps: self.eps })?;
        let g2 = g.reshape((rows, h))?;
        let dweight = (g2.clone() * normalised.reshape((rows, h))?)?.sum(0)?;
        let dbias = g2.sum(0)?;
        Ok((Some(dx), Some(dweight), Some(dbias)))
    }
}

/// `(x - mean) / sqrt(var + eps)` per row, without weight and bias.
struct Normalise {
    eps: f32,
}

impl CustomOp1 for Normalise {
    fn name(&self) -> &'static str {
        "student-normalise"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w) = (data(s, l)?, width(l)?);
        let mut out = vec![0f32; x.len()];
        rows_par(&mut out, [x], w, |y, ins| {
            let (m, r) = moments(ins[0], self.eps);
            for (o, &v) in y.iter_mut().zip(ins[0]) {
                *o = (v - m) * r;
            }
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

/// The input gradient of layer norm: with `n = (x - mean) * r` and `h = g * weight`,
/// `dx = r * (h - mean(h) - n * mean(h * n))`.
struct LayerNormGrad {
    eps: f32,
}

impl CustomOp3 for LayerNormGrad {
    fn name(&self) -> &'static str {
        "student-layer-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, gamma, g, w) = (data(s1, l1)?, data(s2, l2)?, data(s3, l3)?, width(l1)?);
        let mut out = vec![0f32; x.len()];
        rows_par(&mut out, [x, g], w, |dx, ins| {
            let (m, r) = moments(ins[0], self.eps);
            let (mut mean_h, mut mean_hn) = (0f32, 0f32);
            for ((&xv, &gv), &ga) in ins[0].iter().zip(ins[1]).zip(gamma) {
                let h = gv * ga;
                mean_h += h;
                mean_hn += h * (xv - m) * r;
            }
            mean_h /= w as f32;
            mean_hn /= w as f32;
            for (((d, &xv), &gv), &ga) in dx.iter_mut().zip(ins[0]).zip(ins[1]).zip(gamma) {
                *d = r * (gv * ga - mean_h - (xv - m) * r * mean_hn);
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Largest difference between `a` and `b`, relative to `b`'s largest magnitude.
    fn relative(a: &Tensor, b: &Tensor) -> f32 {
        let scale = b
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        diff.to_scalar::<f32>().unwrap() / scale
    }

    /// Values and input gradients of `fast` and `slow` on `x`, weighted by a fixed random
    /// tensor so that every output element matters differently.
    fn check(x: &Var, extra: &[&Var], fast: &dyn Fn() -> Tensor, slow: &dyn Fn() -> Tensor) {
        let weights = Tensor::randn(0f32, 1., fast().shape(), &Device::Cpu).unwrap();
        let (yf, ys) = (fast(), slow());
        assert!(relative(&yf, &ys) < 1e-5, "values {}", relative(&yf, &ys));
        let gf = (yf * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gs = (ys * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in std::iter::once(x).chain(extra.iter().copied()) {
            let (a, b) = (
                gf.get(v.as_tensor()).unwrap(),
                gs.get(v.as_tensor()).unwrap(),
            );
            assert!(relative(a, b) < 1e-4, "gradient {}", relative(a, b));
        }
    }

    #[test]
    fn softmax_matches_candle_composed() {
        // Rows straddle the rayon task size; a -1e9 column checks masking.
        let x = Var::randn(0f32, 3., (3, 50, 17), &Device::Cpu).unwrap();
        let masked = (x.as_tensor().narrow(2, 0, 16).unwrap()).clone();
        let pad = Tensor::full(-1e9f32, (3, 50, 1), &Device::Cpu).unwrap();
        let input = || Tensor::cat(&[&masked, &pad], 2).unwrap();
        check(&x, &[], &|| softmax_last_dim(&input()).unwrap(), &|| {
            candle_nn::ops::softmax(&input(), D::Minus1).unwrap()
        });
        let y: Vec<f32> = softmax_last_dim(&input())
            .unwrap()
            .sum(2)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(y.iter().all(|s| (s - 1.0).abs() < 1e-6));
    }

    #[test]
    fn gelu_matches_candle() {
        let x = Var::randn(0f32, 2., (130, 40), &Device::Cpu).unwrap();
        check(&x, &[], &|| gelu_erf(x.as_tensor()).unwrap(), &|| {
            x.as_tensor().gelu_erf().unwrap()
        });
        // GELU(1) = Phi(1) = 0.841345.
        let one = Tensor::new(&[1f32], &Device::Cpu).unwrap();
        let v = gelu_erf(&one).unwrap().to_vec1::<f32>().unwrap()[0];
        assert!((v - 0.841_344_7).abs() < 1e-6, "{v}");
    }

    #[test]
    fn layer_norm_matches_candle_slow() {
        let x = Var::randn(0.5f32, 2., (2, 70, 24), &Device::Cpu).unwrap();
        let w = Var::randn(1f32, 0.2, 24, &Device::Cpu).unwrap();
        let b = Var::randn(0f32, 0.2, 24, &Device::Cpu).unwrap();
        let (xt, wt, bt) = (x.as_tensor(), w.as_tensor(), b.as_tensor());
        check(
            &x,
            &[&w, &b],
            &|| layer_norm(xt, wt, bt, 1e-12).unwrap(),
            &|| candle_nn::ops::layer_norm_slow(xt, wt, bt, 1e-12).unwrap(),
        );
    }
}
