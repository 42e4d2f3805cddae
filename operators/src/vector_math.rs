//! Scalar arithmetic that the hand-written CPU kernels share (the BERT kernels, the
//! student's training pass, the LLM's attention), written branch-free so that loops
//! calling it vectorise: a multiply-add fused or not by the kernel's copy (`F`, see
//! [`crate::cpu_path`]), and `exp` within 2 ulp (measured against f64 in the tests).

/// `ln 2` split so that `n * LN2_HI` is exact for the `n` that `exp` uses (|n| < 2^9):
/// the high part has 9 trailing zero bits.
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
/// Adding 1.5 * 2^23 to a float below 2^22 in magnitude rounds it to an integer held in
/// the low mantissa bits: round-to-nearest without a conversion instruction.
const ROUND_MAGIC: f32 = 12_582_912.0;
/// `exp` saturates outside this range: below, the result is subnormal (softmax weights
/// and erfc tails that small are zero for every purpose here); above, f32 overflows.
const EXP_MIN: f32 = -87.0;
const EXP_MAX: f32 = 88.0;

/// `a * b + c`, as one fused multiply-add in copies compiled with FMA (`F`), as two
/// roundings otherwise. Either way the result depends on nothing but the operands.
#[inline(always)]
pub(crate) fn madd<const F: bool>(a: f32, b: f32, c: f32) -> f32 {
    if F {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `e^x`, within 2 ulp for x in [EXP_MIN, EXP_MAX], saturating outside. Branch-free so
/// that loops calling it vectorise.
#[inline(always)]
pub fn exp<const F: bool>(x: f32) -> f32 {
    let x = x.clamp(EXP_MIN, EXP_MAX);
    // x = n ln2 + r, |r| <= ln2 / 2, then e^x = 2^n e^r.
    let k = madd::<F>(x, std::f32::consts::LOG2_E, ROUND_MAGIC);
    let n = k - ROUND_MAGIC;
    let n_int = (k.to_bits() as i32).wrapping_sub(ROUND_MAGIC.to_bits() as i32);
    let r = madd::<F>(-n, LN2_LO, madd::<F>(-n, LN2_HI, x));
    // Taylor series of e^r to degree 7: the remainder is below 6e-9 for |r| <= ln2 / 2.
    let mut p = 1.0 / 5040.0;
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = madd::<F>(p, r, c);
    }
    let scale = f32::from_bits(((n_int + 127) as u32) << 23);
    p * scale
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    fn check_exp<const F: bool>() {
        let mut worst = 0;
        for i in 0..=200_000 {
            let x = EXP_MIN + (EXP_MAX - EXP_MIN) * i as f32 / 200_000.0;
            let want = (x as f64).exp() as f32;
            worst = worst.max(ulps(exp::<F>(x), want));
        }
        assert!(worst <= 2, "fma {F}: worst {worst} ulp");
        assert_eq!(exp::<F>(0.0), 1.0);
        // Saturation: no infinities, no NaN from the bit tricks.
        assert!(exp::<F>(1000.0).is_finite() && exp::<F>(-1000.0) >= 0.0);
    }

    #[test]
    fn exp_is_within_two_ulp_of_f64() {
        check_exp::<false>();
        check_exp::<true>();
    }
}
