//! The CPU key/value cache and attention kernel.
//!
//! Each row (slot) keeps its keys and values in its own buffers, so a finished row is
//! dropped without moving the others: values token-major (`position x kv_heads x
//! head_dim`), keys transposed, per key/value head and dimension a run of positions
//! (`kv_heads x head_dim x capacity`), so that the scores of [`LANES`] consecutive
//! positions are one vector of multiply-adds. Attention runs one task per (token,
//! key/value head), for the query heads that share it: scores against exactly the row's
//! keys up to the token's own position, an exact two-pass softmax (max, then
//! exponentials and their sum), and the weighted sum of values. A score is the same
//! chain of multiply-adds over the head's dimensions whatever the position's place in
//! its run, and nothing depends on the other rows of the batch, on which tokens share
//! the step or on how the tasks are scheduled, so a row's output is the same bits alone,
//! in any batch, and after its prefix was copied in from another cache.
//!
//! The kernel is plain loops compiled once per CPU path ([`crate::cpu_path`]): for the
//! baseline target and, on x86-64, with AVX2 and FMA and with AVX-512 and FMA; the
//! cache runs the path it was made with. The generic copy may differ from the others in
//! the last bits (it does not fuse multiply-adds); the AVX2 and AVX-512 copies give the
//! same bits.

use candle_core::{Device, Storage, Tensor};
use rayon::prelude::*;

use super::{AttentionShape, StepRows};
use crate::cpu_path::{CpuPath, SupportedPath};
use crate::error::{OperatorError, Result};
use crate::vector_math::{exp, madd};

/// Positions scored together: 16 f32 fill one AVX-512 register or two AVX2 registers.
/// Key runs are allocated in whole multiples of it.
const LANES: usize = 16;

/// One row's keys and values for one layer.
#[derive(Debug, Default, Clone)]
struct RowKv {
    /// `[kv_head][dim][position]`, `capacity` positions per (head, dim); positions past
    /// `len` are zeros.
    kt: Vec<f32>,
    /// `[position][kv_head][dim]`.
    v: Vec<f32>,
    len: usize,
    capacity: usize,
}

impl RowKv {
    fn with_capacity(kv_dim: usize, capacity: usize) -> RowKv {
        let capacity = capacity.max(1).div_ceil(LANES) * LANES;
        RowKv {
            kt: vec![0.0; kv_dim * capacity],
            v: Vec::with_capacity(kv_dim * capacity),
            len: 0,
            capacity,
        }
    }

    /// Appends positions: `k` and `v` token-major, `kv_dim` values a position.
    fn push(&mut self, kv_dim: usize, k: &[f32], v: &[f32]) {
        let added = k.len() / kv_dim;
        if self.len + added > self.capacity {
            // Past the reserved room (a caller's estimate): move to twice the room.
            let mut grown = RowKv::with_capacity(kv_dim, (self.len + added).max(2 * self.capacity));
            for (i, run) in self.kt.chunks_exact(self.capacity).enumerate() {
                grown.kt[i * grown.capacity..][..self.len].copy_from_slice(&run[..self.len]);
            }
            grown.v = std::mem::take(&mut self.v);
            grown.len = self.len;
            *self = grown;
        }
        for (t, position) in k.chunks_exact(kv_dim).enumerate() {
            for (i, &x) in position.iter().enumerate() {
                self.kt[i * self.capacity + self.len + t] = x;
            }
        }
        self.v.extend_from_slice(v);
        self.len += added;
    }

    /// The keys token-major, as they came in.
    fn keys(&self, kv_dim: usize) -> Vec<f32> {
        let mut k = vec![0.0; self.len * kv_dim];
        for (i, run) in self.kt.chunks_exact(self.capacity).enumerate() {
            for (p, &x) in run[..self.len].iter().enumerate() {
                k[p * kv_dim + i] = x;
            }
        }
        k
    }
}

/// One row's keys and values in every layer, copied out of a cache to seed rows of
/// others (a shared prompt prefix).
#[derive(Debug, Clone)]
pub(crate) struct RowSnapshot {
    /// `[layer]` (keys, values), token-major as in the cache.
    layers: Vec<(Vec<f32>, Vec<f32>)>,
}

impl RowSnapshot {
    /// A snapshot of given layers, for tests of what holds snapshots.
    #[cfg(test)]
    pub fn for_tests(layers: Vec<(Vec<f32>, Vec<f32>)>) -> Self {
        RowSnapshot { layers }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|(k, v)| (k.len() + v.len()) * std::mem::size_of::<f32>())
            .sum()
    }
}

