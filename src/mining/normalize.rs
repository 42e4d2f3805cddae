//! Percentiles and the percentile-based score scale.
//!
//! **Percentile** (numpy's default, `method='linear'`): for `n` values sorted ascending
//! `x[0] <= .. <= x[n-1]` and `q` in `[0, 100]`, the virtual index is
//! `h = (q / 100) * (n - 1)`; with `i = floor(h)` and `t = h - i`, the percentile is
//! `x[i] + t * (x[i+1] - x[i])` (just `x[n-1]` when `i = n - 1`). numpy evaluates that
//! interpolation as `x[i+1] - (1 - t) * (x[i+1] - x[i])` when `t >= 0.5`; so do we, so
//! the results agree with numpy's bit for bit. Example: the 25th percentile of
//! `[1, 2, 3, 4]` has `h = 0.75`, so `1 + 0.75 * (2 - 1) = 1.75`.
//!
//! **Scale** ([`ScoreScale`]): `low` and `high` are two percentiles of a set of scores;
//! [`ScoreScale::normalized`] is `clip((s - low) / (high - low), 0, 1)`.

/// The `q`-th percentile (`q` in `[0, 100]`) of `values`, in any order, as defined in the
/// module docs. `None` when `values` is empty or `q` is outside `[0, 100]` (or NaN).
/// Values must be finite (NaN would sort last and count as the largest).
pub fn percentile(values: &[f64], q: f64) -> Option<f64> {
    percentile_in_place(&mut values.to_vec(), q)
}

/// [`percentile`] of `values`, which it reorders: the two order statistics it needs are
/// found by selection (linear time), not by sorting every value (labelling takes
/// percentiles of every pair's score, SciFact's 1.45M per teacher). The values are the
/// same as in a sorted copy, so the result is the same bits.
pub fn percentile_in_place(values: &mut [f64], q: f64) -> Option<f64> {
    let (i, t) = virtual_index(values.len(), q)?;
    let (_, &mut a, above) = values.select_nth_unstable_by(i, f64::total_cmp);
    match above.iter().copied().min_by(f64::total_cmp) {
        None => Some(a),
        Some(b) => Some(interpolate(a, b, t)),
    }
}

/// [`percentile`] of values already sorted ascending.
pub fn percentile_of_sorted(sorted: &[f64], q: f64) -> Option<f64> {
    let (i, t) = virtual_index(sorted.len(), q)?;
    Some(match sorted.get(i + 1) {
        None => sorted[i],
        Some(&b) => interpolate(sorted[i], b, t),
    })
}

/// `(i, t)` of the module docs for `n` values, `i` the last index when `h` is; `None`
/// when there are no values or `q` is outside `[0, 100]`.
fn virtual_index(n: usize, q: f64) -> Option<(usize, f64)> {
    if n == 0 || !(0.0..=100.0).contains(&q) {
        return None;
    }
    let last = n - 1;
    let h = (q / 100.0) * last as f64;
    // h is in [0, last]; the cast truncates, which is floor for h >= 0.
    let i = (h.floor() as usize).min(last);
    Some((i, h - i as f64))
}

/// Between `a = x[i]` and `b = x[i+1]` at `t`, as numpy evaluates it.
fn interpolate(a: f64, b: f64, t: f64) -> f64 {
    let diff = b - a;
    if t >= 0.5 {
        b - diff * (1.0 - t)
    } else {
        a + diff * t
    }
}

/// Two percentiles of a set of scores, and the maps they define.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScoreScale {
    /// The `percentile_low`-th percentile (maps to 0).
    pub low: f64,
    /// The `percentile_high`-th percentile (maps to 1).
    pub high: f64,
}

impl ScoreScale {
    /// The scale of `scores` between percentiles `q_low` and `q_high`; `None` when there
    /// are no scores or a percentile is outside `[0, 100]`.
    pub fn fit(scores: &[f64], q_low: f64, q_high: f64) -> Option<Self> {
        let mut values = scores.to_vec();
        Some(Self {
            low: percentile_in_place(&mut values, q_low)?,
            high: percentile_in_place(&mut values, q_high)?,
        })
    }

    /// `clip((s - low) / (high - low), 0, 1)`. When `high <= low` (nearly all scores
    /// equal) the map is the limit of that formula as `high` comes down to `low`: 1 for
    /// `s > low`, 0 otherwise.
    pub fn normalized(&self, s: f64) -> f64 {
        let range = self.high - self.low;
        if range <= 0.0 {
            return if s > self.low { 1.0 } else { 0.0 };
        }
        ((s - self.low) / range).clamp(0.0, 1.0)
    }

