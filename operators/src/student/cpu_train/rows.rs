//! Row kernels of the training pass that keep what backward needs: bias plus activation
//! keeping the pre-activation, bias plus layer norm keeping the normalised rows and their
//! reciprocal standard deviations, and the backward of both.
//!
//! Like [`crate::cpu_bert::kernels`], each kernel is plain loops compiled once per CPU
//! path (generic; AVX2 with FMA; AVX-512 with FMA: [`crate::cpu_path`]), the caller
//! passing the path to run, and a row's result depends on that row (and the path) alone. The `par_*` wrappers spread rows over rayon in fixed blocks of
//! [`ROWS_PER_TASK`]; since rows are independent, the result does not depend on the
//! thread count. Column sums (parameter gradients of biases and layer norms) run in one
//! fixed order for the same reason.

use rayon::prelude::*;

use crate::cpu_bert::kernels::{
    dispatched, gelu_erf_and_grad, gelu_tanh_and_grad, lane_sq_dev, lane_sum, Activation,
};
use crate::cpu_path::SupportedPath;

/// Rows handed to one rayon task: 64 rows of 384-1536 floats are enough work per task
/// that scheduling costs nothing next to it.
pub const ROWS_PER_TASK: usize = 64;

mod portable {
    use super::*;

    #[inline(always)]
    pub fn bias_activation_keep<const F: bool>(
        pre: &mut [f32],
        post: &mut [f32],
        bias: &[f32],
        act: Activation,
    ) {
        for (p_row, o_row) in pre
            .chunks_exact_mut(bias.len())
            .zip(post.chunks_exact_mut(bias.len()))
        {
            for ((p, o), b) in p_row.iter_mut().zip(o_row.iter_mut()).zip(bias) {
                *p += *b;
                *o = match act {
                    Activation::GeluErf => gelu_erf_and_grad::<F>(*p).0,
                    Activation::GeluTanh => gelu_tanh_and_grad::<F>(*p).0,
                    Activation::Relu => p.max(0.0),
                };
            }
        }
    }

    #[inline(always)]
    pub fn activation_backward<const F: bool>(grad: &mut [f32], pre: &[f32], act: Activation) {
        for (g, x) in grad.iter_mut().zip(pre) {
            let d = match act {
                Activation::GeluErf => gelu_erf_and_grad::<F>(*x).1,
                Activation::GeluTanh => gelu_tanh_and_grad::<F>(*x).1,
                Activation::Relu => {
                    if *x > 0.0 {
                        1.0
                    } else {
                        0.0
                    }
                }
            };
            *g *= d;
        }
    }

    #[inline(always)]
    pub fn layer_norm_keep<const F: bool>(
        rows: &mut [f32],
        xhat: &mut [f32],
        rstd: &mut [f32],
        bias: &[f32],
        gamma: &[f32],
        beta: &[f32],
        eps: f32,
    ) {
        let width = gamma.len();
        let inv_width = 1.0 / width as f32;
        for ((row, xh), rs) in rows
            .chunks_exact_mut(width)
            .zip(xhat.chunks_exact_mut(width))
            .zip(rstd.iter_mut())
        {
            for (x, b) in row.iter_mut().zip(bias) {
                *x += *b;
            }
            let mean = lane_sum(row) * inv_width;
            let var = lane_sq_dev(row, mean) * inv_width;
            let r = 1.0 / (var + eps).sqrt();
            *rs = r;
            for (((x, h), g), b) in row.iter_mut().zip(xh.iter_mut()).zip(gamma).zip(beta) {
                *h = (*x - mean) * r;
                *x = *h * *g + *b;
            }
        }
    }

    #[inline(always)]
    pub fn layer_norm_backward<const F: bool>(
        grad: &mut [f32],
        xhat: &[f32],
        rstd: &[f32],
        gamma: &[f32],
    ) {
        let width = gamma.len();
        let inv_width = 1.0 / width as f32;
        for ((g_row, xh), r) in grad
            .chunks_exact_mut(width)
            .zip(xhat.chunks_exact(width))
            .zip(rstd)
        {
            // With gy = dy * gamma: dx = rstd * (gy - mean(gy) - xhat * mean(gy * xhat)).
            for (g, w) in g_row.iter_mut().zip(gamma) {
                *g *= *w;
            }
            let mean_gy = lane_sum(g_row) * inv_width;
            let mut acc = [0.0f32; crate::cpu_bert::kernels::LANES];
            let chunks = g_row
                .chunks_exact(acc.len())
                .zip(xh.chunks_exact(acc.len()));
            let tail: f32 = g_row
                .chunks_exact(acc.len())
                .remainder()
                .iter()
                .zip(xh.chunks_exact(acc.len()).remainder())
                .map(|(g, x)| g * x)
                .sum();
            for (gc, xc) in chunks {
                for ((a, g), x) in acc.iter_mut().zip(gc).zip(xc) {
                    *a += g * x;
                }
            }
            let mean_gyx = (acc.iter().sum::<f32>() + tail) * inv_width;
            for (g, x) in g_row.iter_mut().zip(xh) {
                *g = *r * (*g - mean_gy - *x * mean_gyx);
            }
        }
    }
}

