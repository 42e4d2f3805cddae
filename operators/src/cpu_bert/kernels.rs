//! Element-wise and row-wise kernels of the CPU BERT forward pass: bias plus activation,
//! softmax's exponentials and row sums, bias plus layer norm, and the `erf` they need
//! (`exp` and the multiply-add are [`crate::vector_math`]'s).
//!
//! Every kernel is written once, as plain loops that LLVM vectorises, and compiled three
//! times (see [`crate::cpu_path`]): for the baseline target, and on x86-64 with AVX2 and
//! FMA, and with AVX-512; the caller passes the
//! [`SupportedPath`](crate::cpu_path::SupportedPath) whose copy runs. The
//! two x86 copies use fused multiply-adds (`F = true`), the generic copy does not, so
//! the generic copy may differ from the others in the last bits; the AVX2 and AVX-512
//! copies run the same operations in the same order and give the same bits.
//! Reductions keep [`LANES`] independent partial sums, combined in a fixed order, so a
//! row's result does not depend on anything but the row (and the path): the same input
//! gives the same bits.
//!
//! Accuracy, measured against f64 references in the tests below: the erf-based GELU within 4e-7 absolute per unit of |x| (its erfc comes from a
//! polynomial fitted for this file; see [`ERFC_POLY`]), with or without FMA.

use crate::vector_math::{exp, madd};

/// Partial sums per reduction, on every path: 16 f32 fill one AVX-512 register or two
/// AVX2 registers (two independent accumulator chains, which also hide the latency of
/// the adds). Every copy keeps the same 16 so that every path sums in the same order:
/// the AVX2 and AVX-512 copies then give the same bits.
pub const LANES: usize = 16;

/// `erfc(a) ~ t * P(t) * exp(-a^2)` with `t = 1 / (1 + ERFC_T_SCALE * a)`, for a >= 0.
/// `ERFC_POLY` holds P's coefficients, lowest degree first: a weighted least-squares fit
/// (iteratively reweighted towards minimax) of the absolute error over a in [0, 6],
/// written for this file; in f64 it is within 4e-8 of erfc, and evaluated in f32 within
/// 3e-7 (the f32 rounding dominates).
const ERFC_T_SCALE: f32 = 0.5;
const ERFC_POLY: [f32; 7] = [
    0.277_762_66,
    0.315_848_05,
    0.150_259_5,
    0.273_629_4,
    0.155_476_28,
    -0.235_458_56,
    0.062_482_696,
];

/// `sqrt(2 / pi)` and the cubic coefficient of the tanh approximation of GELU
/// (transformers' `gelu_new`).
const GELU_TANH_SCALE: f32 = 0.797_884_6;
const GELU_TANH_CUBIC: f32 = 0.044_715;

/// The exact GELU, `x * (1 + erf(x / sqrt 2)) / 2`, with `1 + erf(z)` computed as
/// `erfc(-z)` for negative z and `2 - erfc(z)` otherwise, so large negative inputs do
/// not lose their precision to cancellation.
#[inline(always)]
pub fn gelu_erf<const F: bool>(x: f32) -> f32 {
    let z = x * std::f32::consts::FRAC_1_SQRT_2;
    let a = z.abs();
    let t = 1.0 / madd::<F>(ERFC_T_SCALE, a, 1.0);
    let mut p = ERFC_POLY[ERFC_POLY.len() - 1];
    for c in ERFC_POLY.iter().rev().skip(1) {
        p = madd::<F>(p, t, *c);
    }
    let erfc_a = t * p * exp::<F>(-(a * a));
    let one_plus_erf = if z >= 0.0 { 2.0 - erfc_a } else { erfc_a };
    0.5 * x * one_plus_erf
}

/// `1 / sqrt(2 pi)`: the standard normal density at 0.
const INV_SQRT_2PI: f32 = 0.398_942_3;

