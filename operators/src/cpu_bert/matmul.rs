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