dispatched! {
    /// `pre += bias` row by row (rows of `bias.len()` floats), then `post = act(pre)`.
    pub fn bias_activation_keep(pre: &mut [f32], post: &mut [f32], bias: &[f32], act: Activation);
    /// `grad *= act'(pre)`, element by element.
    pub fn activation_backward(grad: &mut [f32], pre: &[f32], act: Activation);
    /// Adds `bias` to each row, layer-normalises it with `gamma`, `beta` and `eps`, and
    /// keeps the normalised row (before `gamma` and `beta`) in `xhat` and `1 / std` in
    /// `rstd`.
    pub fn layer_norm_keep(rows: &mut [f32], xhat: &mut [f32], rstd: &mut [f32], bias: &[f32], gamma: &[f32], beta: &[f32], eps: f32);
    /// Turns the gradient of each row's layer-norm output into the gradient of its input.
    pub fn layer_norm_backward(grad: &mut [f32], xhat: &[f32], rstd: &[f32], gamma: &[f32]);
}

/// [`bias_activation_keep`] over rows in parallel.
pub fn par_bias_activation_keep(
    path: SupportedPath,
    pre: &mut [f32],
    post: &mut [f32],
    bias: &[f32],
    act: Activation,
) {
    let block = bias.len() * ROWS_PER_TASK;
    pre.par_chunks_mut(block)
        .zip(post.par_chunks_mut(block))
        .for_each(|(p, o)| bias_activation_keep(path, p, o, bias, act));
}

/// [`activation_backward`] over rows of `width` in parallel.
pub fn par_activation_backward(
    path: SupportedPath,
    grad: &mut [f32],
    pre: &[f32],
    width: usize,
    act: Activation,
) {
    let block = width * ROWS_PER_TASK;
    grad.par_chunks_mut(block)
        .zip(pre.par_chunks(block))
        .for_each(|(g, p)| activation_backward(path, g, p, act));
}

/// The normalisation parameters of one layer norm.
#[derive(Clone, Copy)]
pub struct Norm<'a> {
    pub gamma: &'a [f32],
    pub beta: &'a [f32],
    pub eps: f32,
}

/// [`layer_norm_keep`] over rows in parallel.
pub fn par_layer_norm_keep(
    path: SupportedPath,
    rows: &mut [f32],
    xhat: &mut [f32],
    rstd: &mut [f32],
    bias: &[f32],
    norm: Norm<'_>,
) {
    let width = norm.gamma.len();
    let block = width * ROWS_PER_TASK;
    rows.par_chunks_mut(block)
        .zip(xhat.par_chunks_mut(block))
        .zip(rstd.par_chunks_mut(ROWS_PER_TASK))
        .for_each(|((r, x), s)| {
            layer_norm_keep(path, r, x, s, bias, norm.gamma, norm.beta, norm.eps)
        });
}

/// Layer-norm backward: adds the gradients of `gamma` (`sum dy * xhat`) and `beta`
/// (`sum dy`) over all rows to `d_gamma` and `d_beta`, then turns `grad` (dy) into the
/// gradient of the layer norm's input, rows in parallel.
pub fn par_layer_norm_backward(
    path: SupportedPath,
    grad: &mut [f32],
    xhat: &[f32],
    rstd: &[f32],
    gamma: &[f32],
    d_gamma: &mut [f32],
    d_beta: &mut [f32],
) {
    let width = gamma.len();
    for (g_row, x_row) in grad.chunks_exact(width).zip(xhat.chunks_exact(width)) {
        for (((dg, db), g), x) in d_gamma
            .iter_mut()
            .zip(d_beta.iter_mut())
            .zip(g_row)
            .zip(x_row)
        {
            *dg += g * x;
            *db += g;
        }
    }
    let block = width * ROWS_PER_TASK;
    grad.par_chunks_mut(block)
        .zip(xhat.par_chunks(block))
        .zip(rstd.par_chunks(ROWS_PER_TASK))
        .for_each(|((g, x), r)| layer_norm_backward(path, g, x, r, gamma));
}