/// The exact GELU and its derivative, `(gelu(x), Phi(x) + x phi(x))`, from one erfc
/// evaluation (as in [`gelu_erf`]): `Phi(x) = (1 + erf(x / sqrt 2)) / 2` and
/// `phi(x) = exp(-x^2 / 2) / sqrt(2 pi)`, the same `exp(-a^2)` erfc needs.
#[inline(always)]
pub fn gelu_erf_and_grad<const F: bool>(x: f32) -> (f32, f32) {
    let z = x * std::f32::consts::FRAC_1_SQRT_2;
    let a = z.abs();
    let t = 1.0 / madd::<F>(ERFC_T_SCALE, a, 1.0);
    let mut p = ERFC_POLY[ERFC_POLY.len() - 1];
    for c in ERFC_POLY.iter().rev().skip(1) {
        p = madd::<F>(p, t, *c);
    }
    let gauss = exp::<F>(-(a * a));
    let erfc_a = t * p * gauss;
    let one_plus_erf = if z >= 0.0 { 2.0 - erfc_a } else { erfc_a };
    let cdf = 0.5 * one_plus_erf;
    (x * cdf, madd::<F>(x * INV_SQRT_2PI, gauss, cdf))
}

/// GELU's tanh approximation and its derivative:
/// `d/dx [x (1 + tanh u) / 2] = (1 + tanh u) / 2 + x (1 - tanh^2 u) u' / 2`.
#[inline(always)]
pub fn gelu_tanh_and_grad<const F: bool>(x: f32) -> (f32, f32) {
    let u = GELU_TANH_SCALE * madd::<F>(GELU_TANH_CUBIC * x * x, x, x);
    let du = GELU_TANH_SCALE * madd::<F>(3.0 * GELU_TANH_CUBIC * x, x, 1.0);
    let tanh = 1.0 - 2.0 / (exp::<F>(2.0 * u) + 1.0);
    let half = 0.5 * (1.0 + tanh);
    (x * half, madd::<F>(0.5 * x * (1.0 - tanh * tanh), du, half))
}

/// GELU's tanh approximation, with `tanh(u) = 1 - 2 / (e^(2u) + 1)`.
#[inline(always)]
pub fn gelu_tanh<const F: bool>(x: f32) -> f32 {
    let u = GELU_TANH_SCALE * madd::<F>(GELU_TANH_CUBIC * x * x, x, x);
    let tanh = 1.0 - 2.0 / (exp::<F>(2.0 * u) + 1.0);
    0.5 * x * (1.0 + tanh)
}

/// Sum of `xs` in [`LANES`] partial sums, combined in a fixed order.
#[inline(always)]
pub(crate) fn lane_sum(xs: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a += *x;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Sum of `(x - mean)^2` over `xs`, in [`LANES`] partial sums.
#[inline(always)]
pub(crate) fn lane_sq_dev(xs: &[f32], mean: f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail: f32 = chunks
        .remainder()
        .iter()
        .map(|x| (x - mean) * (x - mean))
        .sum();
    for c in chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            let d = *x - mean;
            *a += d * d;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Largest element of `xs` (negative infinity when empty), in [`LANES`] partial maxima.
#[inline(always)]
pub(crate) fn lane_max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, x| if *x > m { *x } else { m });
    for c in chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a = if *x > *a { *x } else { *a };
        }
    }
    acc.iter().fold(tail, |m, x| if *x > m { *x } else { m })
}

/// The activation between BERT's intermediate and output layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// transformers' `gelu`: exact, erf-based.
    GeluErf,
    /// `gelu_new` / `gelu_pytorch_tanh`.
    GeluTanh,
    Relu,
}

impl Activation {
    /// The activation a config's `hidden_act` names, if supported.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "gelu" => Some(Self::GeluErf),
            "gelu_new" | "gelu_pytorch_tanh" => Some(Self::GeluTanh),
            "relu" => Some(Self::Relu),
            _ => None,
        }
    }
}

/// The portable definitions; the dispatching wrappers below pick a compiled copy.
mod portable {
    use super::*;

    #[inline(always)]
    pub fn bias_activation<const F: bool>(rows: &mut [f32], bias: &[f32], act: Activation) {
        for row in rows.chunks_exact_mut(bias.len()) {
            match act {
                Activation::GeluErf => {
                    for (x, b) in row.iter_mut().zip(bias) {
                        *x = gelu_erf::<F>(*x + *b);
                    }
                }
                Activation::GeluTanh => {
                    for (x, b) in row.iter_mut().zip(bias) {
                        *x = gelu_tanh::<F>(*x + *b);
                    }
                }
                Activation::Relu => {
                    for (x, b) in row.iter_mut().zip(bias) {
                        *x = (*x + *b).max(0.0);
                    }
                }
            }
        }
    }

