//! Matrix products on f32 slices through the `gemm` crate, with every view checked to
//! lie inside its slice, so callers never touch a raw pointer.

pub use gemm::Parallelism;

/// A strided matrix inside a slice: element (r, c) is at
/// `offset + r * row_stride + c * col_stride`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct View {
    pub offset: usize,
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl View {
    /// A dense row-major `rows x cols` matrix at the start of its slice.
    pub fn row_major(rows: usize, cols: usize) -> Self {
        Self {
            offset: 0,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// A `rows x cols` block starting at `offset`, rows `row_stride` apart.
    pub fn block(offset: usize, rows: usize, cols: usize, row_stride: usize) -> Self {
        Self {
            offset,
            rows,
            cols,
            row_stride,
            col_stride: 1,
        }
    }

    /// The transpose: the same elements, rows and columns swapped.
    pub fn t(self) -> Self {
        Self {
            offset: self.offset,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }

    /// Whether every element lies inside a slice of `len` floats (an empty view has none;
    /// [`gemm`] never forms a pointer from one).
    fn fits(&self, len: usize) -> bool {
        if self.rows == 0 || self.cols == 0 {
            return true;
        }
        let last = (self.rows - 1)
            .checked_mul(self.row_stride)
            .and_then(|r| (self.cols - 1).checked_mul(self.col_stride)?.checked_add(r))
            .and_then(|e| e.checked_add(self.offset));
        matches!(last, Some(l) if l < len)
    }
}

/// The fewest rows and columns a product is given. `gemm` multiplies a single row (or
/// column) through its matrix-vector path, whose sums differ in the last bits from the
/// matrix-matrix path's: a token's hidden state would depend on whether its row was the
/// only one of its product (the last tile of a batch whose token count leaves one row
/// over), so a text's embedding would depend on its batch-mates. Such a product runs
/// with a zero row (column) beside it instead; every row of a product of two or more
/// rows is the same bits whatever the others are (tested below).
const MIN_EXTENT: usize = 2;

/// [`gemm`] of a product with fewer than [`MIN_EXTENT`] rows or columns: the thin side is
/// copied into a dense operand with zero rows (columns) added, multiplied, and the real
/// part of the result copied back.
#[allow(clippy::too_many_arguments)]
fn gemm_widened(
    dst: &mut [f32],
    d: View,
    lhs: &[f32],
    a: View,
    rhs: &[f32],
    b: View,
    accumulate: bool,
    scale: f32,
    parallelism: Parallelism,
) {
    let (m, n, k) = (d.rows.max(MIN_EXTENT), d.cols.max(MIN_EXTENT), a.cols);
    let at = |v: View, r: usize, c: usize| v.offset + r * v.row_stride + c * v.col_stride;
    let dense = |src: &[f32], v: View, rows: usize, cols: usize| -> Vec<f32> {
        let mut out = vec![0.0f32; rows * cols];
        for r in 0..v.rows {
            for c in 0..v.cols {
                out[r * cols + c] = src[at(v, r, c)];
            }
        }
        out
    };
    let lhs_wide;
    let (lhs, a) = if d.rows < MIN_EXTENT {
        lhs_wide = dense(lhs, a, m, k);
        (&lhs_wide[..], View::row_major(m, k))
    } else {
        (lhs, a)
    };
    let rhs_wide;
    let (rhs, b) = if d.cols < MIN_EXTENT {
        rhs_wide = dense(rhs, b, k, n);
        (&rhs_wide[..], View::row_major(k, n))
    } else {
        (rhs, b)
    };
    let mut out = if accumulate {
        dense(dst, d, m, n)
    } else {
        vec![0.0f32; m * n]
    };
    gemm(
        &mut out,
        View::row_major(m, n),
        lhs,
        a,
        rhs,
        b,
        accumulate,
        scale,
        parallelism,
    );
    for r in 0..d.rows {
        for c in 0..d.cols {
            dst[at(d, r, c)] = out[r * n + c];
        }
    }
}

/// `dst = (accumulate ? dst : 0) + scale * lhs * rhs`.
///
/// # Panics
/// When the shapes disagree or a view leaves its slice: both are bugs in the caller,
/// never a property of the input data.
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    dst: &mut [f32],
    d: View,
    lhs: &[f32],
    a: View,
    rhs: &[f32],
    b: View,
    accumulate: bool,
    scale: f32,
    parallelism: Parallelism,
) {
    assert!(
        d.rows == a.rows && d.cols == b.cols && a.cols == b.rows,
        "gemm shapes: dst {d:?}, lhs {a:?}, rhs {b:?}"
    );
    assert!(
        d.fits(dst.len()) && a.fits(lhs.len()) && b.fits(rhs.len()),
        "gemm view outside its slice"
    );
    if d.rows == 0 || d.cols == 0 {
        return;
    }
    if a.cols == 0 {
        if !accumulate {
            for r in 0..d.rows {
                let start = d.offset + r * d.row_stride;
                for c in 0..d.cols {
                    dst[start + c * d.col_stride] = 0.0;
                }
            }
        }
        return;
    }
    if d.rows < MIN_EXTENT || d.cols < MIN_EXTENT {
        gemm_widened(dst, d, lhs, a, rhs, b, accumulate, scale, parallelism);
        return;
    }
    // Strides fit in isize: every view fits in a slice, and slices hold at most
    // isize::MAX bytes.
    let s = |x: usize| x as isize;
    // SAFETY: the three views lie inside their slices (checked above), so gemm reads and
    // writes only those elements; `dst` is borrowed mutably, so it overlaps neither
    // `lhs` nor `rhs`; gemm's dst := alpha * dst + beta * lhs * rhs with alpha = 1 and
    // read_dst = accumulate.
    unsafe {
        gemm::gemm(
            d.rows,
            d.cols,
            a.cols,
            dst.as_mut_ptr().add(d.offset),
            s(d.col_stride),
            s(d.row_stride),
            accumulate,
            lhs.as_ptr().add(a.offset),
            s(a.col_stride),
            s(a.row_stride),
            rhs.as_ptr().add(b.offset),
            s(b.col_stride),
            s(b.row_stride),
            1.0,
            scale,
            false,
            false,
            false,
            parallelism,
        )
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_is_the_same_bits_in_a_product_of_any_number_of_rows() {
        // The shapes of the encoders' products (hidden x 3 hidden, intermediate x hidden,
        // ...), plain and accumulating, one thread and two: rows 0..m of a product of m
        // rows, from two offsets, against the same rows of one product of 200, including
        // a product of a single row (gemm's matrix-vector path, which the wrapper widens).
        let mut x = 7u64;
        let mut r = || {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        };
        let mmax = 200;
        for (k, n, accumulate) in [
            (32, 96, false),
            (64, 32, true),
            (32, 32, true),
            (384, 1152, false),
            (1536, 384, true),
            (384, 384, true),
        ] {
            let a: Vec<f32> = (0..mmax * k).map(|_| r()).collect();
            let b: Vec<f32> = (0..k * n).map(|_| r()).collect();
            let init: Vec<f32> = (0..mmax * n).map(|_| r()).collect();
            let mut full = init.clone();
            let (av, bv) = (View::row_major(mmax, k), View::row_major(k, n));
            gemm(
                &mut full,
                View::row_major(mmax, n),
                &a,
                av,
                &b,
                bv,
                accumulate,
                1.0,
                Parallelism::None,
            );
            for par in [Parallelism::None, Parallelism::Rayon(2)] {
                for m in (1..12).chain([63, 64, 65, 199]) {
                    for start in [0, 1] {
                        let mut d = init[start * n..(start + m) * n].to_vec();
                        let lhs = &a[start * k..(start + m) * k];
                        gemm(
                            &mut d,
                            View::row_major(m, n),
                            lhs,
                            View::row_major(m, k),
                            &b,
                            bv,
                            accumulate,
                            1.0,
                            par,
                        );
                        let want = &full[start * n..(start + m) * n];
                        assert!(
                            d.iter().zip(want).all(|(p, q)| p.to_bits() == q.to_bits()),
                            "k {k}, n {n}, accumulate {accumulate}: {m} rows from {start}"
                        );
                    }
                }
            }
            // A single column too (the transposed thin case).
            let bt: Vec<f32> = (0..k).map(|i| b[i * n]).collect();
            let mut col = vec![0.0f32; mmax];
            gemm(
                &mut col,
                View::row_major(mmax, 1),
                &a,
                av,
                &bt,
                View::row_major(k, 1),
                false,
                1.0,
                Parallelism::None,
            );
            let mut two = vec![0.0f32; mmax * 2];
            let b2: Vec<f32> = (0..k).flat_map(|i| [b[i * n], b[i * n + 1]]).collect();
            gemm(
                &mut two,
                View::row_major(mmax, 2),
                &a,
                av,
                &b2,
                View::row_major(k, 2),
                false,
                1.0,
                Parallelism::None,
            );
            for i in 0..mmax {
                assert_eq!(
                    col[i].to_bits(),
                    two[i * 2].to_bits(),
                    "k {k}: column row {i}"
                );
            }
        }
    }

    #[test]
    fn products_by_hand() {
        // [1 2; 3 4] * [5 6; 7 8] = [19 22; 43 50].
        let a = [1.0, 2.0, 3.0, 4.0];
        let b = [5.0, 6.0, 7.0, 8.0];
        let mut d = [0.0; 4];
        let v = View::row_major(2, 2);
        gemm(&mut d, v, &a, v, &b, v, false, 1.0, Parallelism::None);
        assert_eq!(d, [19.0, 22.0, 43.0, 50.0]);
        // Accumulate 0.5 * A * B^T = 0.5 * [17 23; 39 53] onto it.
        gemm(&mut d, v, &a, v, &b, v.t(), true, 0.5, Parallelism::None);
        assert_eq!(d, [27.5, 33.5, 62.5, 76.5]);
    }

    #[test]
    fn blocks_inside_wider_rows() {
        // Columns 1..3 of a 2x4 matrix times a 2x1 column, written into column 2 of a
        // 2x3 destination: [2 3; 6 7] * [1; 10] = [32; 76].
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
        let b = [1.0, 10.0];
        let mut d = [0.0; 6];
        gemm(
            &mut d,
            View::block(2, 2, 1, 3),
            &a,
            View::block(1, 2, 2, 4),
            &b,
            View::row_major(2, 1),
            false,
            1.0,
            Parallelism::None,
        );
        assert_eq!(d, [0.0, 0.0, 32.0, 0.0, 0.0, 76.0]);
    }

    #[test]
    #[should_panic(expected = "outside its slice")]
    fn a_view_past_the_end_is_refused() {
        let a = [0.0; 4];
        let mut d = [0.0; 4];
        let v = View::row_major(2, 2);
        gemm(
            &mut d,
            v,
            &a,
            View::block(1, 2, 2, 2),
            &a,
            v,
            false,
            1.0,
            Parallelism::None,
        );
    }
}
