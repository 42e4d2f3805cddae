//! Products with Q8_0 weights on the CPU, computed as llama.cpp computes them: each
//! input row is quantized to Q8_0 as well (a scale per block of [`BLOCK`] values, the
//! values rounded to `i8`), every block's dot product is an exact integer sum, and the
//! blocks are combined in `f32`: `y = sum_b (dw_b * dx_b) * isum_b`, one fused
//! multiply-add per block, in block order.
//!
//! Why: a prompt step multiplies hundreds of rows by every matrix of the model. Widening
//! the weights to f32 for each step (the previous prompt path) reads and writes 4 bytes
//! per weight per step and multiplies in f32; here the weights stay at one byte and the
//! products are 8-bit integer multiply-adds (`vpdpbusd`, AVX-512 VNNI: 64 per
//! instruction). candle's own tiled kernels quantize the inputs per block of 256
//! (Q8_K), which moved prompt logits twice as far from llama.cpp's as per-32 blocks do.
//!
//! Contracts:
//! - **Row independence.** An output value depends on its input row and weight row
//!   only: the input is quantized row by row, and every output value is the same chain
//!   of operations whatever the number of rows, the tiling or the thread count, so a
//!   row has the same bits alone, in a batch, in a prompt step or in a decode step.
//! - **The same bits on every CPU path.** The block sums are exact integers (at most
//!   `32 x 127 x 128` in magnitude, exact in `f32` too), and the `f32` part is the same
//!   multiply and fused multiply-add on every path ([`f32::mul_add`] on the generic
//!   path), so the generic, AVX2 and AVX-512 copies give identical outputs.
//! - The weights are repacked once, on load, in tiles of [`TILE_ROWS`] rows per block:
//!   the layout the AVX-512 kernel reads with one aligned load per four values of sixteen
//!   rows. Values are stored plus 128 (`u8`), because `vpdpbusd` multiplies unsigned by
//!   signed bytes; the input's block sums take the offset back out exactly.

use half::f16;
use rayon::prelude::*;

use crate::cpu_path::{CpuPath, SupportedPath};

/// Values per Q8_0 block (ggml's `QK8_0`).
pub(crate) const BLOCK: usize = 32;
/// Bytes of a stored Q8_0 block: an f16 scale, then 32 `i8` values.
pub(crate) const BLOCK_BYTES: usize = 2 + BLOCK;
/// Weight rows per tile: the sixteen `i32` lanes of one AVX-512 register.
const TILE_ROWS: usize = 16;
/// Groups of four values in a block: one `vpdpbusd` each.
const GROUPS: usize = BLOCK / 4;
/// Input rows the kernel carries through a tile at once: eight independent chains of
/// integer multiply-adds hide the instruction's latency, and eight sums and eight
/// accumulators fit the registers beside the weights.
const ROWS_AT_ONCE: usize = 8;
/// Input rows per unit of parallel work: the tile's weights are read once per chunk, so
/// a chunk long enough keeps them in cache while the chunk's rows pass.
const CHUNK_ROWS: usize = 64;
/// Units of parallel work per thread at least, so that uneven units even out.
const UNITS_PER_THREAD: usize = 4;
/// The offset that makes stored weight values unsigned.
const OFFSET: i32 = 128;

/// One block of [`TILE_ROWS`] weight rows, laid out for the kernels.
#[derive(Clone)]
#[repr(C, align(64))]
struct Tile {
    /// Value `4g + j` of the block of row `r` at `[g * 64 + r * 4 + j]`, plus 128.
    qs: [u8; BLOCK * TILE_ROWS],
    /// Each row's scale (rows past the matrix: 0).
    d: [f32; TILE_ROWS],
}

/// A Q8_0 matrix (`rows x cols`, the weight of `y = x W^T`), repacked for the kernels.
pub(crate) struct Q8Matrix {
    rows: usize,
    cols: usize,
    /// `cols / BLOCK`.
    blocks: usize,
    /// `[tile][block]`: tile `t` holds rows `16t..16t+16`.
    tiles: Vec<Tile>,
}

impl std::fmt::Debug for Q8Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Q8Matrix({} x {})", self.rows, self.cols)
    }
}