    #[inline(always)]
    pub fn exp_rows<const F: bool>(rows: &mut [f32], width: usize, inv_sums: &mut [f32]) {
        for (row, inv) in rows.chunks_exact_mut(width).zip(inv_sums) {
            let max = lane_max(row);
            let mut acc = [0.0f32; LANES];
            let mut chunks = row.chunks_exact_mut(LANES);
            for c in chunks.by_ref() {
                for (a, x) in acc.iter_mut().zip(c) {
                    *x = exp::<F>(*x - max);
                    *a += *x;
                }
            }
            let mut tail = 0.0f32;
            for x in chunks.into_remainder() {
                *x = exp::<F>(*x - max);
                tail += *x;
            }
            *inv = 1.0 / (acc.iter().sum::<f32>() + tail);
        }
    }

    #[inline(always)]
    pub fn bias_layer_norm<const F: bool>(
        rows: &mut [f32],
        bias: &[f32],
        gamma: &[f32],
        beta: &[f32],
        eps: f32,
    ) {
        let width = bias.len();
        let inv_width = 1.0 / width as f32;
        for row in rows.chunks_exact_mut(width) {
            for (x, b) in row.iter_mut().zip(bias) {
                *x += *b;
            }
            let mean = lane_sum(row) * inv_width;
            let var = lane_sq_dev(row, mean) * inv_width;
            let rstd = 1.0 / (var + eps).sqrt();
            for ((x, g), b) in row.iter_mut().zip(gamma).zip(beta) {
                *x = (*x - mean) * rstd * *g + *b;
            }
        }
    }
}