/// Keys and values of every row and layer, on the CPU.
pub(crate) struct CpuKvCache {
    shape: AttentionShape,
    /// `[layer][row]`.
    layers: Vec<Vec<RowKv>>,
    step: StepRows,
    /// For each packed token of the step: (row, index among the row's new tokens).
    token_rows: Vec<(usize, usize)>,
    /// Which compiled copy of the kernel runs.
    path: SupportedPath,
}

impl CpuKvCache {
    /// A cache for `capacity.len()` rows; row i reserves room for `capacity[i]` tokens
    /// (its prompt plus the most it may generate), so appends never reallocate. The
    /// kernel runs on `path`.
    pub fn new(shape: AttentionShape, capacity: &[usize], path: SupportedPath) -> Self {
        let kv_dim = shape.kv_heads * shape.head_dim;
        let layers = (0..shape.layers)
            .map(|_| {
                capacity
                    .iter()
                    .map(|&c| RowKv::with_capacity(kv_dim, c))
                    .collect()
            })
            .collect();
        CpuKvCache {
            shape,
            layers,
            step: StepRows { rows: vec![] },
            token_rows: vec![],
            path,
        }
    }

    pub fn begin_step(&mut self, step: &StepRows) -> Result<()> {
        let rows = self.layers.first().map_or(0, Vec::len);
        if step.rows.len() != rows {
            return Err(internal(format!(
                "a step of {} rows on a cache of {rows}",
                step.rows.len()
            )));
        }
        for (r, span) in step.rows.iter().enumerate() {
            let cached = self.layers[0][r].len;
            if cached != span.past {
                return Err(internal(format!(
                    "row {r} holds {cached} positions, the step says {}",
                    span.past
                )));
            }
        }
        self.token_rows = step
            .rows
            .iter()
            .enumerate()
            .flat_map(|(r, span)| (0..span.len).map(move |i| (r, i)))
            .collect();
        self.step = step.clone();
        Ok(())
    }

    pub fn attend(&mut self, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let AttentionShape {
            heads,
            kv_heads,
            head_dim: d,
            ..
        } = self.shape;
        let kv_dim = kv_heads * d;
        let tokens = self.token_rows.len();
        let row_kvs = &mut self.layers[layer];
        with_cpu_slice(k, |k| {
            with_cpu_slice(v, |v| {
                for (row, span) in row_kvs.iter_mut().zip(&self.step.rows) {
                    let range = span.start * kv_dim..(span.start + span.len) * kv_dim;
                    row.push(kv_dim, &k[range.clone()], &v[range]);
                }
            })
        })??;

        let row_kvs = &self.layers[layer];
        let group = heads / kv_heads;
        let scale = 1.0 / (d as f32).sqrt();
        let mut out = vec![0f32; tokens * heads * d];
        let path = self.path;
        with_cpu_slice(q, |q| {
            if q.len() != out.len() {
                return Err(internal(format!(
                    "queries of {} values for {tokens} tokens x {heads} heads x {d}",
                    q.len()
                )));
            }
            // One task per (token, key/value head): the group of query heads reading
            // that head, whose queries and outputs are contiguous.
            out.par_chunks_mut(group * d).enumerate().for_each_init(
                Vec::new,
                |scores, (task, out)| {
                    let (token, kv_head) = (task / kv_heads, task % kv_heads);
                    let (row, i) = self.token_rows[token];
                    let span = self.step.rows[row];
                    let kv = &row_kvs[row];
                    let q = &q[task * group * d..(task + 1) * group * d];
                    let keys = Keys {
                        kt: &kv.kt[kv_head * d * kv.capacity..(kv_head + 1) * d * kv.capacity],
                        capacity: kv.capacity,
                        v: &kv.v,
                        count: span.past + i + 1,
                        stride: kv_dim,
                        offset: kv_head * d,
                    };
                    attend_group(path, q, &keys, scale, scores, out);
                },
            );
            Ok(())
        })??;
        Ok(Tensor::from_vec(out, (tokens, heads * d), &Device::Cpu)?)
    }