/// Q4_0 and Q5_0 blocks (a scale and 32 small integers) as the Q8_0 blocks of the same
/// values, exactly: the same scale, each integer as an `i8`. `None` for other types or
/// data that is not whole blocks.
pub fn widen_to_q8_0(dtype: candle_core::quantized::GgmlDType, data: &[u8]) -> Option<Vec<u8>> {
    use candle_core::quantized::GgmlDType;
    // ggml's block layouts: Q4_0 is an f16 scale and 16 bytes of nibbles (value j in
    // the low nibble of byte j, value j + 16 in the high one), each minus 8; Q5_0 adds
    // a 32-bit word of fifth bits (bit j for value j) and subtracts 16.
    let (bytes, fifth) = match dtype {
        GgmlDType::Q4_0 => (18, false),
        GgmlDType::Q5_0 => (22, true),
        _ => return None,
    };
    if !data.len().is_multiple_of(bytes) {
        return None;
    }
    let mut out = Vec::with_capacity(data.len() / bytes * BLOCK_BYTES);
    for block in data.chunks_exact(bytes) {
        out.extend_from_slice(&block[..2]);
        let (high, qs) = if fifth {
            let h = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
            (h, &block[6..])
        } else {
            (0, &block[2..])
        };
        let mut values = [0u8; BLOCK];
        for (j, &byte) in qs.iter().enumerate() {
            let (lo, hi) = if fifth {
                (
                    (byte & 0x0F) as i32 | ((((high >> j) & 1) as i32) << 4),
                    (byte >> 4) as i32 | ((((high >> (j + 16)) & 1) as i32) << 4),
                )
            } else {
                ((byte & 0x0F) as i32, (byte >> 4) as i32)
            };
            let bias = if fifth { 16 } else { 8 };
            values[j] = (lo - bias) as i8 as u8;
            values[j + 16] = (hi - bias) as i8 as u8;
        }
        out.extend_from_slice(&values);
    }
    Some(out)
}

/// Why stored bytes are not a Q8_0 matrix of the shape asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Q8Error {
    #[error("a Q8_0 matrix of {cols} columns: not a multiple of {BLOCK}")]
    Width { cols: usize },
    #[error("{bytes} bytes of Q8_0 data for {rows} x {cols} values (expected {expected})")]
    Size {
        bytes: usize,
        rows: usize,
        cols: usize,
        expected: usize,
    },
}

impl Q8Matrix {
    /// Repacks GGUF's Q8_0 bytes (row-major rows of blocks) of a `rows x cols` matrix.
    pub fn from_q8_0(data: &[u8], rows: usize, cols: usize) -> Result<Q8Matrix, Q8Error> {
        if !cols.is_multiple_of(BLOCK) {
            return Err(Q8Error::Width { cols });
        }
        let blocks = cols / BLOCK;
        let expected = rows * blocks * BLOCK_BYTES;
        if data.len() != expected {
            return Err(Q8Error::Size {
                bytes: data.len(),
                rows,
                cols,
                expected,
            });
        }
        let n_tiles = rows.div_ceil(TILE_ROWS);
        let empty = Tile {
            // Stored zero: rows past the matrix multiply to exact zeros.
            qs: [OFFSET as u8; BLOCK * TILE_ROWS],
            d: [0.0; TILE_ROWS],
        };
        let mut tiles = vec![empty; n_tiles * blocks];
        for row in 0..rows {
            let (t, r) = (row / TILE_ROWS, row % TILE_ROWS);
            for b in 0..blocks {
                let at = (row * blocks + b) * BLOCK_BYTES;
                let block = &data[at..at + BLOCK_BYTES];
                let tile = &mut tiles[t * blocks + b];
                tile.d[r] = f16::from_le_bytes([block[0], block[1]]).to_f32();
                for (i, &v) in block[2..].iter().enumerate() {
                    let stored = (v as i8 as i32 + OFFSET) as u8;
                    tile.qs[(i / 4) * 64 + r * 4 + i % 4] = stored;
                }
            }
        }
        Ok(Q8Matrix {
            rows,
            cols,
            blocks,
            tiles,
        })
    }