/// Generates, for each named portable kernel, an AVX2 + FMA copy and an AVX-512 copy
/// (x86-64 only, both with fused multiply-adds), and a public wrapper that takes the
/// [`SupportedPath`](crate::cpu_path::SupportedPath) to run as its first argument: the
/// one dispatch point of the
/// kernel. The invoking module must hold a `portable` module with a `<const F: bool>`
/// definition of each named kernel (`F`: use fused multiply-adds).
macro_rules! dispatched {
    ($($(#[$doc:meta])* pub fn $name:ident($($arg:ident: $ty:ty),*);)*) => {
        #[cfg(target_arch = "x86_64")]
        mod avx512 {
            use super::*;
            $(
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                pub fn $name($($arg: $ty),*) {
                    portable::$name::<true>($($arg),*)
                }
            )*
        }

        #[cfg(target_arch = "x86_64")]
        mod avx2 {
            use super::*;
            $(
                #[target_feature(enable = "avx2,fma")]
                pub fn $name($($arg: $ty),*) {
                    portable::$name::<true>($($arg),*)
                }
            )*
        }

        $(
            $(#[$doc])*
            ///
            /// Runs the copy compiled for `path`.
            // The kernel's own arguments plus the path: one more than clippy's limit for
            // the layer norm that keeps its statistics.
            #[allow(clippy::too_many_arguments)]
            pub fn $name(path: $crate::cpu_path::SupportedPath, $($arg: $ty),*) {
                match path.path() {
                    #[cfg(target_arch = "x86_64")]
                    $crate::cpu_path::CpuPath::Avx512 => {
                        // SAFETY: a SupportedPath holds Avx512 only when CpuPath::check
                        // detected avx512f, avx512vl, avx2 and fma on this CPU: every
                        // feature this copy is compiled with.
                        unsafe { avx512::$name($($arg),*) }
                    }
                    #[cfg(target_arch = "x86_64")]
                    $crate::cpu_path::CpuPath::Avx2 => {
                        // SAFETY: a SupportedPath holds Avx2 only when CpuPath::check
                        // detected avx2 and fma on this CPU: every feature this copy is
                        // compiled with.
                        unsafe { avx2::$name($($arg),*) }
                    }
                    _ => portable::$name::<false>($($arg),*),
                }
            }
        )*
    };
}
pub(crate) use dispatched;

dispatched! {
    /// Adds `bias` to each row of `rows` (rows of `bias.len()` floats) and applies `act`.
    pub fn bias_activation(rows: &mut [f32], bias: &[f32], act: Activation);
    /// Softmax of each row of `rows` (rows of `width` floats) but for the division:
    /// `exp(x - row max)` in place, and `1 / sum` of each row into `inv_sums`.
    pub fn exp_rows(rows: &mut [f32], width: usize, inv_sums: &mut [f32]);
    /// Adds `bias` to each row, then layer-normalises it with `gamma`, `beta` and `eps`.
    pub fn bias_layer_norm(rows: &mut [f32], bias: &[f32], gamma: &[f32], beta: &[f32], eps: f32);
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::cpu_path::{CpuPath, SupportedPath};

    /// erf in f64: its Taylor series for |z| <= 3 (terms alternate and shrink fast
    /// enough there), erfc's continued fraction beyond.
    fn erf_f64(z: f64) -> f64 {
        let a = z.abs();
        let v = if a <= 3.0 {
            let mut term = a;
            let mut sum = a;
            let mut n = 0.0;
            while term.abs() > 1e-17 * sum.abs() {
                n += 1.0;
                term *= -a * a / n;
                sum += term / (2.0 * n + 1.0);
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            // erfc(a) = exp(-a^2)/sqrt(pi) * 1/(a + 1/2/(a + 1/(a + 3/2/(a + ...)))).
            let mut frac = a;
            for k in (1..60).rev() {
                frac = a + (k as f64 / 2.0) / frac;
            }
            1.0 - (-a * a).exp() / std::f64::consts::PI.sqrt() / frac
        };
        v.copysign(z)
    }

    /// GELU(1) = Phi(1) and GELU(-1) = -Phi(-1), Phi the standard normal CDF.
    const GELU_1: f64 = 0.841_344_746_068_542_9;
    const GELU_MINUS_1: f64 = -0.158_655_253_931_457_05;

    #[test]
    fn erf_reference_matches_known_values() {
        // erf(0.5) = 0.5204998778..., erf(1) = 0.8427007929..., erf(3.5) = 0.9999992569...
        assert!((erf_f64(0.5) - 0.520_499_877_813_046_5).abs() < 1e-15);
        assert!((erf_f64(1.0) - 0.842_700_792_949_714_9).abs() < 1e-15);
        assert!((erf_f64(3.5) - 0.999_999_256_901_627_7).abs() < 1e-15);
    }

    fn check_gelu_erf<const F: bool>() {
        let mut worst: f64 = 0.0;
        for i in 0..=400_000 {
            let x = -20.0 + 40.0 * i as f64 / 400_000.0;
            let want = x * 0.5 * (1.0 + erf_f64(x / std::f64::consts::SQRT_2));
            let got = gelu_erf::<F>(x as f32) as f64;
            worst = worst.max((got - want).abs() / x.abs().max(1.0));
        }
        assert!(worst < 4e-7, "fma {F}: worst {worst}");
        assert!((gelu_erf::<F>(1.0) as f64 - GELU_1).abs() < 2e-7);
        assert!((gelu_erf::<F>(-1.0) as f64 - GELU_MINUS_1).abs() < 2e-7);
    }

    #[test]
    fn gelu_erf_matches_f64_within_4e_7_per_unit() {
        check_gelu_erf::<false>();
        check_gelu_erf::<true>();
    }

    #[test]
    fn gelu_tanh_matches_its_definition() {
        for i in 0..=2000 {
            let x = -10.0 + 20.0 * i as f64 / 2000.0;
            let u = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x);
            let want = 0.5 * x * (1.0 + u.tanh());
            for got in [gelu_tanh::<false>(x as f32), gelu_tanh::<true>(x as f32)] {
                assert!((got as f64 - want).abs() < 1e-6 * x.abs().max(1.0));
            }
        }
    }

    #[test]
    fn exp_rows_give_softmax_after_scaling() {
        for path in SupportedPath::all_supported() {
            check_exp_rows(path);
        }
    }

    fn check_exp_rows(path: SupportedPath) {
        // Width 19: one full lane group and a tail of 3.
        let mut rows: Vec<f32> = (0..38).map(|i| (i % 19) as f32 * 0.5 - 3.0).collect();
        rows[19] = 1000.0; // a huge logit must not overflow: max subtraction
        let mut inv = [0.0; 2];
        exp_rows(path, &mut rows, 19, &mut inv);
        for (row, inv) in rows.chunks(19).zip(inv) {
            let sum: f32 = row.iter().map(|x| x * inv).sum();
            assert!((sum - 1.0).abs() < 1e-6);
        }
        // Row 0: the max is the last element (6.0), so p[18] = e^0 and p[i+1] / p[i] =
        // e^0.5; row 1's huge logit alone survives.
        assert_eq!(rows[18], 1.0);
        assert!((rows[1] / rows[0] - 0.5f32.exp()).abs() < 1e-5);
        assert_eq!(rows[19], 1.0);
        assert_eq!(inv[1], 1.0);
    }

    #[test]
    fn bias_layer_norm_by_hand() {
        // Row [1, 2, 3, 4] + bias [1, 0, 0, -1] = [2, 2, 3, 3]: mean 2.5, variance 0.25,
        // so normalised [-1, -1, 1, 1]; gamma 2 and beta 1 give [-1, -1, 3, 3].
        for path in SupportedPath::all_supported() {
            let mut row = vec![1.0, 2.0, 3.0, 4.0];
            bias_layer_norm(
                path,
                &mut row,
                &[1.0, 0.0, 0.0, -1.0],
                &[2.0; 4],
                &[1.0; 4],
                0.0,
            );
            for (got, want) in row.iter().zip([-1.0, -1.0, 3.0, 3.0]) {
                assert!((got - want).abs() < 1e-6, "{path:?}: {row:?}");
            }
        }
    }

    #[test]
    fn bias_activation_relu_and_gelu() {
        for path in SupportedPath::all_supported() {
            let mut rows = vec![-1.0, 0.5, 2.0, -3.0];
            bias_activation(path, &mut rows, &[0.5, 0.5], Activation::Relu);
            assert_eq!(rows, vec![0.0, 1.0, 2.5, 0.0]);
            let mut rows = vec![0.0, 1.0];
            bias_activation(path, &mut rows, &[1.0, -2.0], Activation::GeluErf);
            assert!((rows[0] as f64 - GELU_1).abs() < 2e-7);
            assert!((rows[1] as f64 - GELU_MINUS_1).abs() < 2e-7);
        }
    }

    /// Inputs over [-6, 6) with every residue of a 101-step walk: both signs, GELU's
    /// tails and its middle.
    fn inputs(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 37) % 101) as f32 * 12.0 / 101.0 - 6.0)
            .collect()
    }

    #[test]
    fn each_path_runs_the_portable_code_bit_for_bit() {
        // The dispatch runs the copy of the path it is given: the portable code with
        // fused multiply-adds exactly when the path is not the generic one.
        let input = inputs(300);
        let bias: Vec<f32> = (0..30).map(|i| i as f32 * 0.01).collect();
        for path in SupportedPath::all_supported() {
            let fma = path.path() != CpuPath::Generic;
            let mut a = input.clone();
            let mut b = input.clone();
            bias_activation(path, &mut a, &bias, Activation::GeluErf);
            if fma {
                portable::bias_activation::<true>(&mut b, &bias, Activation::GeluErf);
            } else {
                portable::bias_activation::<false>(&mut b, &bias, Activation::GeluErf);
            }
            assert_eq!(a, b, "{path:?}");
            let (mut a, mut b) = (input.clone(), input.clone());
            let (mut ia, mut ib) = ([0.0; 10], [0.0; 10]);
            exp_rows(path, &mut a, 30, &mut ia);
            if fma {
                portable::exp_rows::<true>(&mut b, 30, &mut ib);
            } else {
                portable::exp_rows::<false>(&mut b, 30, &mut ib);
            }
            assert_eq!((a, ia), (b, ib), "{path:?}");
        }
    }

    /// `|got - want| <= tol * max(1, |x|)` for every element, `x` the kernel's input.
    pub(crate) fn assert_close(what: &str, got: &[f32], want: &[f32], xs: &[f32], tol: f32) {
        assert_eq!(got.len(), want.len());
        for (i, ((g, w), x)) in got.iter().zip(want).zip(xs).enumerate() {
            let bound = tol * x.abs().max(1.0);
            assert!(
                (g - w).abs() <= bound,
                "{what}[{i}] (x = {x}): {g} vs generic {w}, bound {bound}"
            );
        }
    }

    /// Every path this CPU runs against the generic path, kernel by kernel. Tolerances:
    /// - GELU (erf): each copy is within 4e-7 per unit of |x| of the exact value (tested
    ///   above with and without FMA), so two copies are within 8e-7; 1e-6 per unit.
    /// - GELU (tanh): each within 1e-6 per unit of its definition (tested above), so
    ///   2e-6 per unit between copies.
    /// - ReLU and layer norm: exact. Neither uses a multiply-add (and Rust never fuses
    ///   `a * b + c` on its own), so every copy runs the same IEEE operations in the same
    ///   order; only the instructions differ.
    /// - `exp_rows`: each exponential within 2 ulp of exact (tested above), so copies
    ///   differ by at most 4 ulp, 4.8e-7 relative to the value; the row sums of positive
    ///   terms keep that relative bound plus the sum's own roundings, which are the same
    ///   operations on both sides: 1e-6 relative for both (values here are at most 1).
    /// - AVX2 against AVX-512: the same operations in the same order: exact.
    #[test]
    fn every_path_matches_the_generic_path() {
        let width = 77; // four lane groups and a tail of 13
        let input = inputs(width * 9);
        let bias: Vec<f32> = (0..width).map(|i| (i as f32 * 0.7).sin() * 0.5).collect();
        let gamma: Vec<f32> = (0..width).map(|i| 1.0 + (i as f32 * 0.3).cos()).collect();
        let beta: Vec<f32> = (0..width).map(|i| (i as f32 * 0.2).sin()).collect();
        let biased: Vec<f32> = input
            .chunks(width)
            .flat_map(|r| r.iter().zip(&bias).map(|(x, b)| x + b))
            .collect();
        let run = |path: SupportedPath| {
            let mut acts = Vec::new();
            for act in [Activation::GeluErf, Activation::GeluTanh, Activation::Relu] {
                let mut rows = input.clone();
                bias_activation(path, &mut rows, &bias, act);
                acts.push(rows);
            }
            let mut exps = input.clone();
            let mut inv = vec![0.0; 9];
            exp_rows(path, &mut exps, width, &mut inv);
            let mut normed = input.clone();
            bias_layer_norm(path, &mut normed, &bias, &gamma, &beta, 1e-12);
            (acts, exps, inv, normed)
        };
        let generic = run(SupportedPath::GENERIC);
        let mut by_path = Vec::new();
        for path in SupportedPath::all_supported() {
            let got = run(path);
            let (acts, exps, inv, normed) = &got;
            let name = path.path().name();
            assert_close(name, &acts[0], &generic.0[0], &biased, 1e-6);
            assert_close(name, &acts[1], &generic.0[1], &biased, 2e-6);
            assert_eq!(acts[2], generic.0[2], "{name}: relu");
            for (g, w) in exps.iter().zip(&generic.1) {
                assert!((g - w).abs() <= 1e-6 * w.abs(), "{name}: exp {g} vs {w}");
            }
            for (g, w) in inv.iter().zip(&generic.2) {
                assert!((g - w).abs() <= 1e-6 * w.abs(), "{name}: 1/sum {g} vs {w}");
            }
            assert_eq!(*normed, generic.3, "{name}: layer norm");
            by_path.push((path.path(), got));
        }
        let avx2 = by_path.iter().find(|(p, _)| *p == CpuPath::Avx2);
        let avx512 = by_path.iter().find(|(p, _)| *p == CpuPath::Avx512);
        if let (Some((_, a)), Some((_, b))) = (avx2, avx512) {
            assert!(a == b, "the AVX2 and AVX-512 copies differ");
        }
    }
}