    /// Row `slot`'s keys and values of every layer, copied out.
    pub fn snapshot(&self, slot: usize) -> Result<RowSnapshot> {
        let kv_dim = self.shape.kv_heads * self.shape.head_dim;
        let layers = self
            .layers
            .iter()
            .map(|rows| {
                rows.get(slot)
                    .map(|kv| (kv.keys(kv_dim), kv.v.clone()))
                    .ok_or_else(|| internal(format!("no row {slot} to copy")))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(RowSnapshot { layers })
    }

    /// Fills the empty row `slot` with `snapshot`'s keys and values: the row then holds
    /// its positions, as if its tokens had been run in it.
    pub fn seed(&mut self, slot: usize, snapshot: &RowSnapshot) -> Result<()> {
        if snapshot.layers.len() != self.layers.len() {
            return Err(internal(format!(
                "a snapshot of {} layers for a cache of {}",
                snapshot.layers.len(),
                self.layers.len()
            )));
        }
        let kv_dim = self.shape.kv_heads * self.shape.head_dim;
        for (rows, (k, v)) in self.layers.iter_mut().zip(&snapshot.layers) {
            let row = rows
                .get_mut(slot)
                .ok_or_else(|| internal(format!("no row {slot} to seed")))?;
            if row.len != 0 {
                return Err(internal(format!("row {slot} is not empty")));
            }
            row.push(kv_dim, k, v);
        }
        Ok(())
    }

    pub fn retain(&mut self, keep: &[usize]) {
        for rows in &mut self.layers {
            let mut old: Vec<Option<RowKv>> = rows.drain(..).map(Some).collect();
            *rows = keep
                .iter()
                .filter_map(|&r| old.get_mut(r).and_then(Option::take))
                .collect();
        }
    }
}

fn internal(message: String) -> OperatorError {
    OperatorError::Candle(candle_core::Error::Msg(format!(
        "key/value cache: {message} (a bug)"
    )))
}

/// Runs `f` on the contiguous f32 data of a CPU tensor, without copying it when it is
/// contiguous already.
pub(crate) fn with_cpu_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Err(internal(format!(
            "a {:?} tensor on the CPU path",
            t.device()
        )));
    };
    let data = cpu.as_slice::<f32>()?;
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| internal("a non-contiguous tensor after contiguous()".into()))?;
    Ok(f(&data[start..end]))
}

/// The keys and values one task may see: positions `0..count` of one key/value head,
/// the keys transposed (`kt[dim * capacity + position]`), the values token-major (`d`
/// floats at `position * stride + offset`).
struct Keys<'a> {
    kt: &'a [f32],
    capacity: usize,
    v: &'a [f32],
    count: usize,
    stride: usize,
    offset: usize,
}