/// Adds the column sums of `rows` (rows of `acc.len()` floats) to `acc`, rows in order.
pub fn add_column_sums(acc: &mut [f32], rows: &[f32]) {
    for row in rows.chunks_exact(acc.len()) {
        for (a, x) in acc.iter_mut().zip(row) {
            *a += x;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu_bert::kernels::tests::assert_close;
    use crate::cpu_path::CpuPath;

    /// Central difference of `f` at `x`, in f64.
    fn numeric(f: impl Fn(f64) -> f64, x: f64) -> f64 {
        let h = 1e-5;
        (f(x + h) - f(x - h)) / (2.0 * h)
    }

    fn erf(z: f64) -> f64 {
        // Abramowitz-Stegun 7.1.26 is too coarse for a derivative check; integrate
        // exp(-t^2) by Simpson's rule instead (2,000 panels: error far below 1e-9 here).
        let n = 2000;
        let h = z / n as f64;
        let f = |t: f64| (-t * t).exp();
        let mut s = f(0.0) + f(z);
        for i in 1..n {
            s += f(i as f64 * h) * if i % 2 == 1 { 4.0 } else { 2.0 };
        }
        s * h / 3.0 * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn gelu_derivatives_match_central_differences() {
        let gelu = |x: f64| 0.5 * x * (1.0 + erf(x / 2f64.sqrt()));
        let tanh_gelu = |x: f64| {
            0.5 * x
                * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())
        };
        for path in SupportedPath::all_supported() {
            check_gelu_derivatives(path, &gelu, &tanh_gelu);
        }
    }

    fn check_gelu_derivatives(
        path: SupportedPath,
        gelu: &dyn Fn(f64) -> f64,
        tanh_gelu: &dyn Fn(f64) -> f64,
    ) {
        for x in [-6.0f32, -2.5, -1.0, -0.3, 0.0, 0.2, 0.9, 1.7, 4.0] {
            let mut pre = [x];
            let mut post = [0.0];
            bias_activation_keep(path, &mut pre, &mut post, &[0.0], Activation::GeluErf);
            assert!((post[0] as f64 - gelu(x as f64)).abs() < 2e-6, "gelu({x})");
            let mut g = [1.0f32];
            activation_backward(path, &mut g, &[x], Activation::GeluErf);
            let want = numeric(gelu, x as f64);
            assert!(
                (g[0] as f64 - want).abs() < 2e-6,
                "gelu'({x}) = {} want {want}",
                g[0]
            );
            let mut g = [1.0f32];
            activation_backward(path, &mut g, &[x], Activation::GeluTanh);
            let want = numeric(tanh_gelu, x as f64);
            assert!(
                (g[0] as f64 - want).abs() < 2e-6,
                "tanh gelu'({x}) = {} want {want}",
                g[0]
            );
        }
        let mut g = [2.0f32, 2.0];
        activation_backward(path, &mut g, &[-1.0, 3.0], Activation::Relu);
        assert_eq!(g, [0.0, 2.0]);
    }

    #[test]
    fn layer_norm_by_hand_and_its_backward_by_differences() {
        for path in SupportedPath::all_supported() {
            check_layer_norm(path);
        }
    }

    fn check_layer_norm(path: SupportedPath) {
        // Row [1, 2, 3, 6] + bias 0: mean 3, variance (4 + 1 + 0 + 9) / 4 = 3.5.
        let gamma = [1.0f32, 2.0, 0.5, -1.0];
        let beta = [0.0f32, 1.0, 0.0, 0.5];
        let norm = Norm {
            gamma: &gamma,
            beta: &beta,
            eps: 0.0,
        };
        let x0 = [1.0f32, 2.0, 3.0, 6.0];
        let mut rows = x0;
        let mut xhat = [0.0f32; 4];
        let mut rstd = [0.0f32; 1];
        par_layer_norm_keep(path, &mut rows, &mut xhat, &mut rstd, &[0.0; 4], norm);
        let s = 3.5f32.sqrt();
        let want_xhat = [-2.0 / s, -1.0 / s, 0.0, 3.0 / s];
        for (a, b) in xhat.iter().zip(want_xhat) {
            assert!((a - b).abs() < 1e-6);
        }
        assert!((rstd[0] - 1.0 / s).abs() < 1e-6);
        assert!((rows[1] - (-2.0 / s + 1.0)).abs() < 1e-6);

        // Backward of L = sum(w * y) against central differences of L in f64.
        let w = [0.3f64, -1.2, 0.7, 2.0];
        let loss = |x: &[f64; 4]| {
            let m = x.iter().sum::<f64>() / 4.0;
            let v = x.iter().map(|a| (a - m) * (a - m)).sum::<f64>() / 4.0;
            (0..4)
                .map(|i| w[i] * ((x[i] - m) / v.sqrt() * gamma[i] as f64 + beta[i] as f64))
                .sum::<f64>()
        };
        let mut grad: Vec<f32> = w.iter().map(|&v| v as f32).collect();
        let mut dg = [0.0f32; 4];
        let mut db = [0.0f32; 4];
        par_layer_norm_backward(path, &mut grad, &xhat, &rstd, &gamma, &mut dg, &mut db);
        for i in 0..4 {
            let f = |t: f64| {
                let mut x: [f64; 4] = x0.map(f64::from);
                x[i] = t;
                loss(&x)
            };
            let want = numeric(f, x0[i] as f64);
            assert!(
                (grad[i] as f64 - want).abs() < 1e-5,
                "dx[{i}] {} vs {want}",
                grad[i]
            );
            assert!((dg[i] as f64 - w[i] * want_xhat[i] as f64).abs() < 1e-6);
            assert!((db[i] as f64 - w[i]).abs() < 1e-7);
        }
    }

    #[test]
    fn column_sums() {
        let mut acc = [1.0f32, 0.0];
        add_column_sums(&mut acc, &[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(acc, [5.0, 6.0]);
    }

    /// Every path this CPU runs against the generic path, kernel by kernel. Tolerances:
    /// - GELU values: as in `cpu_bert::kernels` (each copy within 4e-7 (erf) or 1e-6
    ///   (tanh) per unit of |x| of the exact value): 1e-6 and 2e-6 per unit.
    /// - GELU derivatives: `Phi(x) + x phi(x)` from the same erfc and exp, one more
    ///   multiply-add (fused or not): each term within 4e-7 per unit of |x|, so 2e-6 per
    ///   unit between copies; gradients of 1 make that the bound on `grad`.
    /// - ReLU, layer norm forward and backward: exact. None of them uses a multiply-add
    ///   (and Rust never fuses `a * b + c` on its own), so every copy runs the same IEEE
    ///   operations in the same order.
    /// - AVX2 against AVX-512: the same operations in the same order: exact.
    #[test]
    fn every_path_matches_the_generic_path() {
        let width = 45; // two lane groups and a tail of 13
        let rows = 7;
        let xs: Vec<f32> = (0..width * rows)
            .map(|i| ((i * 37) % 101) as f32 * 12.0 / 101.0 - 6.0)
            .collect();
        let bias: Vec<f32> = (0..width).map(|i| (i as f32 * 0.7).sin() * 0.5).collect();
        let gamma: Vec<f32> = (0..width).map(|i| 1.0 + (i as f32 * 0.3).cos()).collect();
        let beta: Vec<f32> = (0..width).map(|i| (i as f32 * 0.2).sin()).collect();
        let dy: Vec<f32> = (0..width * rows).map(|i| (i as f32 * 0.11).cos()).collect();
        let biased: Vec<f32> = xs
            .chunks(width)
            .flat_map(|r| r.iter().zip(&bias).map(|(x, b)| x + b))
            .collect();
        let run = |path: SupportedPath| {
            let mut out = Vec::new();
            for act in [Activation::GeluErf, Activation::GeluTanh, Activation::Relu] {
                let mut pre = xs.clone();
                let mut post = vec![0.0; xs.len()];
                par_bias_activation_keep(path, &mut pre, &mut post, &bias, act);
                let mut grad = vec![1.0; xs.len()];
                par_activation_backward(path, &mut grad, &pre, width, act);
                out.push((post, grad));
            }
            let mut normed = xs.clone();
            let mut xhat = vec![0.0; xs.len()];
            let mut rstd = vec![0.0; rows];
            let norm = Norm {
                gamma: &gamma,
                beta: &beta,
                eps: 1e-12,
            };
            par_layer_norm_keep(path, &mut normed, &mut xhat, &mut rstd, &bias, norm);
            let mut grad = dy.clone();
            let (mut dg, mut db) = (vec![0.0; width], vec![0.0; width]);
            par_layer_norm_backward(path, &mut grad, &xhat, &rstd, &gamma, &mut dg, &mut db);
            (out, (normed, xhat, rstd, grad, dg, db))
        };
        let generic = run(SupportedPath::GENERIC);
        let mut by_path = Vec::new();
        for path in SupportedPath::all_supported() {
            let got = run(path);
            let name = path.path().name();
            let tols = [(1e-6, 2e-6), (2e-6, 2e-6)];
            for (act, (tol_value, tol_grad)) in tols.into_iter().enumerate() {
                let ((post, grad), (want_post, want_grad)) = (&got.0[act], &generic.0[act]);
                assert_close(name, post, want_post, &biased, tol_value);
                assert_close(name, grad, want_grad, &biased, tol_grad);
            }
            assert_eq!(got.0[2], generic.0[2], "{name}: relu");
            assert!(got.1 == generic.1, "{name}: layer norm");
            by_path.push((path.path(), got));
        }
        let avx2 = by_path.iter().find(|(p, _)| *p == CpuPath::Avx2);
        let avx512 = by_path.iter().find(|(p, _)| *p == CpuPath::Avx512);
        if let (Some((_, a)), Some((_, b))) = (avx2, avx512) {
            assert!(a == b, "the AVX2 and AVX-512 copies differ");
        }
    }
}