    /// Q8_0 bytes of `parts` stacked row-wise, all of `cols` columns: `None` when the
    /// widths differ.
    pub fn stack(parts: &[&Q8Matrix]) -> Option<Q8Matrix> {
        let cols = parts.first()?.cols;
        if parts.iter().any(|p| p.cols != cols) {
            return None;
        }
        let mut bytes = Vec::new();
        let mut rows = 0;
        for p in parts {
            p.append_q8_0(&mut bytes);
            rows += p.rows;
        }
        Q8Matrix::from_q8_0(&bytes, rows, cols).ok()
    }

    /// Appends the matrix as GGUF's Q8_0 bytes: what [`Q8Matrix::from_q8_0`] read.
    fn append_q8_0(&self, bytes: &mut Vec<u8>) {
        for row in 0..self.rows {
            let (t, r) = (row / TILE_ROWS, row % TILE_ROWS);
            for tile in self.tile_blocks(t) {
                // Exact: the scale was an f16 widened to f32.
                bytes.extend_from_slice(&f16::from_f32(tile.d[r]).to_le_bytes());
                for i in 0..BLOCK {
                    let stored = tile.qs[(i / 4) * 64 + r * 4 + i % 4] as i32 - OFFSET;
                    bytes.push(stored as i8 as u8);
                }
            }
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// `y = x W^T`: `x` is `m x cols` row-major, `y` `m x rows`; runs on `path` over
    /// rayon's threads.
    ///
    /// # Panics
    /// When the slices' lengths are not `m x cols` and `m x rows` (a caller's bug).
    pub fn product(&self, path: SupportedPath, x: &[f32], m: usize, y: &mut [f32]) {
        assert_eq!(x.len(), m * self.cols, "Q8Matrix::product: input size");
        assert_eq!(y.len(), m * self.rows, "Q8Matrix::product: output size");
        if m == 0 || self.rows == 0 {
            return;
        }
        let input = QuantizedRows::new(x, m, self.cols);
        let kernel = Kernel::for_path(path);
        let n_tiles = self.rows.div_ceil(TILE_ROWS);
        let chunks = m.div_ceil(CHUNK_ROWS);
        let units_wanted = rayon::current_num_threads() * UNITS_PER_THREAD;
        let groups = n_tiles.min(units_wanted.div_ceil(chunks)).max(1);
        let tiles_per_group = n_tiles.div_ceil(groups);
        let groups = n_tiles.div_ceil(tiles_per_group);
        let out = Out(y.as_mut_ptr());
        (0..chunks * groups).into_par_iter().for_each(|unit| {
            let (chunk, group) = (unit / groups, unit % groups);
            let rows = chunk * CHUNK_ROWS..((chunk + 1) * CHUNK_ROWS).min(m);
            let tiles = group * tiles_per_group..((group + 1) * tiles_per_group).min(n_tiles);
            for t in tiles {
                let mut start = rows.start;
                while start < rows.end {
                    let count = (rows.end - start).min(ROWS_AT_ONCE);
                    let mut acc = [[0f32; TILE_ROWS]; ROWS_AT_ONCE];
                    kernel.run(self.tile_blocks(t), &input, start, count, &mut acc);
                    let cols = TILE_ROWS.min(self.rows - t * TILE_ROWS);
                    for (i, sums) in acc.iter().take(count).enumerate() {
                        let at = (start + i) * self.rows + t * TILE_ROWS;
                        // SAFETY: `at + cols <= m * rows = y.len()`, and units write
                        // disjoint (row, column) ranges: rows by chunk, columns by
                        // tile, each tile of a chunk in one unit.
                        unsafe { out.write(at, &sums[..cols]) };
                    }
                    start += count;
                }
            }
        });
    }

    fn tile_blocks(&self, t: usize) -> &[Tile] {
        &self.tiles[t * self.blocks..(t + 1) * self.blocks]
    }
}

/// The output pointer shared by the parallel units, each writing its own cells.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: the units write disjoint cells (see `Q8Matrix::product`), and the slice it
// points into outlives the parallel loop.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// # Safety
    /// `at + values.len()` within the output, and no other unit writing those cells.
    unsafe fn write(self, at: usize, values: &[f32]) {
        // SAFETY: as the caller promises.
        unsafe { std::ptr::copy_nonoverlapping(values.as_ptr(), self.0.add(at), values.len()) }
    }
}

/// Input rows quantized to Q8_0, laid out for the kernels: rows in groups of
/// [`ROWS_AT_ONCE`] (the last group padded with zero rows), and within a group block by
/// block, the group's rows' values of one block side by side, so that the kernel reads
/// one contiguous stream beside the weights'.
pub(crate) struct QuantizedRows {
    blocks: usize,
    /// `[group][block][row of the group][BLOCK]` values.
    q: Vec<i8>,
    /// Each block's scale, rounded to f16 as GGUF stores it: `[group][block][row]`.
    d: Vec<f32>,
    /// Each block's `128 x sum(q)`, what the stored weights' offset adds to its sum:
    /// `[group][block][row]`.
    offset: Vec<i32>,
}

impl QuantizedRows {
    /// Quantizes each block of `x` (`m x cols`) as ggml's `quantize_row_q8_0` does:
    /// scale `max|x| / 127`, values `x / scale` rounded to nearest, ties to even (its
    /// vector code's rounding), the scale then stored in f16. Groups of rows run in
    /// parallel.
    pub fn new(x: &[f32], m: usize, cols: usize) -> QuantizedRows {
        let blocks = cols / BLOCK;
        let groups = m.div_ceil(ROWS_AT_ONCE);
        let per_group = blocks * ROWS_AT_ONCE;
        let mut q = vec![0i8; groups * per_group * BLOCK];
        let mut d = vec![0f32; groups * per_group];
        let mut offset = vec![0i32; groups * per_group];
        q.par_chunks_mut(per_group * BLOCK)
            .zip(d.par_chunks_mut(per_group))
            .zip(offset.par_chunks_mut(per_group))
            .enumerate()
            .for_each(|(group, ((q, d), offset))| {
                for i in 0..ROWS_AT_ONCE.min(m - group * ROWS_AT_ONCE) {
                    let row = &x[(group * ROWS_AT_ONCE + i) * cols..][..cols];
                    for (b, xb) in row.chunks_exact(BLOCK).enumerate() {
                        let k = b * ROWS_AT_ONCE + i;
                        let (scale, sum) = quantize_block(xb, &mut q[k * BLOCK..][..BLOCK]);
                        d[k] = f16::from_f32(scale).to_f32();
                        offset[k] = OFFSET * sum;
                    }
                }
            });
        QuantizedRows {
            blocks,
            q,
            d,
            offset,
        }
    }