/// The attention output of a group of query heads (`q`, `out`: `group x d` floats) over
/// one key/value head, with the copy of the kernel compiled for `path`: the kernel's one
/// dispatch point.
fn attend_group(
    path: SupportedPath,
    q: &[f32],
    keys: &Keys,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    match path.path() {
        #[cfg(target_arch = "x86_64")]
        CpuPath::Avx512 => {
            // SAFETY: a SupportedPath holds Avx512 only when CpuPath::check detected
            // avx512f, avx512vl, avx2 and fma on this CPU: every feature of this copy.
            unsafe { attend_group_avx512(q, keys, scale, scores, out) }
        }
        #[cfg(target_arch = "x86_64")]
        CpuPath::Avx2 => {
            // SAFETY: a SupportedPath holds Avx2 only when CpuPath::check detected avx2
            // and fma on this CPU: every feature of this copy.
            unsafe { attend_group_avx2(q, keys, scale, scores, out) }
        }
        _ => attend_group_portable::<false>(q, keys, scale, scores, out),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
fn attend_group_avx512(q: &[f32], keys: &Keys, scale: f32, scores: &mut Vec<f32>, out: &mut [f32]) {
    attend_group_portable::<true>(q, keys, scale, scores, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn attend_group_avx2(q: &[f32], keys: &Keys, scale: f32, scores: &mut Vec<f32>, out: &mut [f32]) {
    attend_group_portable::<true>(q, keys, scale, scores, out)
}

/// Runs of positions scored at once: four independent chains of multiply-adds, enough
/// to hide their latency.
const RUNS_AT_ONCE: usize = 4;
/// Output dimensions summed at once: four AVX-512 registers of running sums.
const DIMS_AT_ONCE: usize = 64;

/// Per query head: every score a chain of multiply-adds over the dimensions in order
/// ([`LANES`] positions at once, the same chain in every lane), times the scale; the
/// softmax's max, its exponentials ([`exp`]) summed in [`LANES`] partial sums by
/// position modulo [`LANES`], combined in lane order; the output the weighted values
/// summed in position order.
#[inline(always)]
fn attend_group_portable<const F: bool>(
    q: &[f32],
    keys: &Keys,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let d = keys.kt.len() / keys.capacity;
    let runs = keys.count.div_ceil(LANES);
    scores.clear();
    scores.resize(runs * LANES, 0.0);
    for (qh, out) in q.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let mut run = 0;
        while run + RUNS_AT_ONCE <= runs {
            let mut acc = [[0f32; LANES]; RUNS_AT_ONCE];
            for (j, &x) in qh.iter().enumerate() {
                let k = &keys.kt[j * keys.capacity + run * LANES..][..RUNS_AT_ONCE * LANES];
                for (r, acc) in acc.iter_mut().enumerate() {
                    for l in 0..LANES {
                        acc[l] = madd::<F>(x, k[r * LANES + l], acc[l]);
                    }
                }
            }
            let s = &mut scores[run * LANES..(run + RUNS_AT_ONCE) * LANES];
            for (r, acc) in acc.iter().enumerate() {
                for l in 0..LANES {
                    s[r * LANES + l] = acc[l] * scale;
                }
            }
            run += RUNS_AT_ONCE;
        }
        for run in run..runs {
            let mut acc = [0f32; LANES];
            for (j, &x) in qh.iter().enumerate() {
                let k = &keys.kt[j * keys.capacity + run * LANES..][..LANES];
                for l in 0..LANES {
                    acc[l] = madd::<F>(x, k[l], acc[l]);
                }
            }
            let s = &mut scores[run * LANES..(run + 1) * LANES];
            for l in 0..LANES {
                s[l] = acc[l] * scale;
            }
        }
        let max = scores[..keys.count]
            .iter()
            .fold(f32::NEG_INFINITY, |m, &s| m.max(s));
        let mut sums = [0f32; LANES];
        for (run, s) in scores.chunks_exact_mut(LANES).enumerate() {
            for l in 0..LANES {
                // Positions past the query's own are not its keys: weight 0, and adding
                // +0 leaves a partial sum's bits as they are.
                let e = if run * LANES + l < keys.count {
                    exp::<F>(s[l] - max)
                } else {
                    0.0
                };
                s[l] = e;
                sums[l] += e;
            }
        }
        let inv = 1.0 / sums.iter().fold(0f32, |a, &b| a + b);
        for s in scores.iter_mut() {
            *s *= inv;
        }
        let weights = &scores[..keys.count];
        let mut dims = 0;
        while dims + DIMS_AT_ONCE <= d {
            let mut acc = [0f32; DIMS_AT_ONCE];
            for (p, &w) in weights.iter().enumerate() {
                let v = &keys.v[p * keys.stride + keys.offset + dims..][..DIMS_AT_ONCE];
                for i in 0..DIMS_AT_ONCE {
                    acc[i] = madd::<F>(w, v[i], acc[i]);
                }
            }
            out[dims..dims + DIMS_AT_ONCE].copy_from_slice(&acc);
            dims += DIMS_AT_ONCE;
        }
        while dims < d {
            let width = (d - dims).min(LANES);
            let mut acc = [0f32; LANES];
            for (p, &w) in weights.iter().enumerate() {
                let v = &keys.v[p * keys.stride + keys.offset + dims..][..width];
                for i in 0..width {
                    acc[i] = madd::<F>(w, v[i], acc[i]);
                }
            }
            out[dims..dims + width].copy_from_slice(&acc[..width]);
            dims += width;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::attention::StepRows;

    /// softmax(q k^T / sqrt(d)) v in f64, for one query against `keys` / `values`.
    fn reference(q: &[f32], keys: &[Vec<f32>], values: &[Vec<f32>]) -> Vec<f64> {
        let d = q.len() as f64;
        let s: Vec<f64> = keys
            .iter()
            .map(|k| {
                q.iter()
                    .zip(k)
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum::<f64>()
                    / d.sqrt()
            })
            .collect();
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
        let z: f64 = e.iter().sum();
        (0..q.len())
            .map(|j| e.iter().zip(values).map(|(w, v)| w / z * v[j] as f64).sum())
            .collect()
    }

    fn ramp(n: usize, seed: f32) -> Vec<f32> {
        (0..n).map(|i| (i as f32 * 0.37 + seed).sin()).collect()
    }

    #[test]
    fn grouped_causal_attention_matches_the_formula() {
        for path in SupportedPath::all_supported() {
            check_formula(path);
        }
    }

    fn check_formula(path: SupportedPath) {
        // 2 query heads over 1 kv head, d = 4; one row with a 3-token prompt.
        let shape = AttentionShape {
            heads: 2,
            kv_heads: 1,
            head_dim: 4,
            layers: 1,
        };
        let mut cache = CpuKvCache::new(shape, &[8], path);
        let q = ramp(3 * 8, 0.1);
        let k = ramp(3 * 4, 0.7);
        let v = ramp(3 * 4, 1.3);
        let step = StepRows::pack([(0, 3)]);
        cache.begin_step(&step).unwrap();
        let t = |x: &Vec<f32>, w| Tensor::from_vec(x.clone(), (3, w), &Device::Cpu).unwrap();
        let out = cache.attend(0, &t(&q, 8), &t(&k, 4), &t(&v, 4)).unwrap();
        let out: Vec<f32> = out.flatten_all().unwrap().to_vec1().unwrap();
        let kr: Vec<Vec<f32>> = k.chunks(4).map(|c| c.to_vec()).collect();
        let vr: Vec<Vec<f32>> = v.chunks(4).map(|c| c.to_vec()).collect();
        for tok in 0..3 {
            for head in 0..2 {
                let qv = &q[tok * 8 + head * 4..tok * 8 + head * 4 + 4];
                let want = reference(qv, &kr[..=tok], &vr[..=tok]);
                let got = &out[tok * 8 + head * 4..tok * 8 + head * 4 + 4];
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (*g as f64 - w).abs() < 1e-6,
                        "token {tok} head {head}: {got:?} vs {want:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_row_gives_the_same_bits_alone_and_in_a_batch() {
        for path in SupportedPath::all_supported() {
            check_batch_invariance(path);
        }
    }

    fn check_batch_invariance(path: SupportedPath) {
        let shape = AttentionShape {
            heads: 4,
            kv_heads: 2,
            head_dim: 32,
            layers: 1,
        };
        let width_q = 4 * 32;
        let width_kv = 2 * 32;
        let run = |rows: &[(usize, f32)]| {
            let mut cache = CpuKvCache::new(shape, &vec![64; rows.len()], path);
            let step = StepRows::pack(rows.iter().map(|&(n, _)| (0, n)));
            cache.begin_step(&step).unwrap();
            let cat = |w: usize, s: f32| -> Tensor {
                let data: Vec<f32> = rows
                    .iter()
                    .flat_map(|&(n, seed)| ramp(n * w, seed + s))
                    .collect();
                Tensor::from_vec(data, (step.tokens(), w), &Device::Cpu).unwrap()
            };
            let out = cache
                .attend(
                    0,
                    &cat(width_q, 0.0),
                    &cat(width_kv, 1.0),
                    &cat(width_kv, 2.0),
                )
                .unwrap();
            out.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        let alone = run(&[(17, 0.5)]);
        let batched = run(&[(5, 0.1), (17, 0.5), (30, 0.9)]);
        let offset = 5 * width_q;
        assert_eq!(alone, batched[offset..offset + 17 * width_q].to_vec());
    }

    #[test]
    fn a_row_gives_the_same_bits_whatever_its_steps_and_room() {
        // 37 tokens in one step into room for all of them, against 20 + 1 + 16 tokens
        // in three steps into room for 3 (grown twice on the way) and against the first
        // 20 copied in from another cache: the last 17 tokens' outputs are the same bits.
        let shape = AttentionShape {
            heads: 6,
            kv_heads: 2,
            head_dim: 24,
            layers: 1,
        };
        let (wq, wkv) = (6 * 24, 2 * 24);
        let (q, k, v) = (ramp(37 * wq, 0.2), ramp(37 * wkv, 0.6), ramp(37 * wkv, 1.1));
        let t = |x: &[f32], from: usize, to: usize, w: usize| {
            Tensor::from_vec(x[from * w..to * w].to_vec(), (to - from, w), &Device::Cpu).unwrap()
        };
        let step = |cache: &mut CpuKvCache, from: usize, to: usize| {
            cache
                .begin_step(&StepRows::pack([(from, to - from)]))
                .unwrap();
            let out = cache
                .attend(
                    0,
                    &t(&q, from, to, wq),
                    &t(&k, from, to, wkv),
                    &t(&v, from, to, wkv),
                )
                .unwrap();
            out.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        for path in SupportedPath::all_supported() {
            let mut whole = CpuKvCache::new(shape, &[37], path);
            let want = step(&mut whole, 0, 37)[20 * wq..].to_vec();
            let mut split = CpuKvCache::new(shape, &[3], path);
            step(&mut split, 0, 20);
            let mut got = step(&mut split, 20, 21);
            got.extend(step(&mut split, 21, 37));
            assert_eq!(got, want, "{:?}: steps", path.path());
            let mut first = CpuKvCache::new(shape, &[20], path);
            step(&mut first, 0, 20);
            let mut seeded = CpuKvCache::new(shape, &[40], path);
            seeded.seed(0, &first.snapshot(0).unwrap()).unwrap();
            assert_eq!(step(&mut seeded, 20, 37), want, "{:?}: seeded", path.path());
            assert_eq!(seeded.layers[0][0].keys(wkv), k);
        }
    }

    #[test]
    fn retain_keeps_the_listed_rows_in_order() {
        let shape = AttentionShape {
            heads: 1,
            kv_heads: 1,
            head_dim: 2,
            layers: 1,
        };
        let mut cache = CpuKvCache::new(shape, &[4, 4, 4], SupportedPath::best());
        let step = StepRows::pack([(0, 1), (0, 1), (0, 1)]);
        cache.begin_step(&step).unwrap();
        let x = Tensor::from_vec(vec![0f32, 0., 1., 1., 2., 2.], (3, 2), &Device::Cpu).unwrap();
        cache.attend(0, &x, &x, &x).unwrap();
        cache.retain(&[2, 0]);
        assert_eq!(cache.layers[0][0].keys(2), vec![2., 2.]);
        assert_eq!(cache.layers[0][1].keys(2), vec![0., 0.]);
        // The next step must describe the two rows left, at their lengths.
        assert!(cache.begin_step(&StepRows::pack([(1, 1), (1, 1)])).is_ok());
        assert!(cache.begin_step(&StepRows::pack([(0, 1), (1, 1)])).is_err());
    }

    /// Every path this CPU runs against the generic path, on 64-wide heads (four lane
    /// groups) and 1 to 40 visible positions, inputs in [-1, 1]. Tolerance 1e-5
    /// absolute: the copies differ only in fused or separate multiply-adds, so each dot
    /// product differs by at most a few roundings of its running sums (|q . k| <= 64 here,
    /// ulp 7.6e-6 at 64, times the 1/8 scale: ~1e-6 per rounding, a few of them at worst
    /// in the largest score); softmax passes score differences on as relative weight
    /// differences of the same size, and the output (|out| <= 1) moves by no more. The
    /// AVX2 and AVX-512 copies run the same operations in the same order: exact.
    #[test]
    fn every_path_matches_the_generic_path() {
        let shape = AttentionShape {
            heads: 2,
            kv_heads: 1,
            head_dim: 64,
            layers: 1,
        };
        let tokens = 40;
        let run = |path: SupportedPath| {
            let mut cache = CpuKvCache::new(shape, &[tokens], path);
            cache.begin_step(&StepRows::pack([(0, tokens)])).unwrap();
            let t = |w: usize, seed: f32| {
                Tensor::from_vec(ramp(tokens * w, seed), (tokens, w), &Device::Cpu).unwrap()
            };
            let out = cache
                .attend(0, &t(128, 0.3), &t(64, 0.9), &t(64, 1.7))
                .unwrap();
            out.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        let generic = run(SupportedPath::GENERIC);
        let mut by_path = Vec::new();
        for path in SupportedPath::all_supported() {
            let got = run(path);
            for (i, (g, w)) in got.iter().zip(&generic).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-5,
                    "{:?}[{i}]: {g} vs generic {w}",
                    path.path()
                );
            }
            by_path.push((path.path(), got));
        }
        let avx2 = by_path.iter().find(|(p, _)| *p == CpuPath::Avx2);
        let avx512 = by_path.iter().find(|(p, _)| *p == CpuPath::Avx512);
        if let (Some((_, a)), Some((_, b))) = (avx2, avx512) {
            assert!(a == b, "the AVX2 and AVX-512 copies differ");
        }
    }
}