    /// The same affine map without clipping, `(s - low) / (high - low)`: increasing, so it
    /// keeps every order and every percentile's position. When `high <= low` the range
    /// is taken as 1 (`s - low`), which keeps the map increasing.
    pub fn calibrated(&self, s: f64) -> f64 {
        let range = self.high - self.low;
        if range <= 0.0 {
            return s - self.low;
        }
        (s - self.low) / range
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_hand() {
        let x = [1.0, 2.0, 3.0, 4.0];
        // h = q/100 * 3
        assert_eq!(percentile(&x, 0.0), Some(1.0));
        assert_eq!(percentile(&x, 25.0), Some(1.75)); // h = 0.75: 1 + 0.75 * 1
        assert_eq!(percentile(&x, 50.0), Some(2.5)); // h = 1.5: 2 + 0.5 * 1
        assert_eq!(percentile(&x, 100.0), Some(4.0));
        // h = 0.99 * 3 = 2.97: 3 + 0.97 * (4 - 3)
        assert!((percentile(&x, 99.0).unwrap() - 3.97).abs() < 1e-12);
        // h = 0.01 * 3 = 0.03: 1 + 0.03 * (2 - 1)
        assert!((percentile(&x, 1.0).unwrap() - 1.03).abs() < 1e-12);
    }

    #[test]
    fn percentiles_equal_numpys_bit_for_bit() {
        // numpy 2.4.6: x = [((i * 7919) % 1000) / 7.0 - 50.0 for i in range(37)];
        // float(np.percentile(x, q)) printed with repr().
        let x: Vec<f64> = (0..37u32)
            .map(|i| f64::from((i * 7919) % 1000) / 7.0 - 50.0)
            .collect();
        let numpy = [
            (0.0, -50.0),
            (1.0, -48.56),
            (12.5, -32.42857142857143),
            (25.0, -14.857142857142854),
            (33.3, -3.3337142857142865),
            (50.0, 19.85714285714286),
            (66.7, 43.042857142857144),
            (75.0, 54.57142857142857),
            (99.0, 87.84571428571428),
            (100.0, 89.28571428571428),
        ];
        for (q, expected) in numpy {
            let got = percentile(&x, q).unwrap();
            assert_eq!(
                got.to_bits(),
                f64::to_bits(expected),
                "q = {q}: {got} != {expected}"
            );
        }
    }

    #[test]
    fn selection_gives_the_sorted_percentile_bit_for_bit() {
        // Values with repeats and both signs, in a scrambled order, reused across
        // percentiles as the fit reuses them (each selection reorders the values).
        for n in [1usize, 2, 3, 10, 101, 1000] {
            let values: Vec<f64> = (0..n as u64)
                .map(|i| ((i * 2_654_435_761) % 97) as f64 / 3.0 - 10.0)
                .collect();
            let mut sorted = values.clone();
            sorted.sort_by(f64::total_cmp);
            let mut scratch = values.clone();
            for q in [0.0, 0.5, 1.0, 12.5, 33.3, 50.0, 66.7, 99.0, 99.9, 100.0] {
                let want = percentile_of_sorted(&sorted, q).unwrap();
                let got = percentile_in_place(&mut scratch, q).unwrap();
                assert_eq!(got.to_bits(), want.to_bits(), "n = {n}, q = {q}");
            }
        }
        assert_eq!(percentile_in_place(&mut [], 50.0), None);
        assert_eq!(percentile_in_place(&mut [1.0], 100.5), None);
    }

    #[test]
    fn percentile_ignores_input_order_and_interpolates_unequal_gaps() {
        // sorted [0, 10, 40]; q = 75: h = 0.75 * 2 = 1.5, so 10 + 0.5 * (40 - 10) = 25
        assert_eq!(percentile(&[40.0, 0.0, 10.0], 75.0), Some(25.0));
        // q = 20: h = 0.4, so 0 + 0.4 * 10 = 4
        assert_eq!(percentile(&[40.0, 0.0, 10.0], 20.0), Some(4.0));
        // negative values: sorted [-3, -1]; q = 50: -3 + 0.5 * 2 = -2
        assert_eq!(percentile(&[-1.0, -3.0], 50.0), Some(-2.0));
    }

    #[test]
    fn percentile_of_one_value_is_that_value_and_bad_input_is_none() {
        assert_eq!(percentile(&[7.5], 0.0), Some(7.5));
        assert_eq!(percentile(&[7.5], 63.0), Some(7.5));
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[1.0], -1.0), None);
        assert_eq!(percentile(&[1.0], 100.5), None);
        assert_eq!(percentile(&[1.0], f64::NAN), None);
    }

    #[test]
    fn normalized_is_affine_between_the_percentiles_and_clipped_outside() {
        // 0..=100: the 1st percentile is 1, the 99th is 99.
        let scores: Vec<f64> = (0..=100).map(f64::from).collect();
        let scale = ScoreScale::fit(&scores, 1.0, 99.0).unwrap();
        assert_eq!((scale.low, scale.high), (1.0, 99.0));
        assert_eq!(scale.normalized(1.0), 0.0);
        assert_eq!(scale.normalized(50.0), 0.5); // (50 - 1) / 98
        assert_eq!(scale.normalized(99.0), 1.0);
        assert_eq!(scale.normalized(0.0), 0.0); // -1/98 clipped
        assert_eq!(scale.normalized(100.0), 1.0); // 99/98 clipped
        assert_eq!(scale.calibrated(0.0), -1.0 / 98.0);
        assert_eq!(scale.calibrated(100.0), 99.0 / 98.0);
    }

    #[test]
    fn degenerate_scale_is_a_step_and_calibration_stays_increasing() {
        let scale = ScoreScale::fit(&[2.0, 2.0, 2.0], 1.0, 99.0).unwrap();
        assert_eq!((scale.low, scale.high), (2.0, 2.0));
        assert_eq!(scale.normalized(2.0), 0.0);
        assert_eq!(scale.normalized(2.5), 1.0);
        assert_eq!(scale.normalized(1.0), 0.0);
        assert_eq!(scale.calibrated(3.0), 1.0);
        assert_eq!(scale.calibrated(1.5), -0.5);
        assert_eq!(ScoreScale::fit(&[], 1.0, 99.0), None);
    }
}