    /// Where block `b` of row `row` is, in [`QuantizedRows::d`] and `offset` (times
    /// [`BLOCK`]: in `q`).
    fn at(&self, row: usize, b: usize) -> usize {
        ((row / ROWS_AT_ONCE) * self.blocks + b) * ROWS_AT_ONCE + row % ROWS_AT_ONCE
    }
}

/// Adding and then subtracting 1.5 x 2^23 rounds an f32 below 2^22 in magnitude to an
/// integer, ties to even (the default rounding of every IEEE operation), with no call
/// into libm on CPUs without SSE4.1's rounding instruction.
const ROUNDING: f32 = 12_582_912.0;

/// One block's values into `q`; returns its scale (in f32) and the sum of its values.
#[inline]
fn quantize_block(x: &[f32], q: &mut [i8]) -> (f32, i32) {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let scale = amax / 127.0;
    let inv = if scale != 0.0 { 1.0 / scale } else { 0.0 };
    let mut sum = 0i32;
    for (o, &v) in q.iter_mut().zip(x) {
        // |v * inv| <= 127 up to rounding; the cast saturates anything past.
        let r = (v * inv + ROUNDING) - ROUNDING;
        *o = r as i8;
        sum += *o as i32;
    }
    (scale, sum)
}

/// Which copy of the tile kernel runs.
#[derive(Clone, Copy)]
enum Kernel {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Vnni,
}

impl Kernel {
    fn for_path(path: SupportedPath) -> Kernel {
        match path.path() {
            #[cfg(target_arch = "x86_64")]
            CpuPath::Avx512 if vnni_detected() => Kernel::Vnni,
            #[cfg(target_arch = "x86_64")]
            CpuPath::Avx512 | CpuPath::Avx2 => Kernel::Avx2,
            _ => Kernel::Portable,
        }
    }

    /// Adds to `acc[i][r]` the product of input row `start + i` (`i < count`) and the
    /// tile's row `r`.
    fn run(
        self,
        tile: &[Tile],
        x: &QuantizedRows,
        start: usize,
        count: usize,
        acc: &mut [[f32; TILE_ROWS]; ROWS_AT_ONCE],
    ) {
        match self {
            Kernel::Portable => tile_portable(tile, x, start, count, acc),
            // SAFETY: Kernel::Avx2 is chosen for a SupportedPath of Avx2 or Avx512,
            // which CpuPath::check made only after detecting avx2 and fma.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { avx2::tile(tile, x, start, count, acc) },
            // SAFETY: Kernel::Vnni is chosen only when avx512f, avx512bw and
            // avx512vnni were detected on this CPU.
            #[cfg(target_arch = "x86_64")]
            Kernel::Vnni => unsafe { vnni::tile(tile, x, start, count, acc) },
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn vnni_detected() -> bool {
    static VNNI: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *VNNI.get_or_init(|| {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    })
}

/// The kernel as plain loops: per block, each row's exact integer sum, then one
/// multiply and one fused multiply-add per output value.
#[inline(always)]
fn tile_portable(
    tile: &[Tile],
    x: &QuantizedRows,
    start: usize,
    count: usize,
    acc: &mut [[f32; TILE_ROWS]; ROWS_AT_ONCE],
) {
    for (b, t) in tile.iter().enumerate() {
        for (i, acc) in acc.iter_mut().enumerate().take(count) {
            let k = x.at(start + i, b);
            let xq = &x.q[k * BLOCK..][..BLOCK];
            let (dx, off) = (x.d[k], x.offset[k]);
            let mut sums = [0i32; TILE_ROWS];
            for g in 0..GROUPS {
                let w = &t.qs[g * 64..(g + 1) * 64];
                for (r, s) in sums.iter_mut().enumerate() {
                    for j in 0..4 {
                        *s += w[r * 4 + j] as i32 * xq[g * 4 + j] as i32;
                    }
                }
            }
            for r in 0..TILE_ROWS {
                let scale = t.d[r] * dx;
                acc[r] = scale.mul_add((sums[r] - off) as f32, acc[r]);
            }
        }
    }
}

/// Input values `at..at + 4` as one little-endian `i32`: the group of four that the
/// x86 copies broadcast to every row of a tile.
///
/// # Safety
/// `at + 4 <= xq.len()`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn four_values(xq: &[i8], at: usize) -> i32 {
    debug_assert!(at + 4 <= xq.len());
    // SAFETY: as the caller promises; an unaligned read of 4 bytes.
    unsafe { xq.as_ptr().add(at).cast::<i32>().read_unaligned() }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{four_values, QuantizedRows, Tile, BLOCK, GROUPS, ROWS_AT_ONCE, TILE_ROWS};

    /// Input rows carried through a tile at once: two registers of sums each (the
    /// tile's 16 rows), eight in all, beside the weights.
    const ROWS: usize = 4;

    /// The kernel with AVX2's byte products, as llama.cpp's AVX2 dot product makes
    /// them: a stored value plus 128 becomes the signed value again (flip of the top
    /// bit), `vpmaddubsw` multiplies its magnitude by the input value carrying its sign
    /// (pairs of products of at most 128 x 127 each: no saturation), `vpmaddwd` adds the
    /// pairs into `i32`. The block sums are the same exact integers as the other paths',
    /// and the `f32` part the same operations.
    ///
    /// # Safety
    /// The CPU has avx2 and fma.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile(
        tile: &[Tile],
        x: &QuantizedRows,
        start: usize,
        count: usize,
        acc: &mut [[f32; TILE_ROWS]; ROWS_AT_ONCE],
    ) {
        let mut done = 0;
        while done < count {
            let n = (count - done).min(ROWS);
            let acc = &mut acc[done..done + n];
            match n {
                4 => rows::<4>(tile, x, start + done, acc),
                3 => rows::<3>(tile, x, start + done, acc),
                2 => rows::<2>(tile, x, start + done, acc),
                _ => rows::<1>(tile, x, start + done, acc),
            }
            done += n;
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn rows<const R: usize>(
        tile: &[Tile],
        x: &QuantizedRows,
        start: usize,
        out: &mut [[f32; TILE_ROWS]],
    ) {
        let flip = _mm256_set1_epi8(-128);
        let ones = _mm256_set1_epi16(1);
        for (b, t) in tile.iter().enumerate() {
            let k = x.at(start, b);
            // The rows' values of block b (QuantizedRows keeps a group's rows of one
            // block side by side; `start` never crosses a group here).
            let xq = &x.q[k * BLOCK..(k + R) * BLOCK];
            let mut sums = [[_mm256_setzero_si256(); 2]; R];
            for g in 0..GROUPS {
                for (half, at) in [0usize, 32].into_iter().enumerate() {
                    // SAFETY: `t.qs` holds GROUPS x 64 bytes.
                    let stored =
                        unsafe { _mm256_loadu_si256(t.qs.as_ptr().add(g * 64 + at).cast()) };
                    let w = _mm256_xor_si256(stored, flip);
                    let magnitude = _mm256_abs_epi8(w);
                    for (i, s) in sums.iter_mut().enumerate() {
                        // SAFETY: `xq` holds R x BLOCK values and `i * BLOCK + g * 4 + 4
                        // <= R * BLOCK`.
                        let four = unsafe { four_values(xq, i * BLOCK + g * 4) };
                        let signed = _mm256_sign_epi8(_mm256_set1_epi32(four), w);
                        let pairs = _mm256_maddubs_epi16(magnitude, signed);
                        s[half] = _mm256_add_epi32(s[half], _mm256_madd_epi16(pairs, ones));
                    }
                }
            }
            for (i, (s, out)) in sums.iter().zip(out.iter_mut()).enumerate() {
                let dx = _mm256_set1_ps(x.d[k + i]);
                for (half, sum) in s.iter().enumerate() {
                    // SAFETY: `t.d` and `out` hold TILE_ROWS f32: 8 at 0 or 8.
                    unsafe {
                        let dw = _mm256_loadu_ps(t.d.as_ptr().add(half * 8));
                        let o = out.as_mut_ptr().add(half * 8);
                        let scale = _mm256_mul_ps(dw, dx);
                        let a =
                            _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(*sum), _mm256_loadu_ps(o));
                        _mm256_storeu_ps(o, a);
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use std::arch::x86_64::*;

    use super::{four_values, QuantizedRows, Tile, BLOCK, GROUPS, ROWS_AT_ONCE, TILE_ROWS};

    /// # Safety
    /// The CPU has avx512f, avx512bw and avx512vnni.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn tile(
        tile: &[Tile],
        x: &QuantizedRows,
        start: usize,
        count: usize,
        acc: &mut [[f32; TILE_ROWS]; ROWS_AT_ONCE],
    ) {
        match count {
            8 => rows::<8>(tile, x, start, acc),
            7 => rows::<7>(tile, x, start, acc),
            6 => rows::<6>(tile, x, start, acc),
            5 => rows::<5>(tile, x, start, acc),
            4 => rows::<4>(tile, x, start, acc),
            3 => rows::<3>(tile, x, start, acc),
            2 => rows::<2>(tile, x, start, acc),
            1 => rows::<1>(tile, x, start, acc),
            _ => {}
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    fn rows<const R: usize>(
        tile: &[Tile],
        x: &QuantizedRows,
        start: usize,
        out: &mut [[f32; TILE_ROWS]; ROWS_AT_ONCE],
    ) {
        let mut acc = [_mm512_setzero_ps(); R];
        for (i, a) in acc.iter_mut().enumerate() {
            // SAFETY: `out[i]` holds TILE_ROWS f32.
            *a = unsafe { _mm512_loadu_ps(out[i].as_ptr()) };
        }
        debug_assert!(start % ROWS_AT_ONCE + R <= ROWS_AT_ONCE);
        for (b, t) in tile.iter().enumerate() {
            let k = x.at(start, b);
            // The group's rows' values of block b, side by side (QuantizedRows).
            let xq = &x.q[k * BLOCK..(k + R) * BLOCK];
            let mut sums = [_mm512_setzero_si512(); R];
            for g in 0..GROUPS {
                // SAFETY: `t.qs` holds GROUPS x 64 bytes; the load is unaligned-safe.
                let w = unsafe { _mm512_loadu_si512(t.qs.as_ptr().add(g * 64).cast()) };
                for (i, s) in sums.iter_mut().enumerate() {
                    // SAFETY: `xq` holds R x BLOCK values and `i * BLOCK + g * 4 + 4 <=
                    // R * BLOCK`.
                    let four = unsafe { four_values(xq, i * BLOCK + g * 4) };
                    *s = _mm512_dpbusd_epi32(*s, w, _mm512_set1_epi32(four));
                }
            }
            // SAFETY: `t.d` holds TILE_ROWS f32.
            let dw = unsafe { _mm512_loadu_ps(t.d.as_ptr()) };
            for i in 0..R {
                let isum = _mm512_sub_epi32(sums[i], _mm512_set1_epi32(x.offset[k + i]));
                let scale = _mm512_mul_ps(dw, _mm512_set1_ps(x.d[k + i]));
                acc[i] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(isum), acc[i]);
            }
        }
        for (i, a) in acc.iter().enumerate() {
            // SAFETY: `out[i]` holds TILE_ROWS f32.
            unsafe { _mm512_storeu_ps(out[i].as_mut_ptr(), *a) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Q8_0 bytes of a `rows x cols` matrix with seeded values and scales.
    fn q8_bytes(rows: usize, cols: usize, seed: u64) -> Vec<u8> {
        let mut state = seed;
        let mut next = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as u32
        };
        let mut bytes = Vec::new();
        for _ in 0..rows * cols / BLOCK {
            let d = f16::from_f32(0.001 + (next() % 1000) as f32 * 1e-5);
            bytes.extend_from_slice(&d.to_le_bytes());
            for _ in 0..BLOCK {
                // Every i8, -128 included (files may hold it).
                bytes.push(((next() % 256) as i32 - 128) as i8 as u8);
            }
        }
        bytes
    }

    fn inputs(m: usize, cols: usize, seed: u64) -> Vec<f32> {
        let mut state = seed;
        (0..m * cols)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
            })
            .collect()
    }

    /// The same sum written out in the plainest way: blocks in order, each an exact
    /// integer dot product of the stored values, one multiply and fused multiply-add.
    fn reference(bytes: &[u8], rows: usize, cols: usize, x: &[f32], m: usize) -> Vec<f32> {
        let blocks = cols / BLOCK;
        let qx = QuantizedRows::new(x, m, cols);
        let mut y = vec![0f32; m * rows];
        for i in 0..m {
            for n in 0..rows {
                let mut acc = 0f32;
                for b in 0..blocks {
                    let at = (n * blocks + b) * BLOCK_BYTES;
                    let dw = f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32();
                    let mut s = 0i32;
                    let k = qx.at(i, b);
                    for j in 0..BLOCK {
                        s += bytes[at + 2 + j] as i8 as i32 * qx.q[k * BLOCK + j] as i32;
                    }
                    acc = (dw * qx.d[k]).mul_add(s as f32, acc);
                }
                y[i * rows + n] = acc;
            }
        }
        y
    }

    #[test]
    fn every_path_gives_the_reference_bits() {
        // Rows not a multiple of the tile, input rows not a multiple of the kernel's 8
        // nor of the chunk.
        for (rows, cols, m) in [(40, 96, 1), (16, 64, 9), (37, 160, 70), (128, 256, 3)] {
            let bytes = q8_bytes(rows, cols, rows as u64);
            let w = Q8Matrix::from_q8_0(&bytes, rows, cols).unwrap();
            let x = inputs(m, cols, cols as u64);
            let want = reference(&bytes, rows, cols, &x, m);
            for path in SupportedPath::all_supported() {
                let mut y = vec![f32::NAN; m * rows];
                w.product(path, &x, m, &mut y);
                let same = y.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{rows}x{cols}, {m} rows, path {:?}", path.path());
            }
        }
    }

    #[test]
    fn a_row_has_the_same_bits_alone_and_in_any_batch() {
        let (rows, cols) = (48, 128);
        let bytes = q8_bytes(rows, cols, 7);
        let w = Q8Matrix::from_q8_0(&bytes, rows, cols).unwrap();
        let x = inputs(77, cols, 3);
        for path in SupportedPath::all_supported() {
            let mut all = vec![0f32; 77 * rows];
            w.product(path, &x, 77, &mut all);
            for (start, len) in [(0, 1), (5, 1), (10, 7), (20, 13), (76, 1)] {
                let mut part = vec![0f32; len * rows];
                w.product(path, &x[start * cols..(start + len) * cols], len, &mut part);
                assert_eq!(
                    part.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    all[start * rows..(start + len) * rows]
                        .iter()
                        .map(|v| v.to_bits())
                        .collect::<Vec<_>>(),
                    "rows {start}..{} on {:?}",
                    start + len,
                    path.path()
                );
            }
        }
    }

    #[test]
    fn the_product_is_close_to_the_dequantized_one() {
        // Against f64 over the dequantized weights: the input's 8-bit rounding is the
        // only approximation, about 1/254 of each block's largest value per value.
        let (rows, cols, m) = (20, 128, 3);
        let bytes = q8_bytes(rows, cols, 11);
        let w = Q8Matrix::from_q8_0(&bytes, rows, cols).unwrap();
        let x = inputs(m, cols, 5);
        let mut y = vec![0f32; m * rows];
        w.product(SupportedPath::GENERIC, &x, m, &mut y);
        let blocks = cols / BLOCK;
        for i in 0..m {
            for n in 0..rows {
                let mut exact = 0f64;
                let mut scale = 0f64;
                for c in 0..cols {
                    let at = (n * blocks + c / BLOCK) * BLOCK_BYTES;
                    let dw = f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f64();
                    let wv = dw * bytes[at + 2 + c % BLOCK] as i8 as f64;
                    exact += wv * x[i * cols + c] as f64;
                    scale += (wv * 2.0).abs();
                }
                let err = (y[i * rows + n] as f64 - exact).abs();
                // Each input value off by at most half a step of max|x|/127 = 2/127.
                assert!(
                    err <= scale / 127.0,
                    "row {i} col {n}: {err} vs bound {}",
                    scale / 127.0
                );
            }
        }
    }

    #[test]
    fn stacking_concatenates_rows() {
        let (a, b) = (q8_bytes(20, 64, 1), q8_bytes(13, 64, 2));
        let stacked = Q8Matrix::stack(&[
            &Q8Matrix::from_q8_0(&a, 20, 64).unwrap(),
            &Q8Matrix::from_q8_0(&b, 13, 64).unwrap(),
        ])
        .unwrap();
        let mut bytes = Vec::new();
        stacked.append_q8_0(&mut bytes);
        assert_eq!(bytes, [a, b].concat());
        assert_eq!((stacked.rows(), stacked.cols), (33, 64));
        let other = Q8Matrix::from_q8_0(&q8_bytes(4, 32, 3), 4, 32).unwrap();
        assert!(Q8Matrix::stack(&[&stacked, &other]).is_none());
    }

    #[test]
    fn q4_0_and_q5_0_widen_to_the_same_values() {
        use candle_core::quantized::{GgmlDType, QStorage, QTensor};
        use candle_core::{Device, Tensor};
        let values: Vec<f32> = inputs(8, 64, 9);
        let dense = Tensor::from_vec(values, (8, 64), &Device::Cpu).unwrap();
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q5_0] {
            let q = QTensor::quantize(&dense, dtype).unwrap();
            let wide = widen_to_q8_0(dtype, &q.data().unwrap()).unwrap();
            let storage =
                QStorage::from_data(std::borrow::Cow::Owned(wide), &Device::Cpu, GgmlDType::Q8_0)
                    .unwrap();
            let q8 = QTensor::new(storage, (8, 64)).unwrap();
            let want = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            let got = q8
                .dequantize(&Device::Cpu)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            assert_eq!(got, want, "{dtype:?}");
        }
        assert!(widen_to_q8_0(GgmlDType::Q4K, &[0; 144]).is_none());
        assert!(widen_to_q8_0(GgmlDType::Q5_0, &[0; 21]).is_none());
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert_eq!(
            Q8Matrix::from_q8_0(&[], 2, 33).unwrap_err(),
            Q8Error::Width { cols: 33 }
        );
        assert!(matches!(
            Q8Matrix::from_q8_0(&[0; 34], 2, 32).unwrap_err(),
            Q8Error::Size { expected: 68, .. }
        ));
    }
}
