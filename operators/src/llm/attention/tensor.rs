//! The device-generic key/value cache: padded rows, a growing cache tensor and an
//! additive mask, built from candle operations only (so it runs on CUDA; on the CPU
//! [`super::cpu`] is faster and batch-independent).
//!
//! Each step's new tokens are placed at the right end of `width` columns (the most new
//! tokens of any row), left-padded with zero vectors; the cache grows by `width` columns
//! for every row. A boolean per (row, column) records which columns hold the row's
//! tokens, and the mask lets a query see exactly those at or before its own column. A
//! padding query sees only its own column, so no softmax row is empty (and nothing turns
//! into NaN); its output is discarded.

use candle_core::{Device, Tensor};

use super::{AttentionShape, StepRows};
use crate::error::{OperatorError, Result};

/// The per-step geometry shared by every layer.
struct StepGeometry {
    /// Columns of the step (the most new tokens of any row).
    width: usize,
    /// For each padded slot (row-major, `rows x width`), the packed token it holds, or
    /// the extra zero row (index T) for padding.
    gather: Tensor,
    /// For each packed token, its padded slot.
    scatter: Tensor,
    /// `(rows, 1, 1, width, columns)`: 0 where a query may look, -inf elsewhere.
    mask: Tensor,
}

/// Keys and values of every row and layer as `(rows, kv_heads, columns, head_dim)`
/// tensors on the model's device.
pub(crate) struct TensorKvCache {
    shape: AttentionShape,
    device: Device,
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// `valid[row][column]`: the column holds one of the row's tokens.
    valid: Vec<Vec<bool>>,
    step: Option<StepGeometry>,
}

fn internal(message: String) -> OperatorError {
    OperatorError::Candle(candle_core::Error::Msg(format!(
        "key/value cache: {message} (a bug)"
    )))
}

impl TensorKvCache {
    pub fn new(shape: AttentionShape, rows: usize, device: &Device) -> Self {
        TensorKvCache {
            shape,
            device: device.clone(),
            layers: vec![None; shape.layers],
            valid: vec![Vec::new(); rows],
            step: None,
        }
    }

    pub fn begin_step(&mut self, step: &StepRows) -> Result<()> {
        let rows = step.rows.len();
        if rows != self.valid.len() {
            return Err(internal(format!(
                "a step of {rows} rows on a cache of {}",
                self.valid.len()
            )));
        }
        let columns = self.valid.first().map_or(0, Vec::len);
        let tokens = step.tokens();
        let width = step.rows.iter().map(|r| r.len).max().unwrap_or(0);
        let mut gather = vec![tokens as u32; rows * width];
        let mut scatter = vec![0u32; tokens];
        for (r, span) in step.rows.iter().enumerate() {
            let held = self.valid[r].iter().filter(|v| **v).count();
            if held != span.past {
                return Err(internal(format!(
                    "row {r} holds {held} positions, the step says {}",
                    span.past
                )));
            }
            let pad = width - span.len;
            for i in 0..span.len {
                gather[r * width + pad + i] = (span.start + i) as u32;
                scatter[span.start + i] = (r * width + pad + i) as u32;
            }
            self.valid[r].extend((0..width).map(|j| j >= pad));
        }
        let total = columns + width;
        let mut mask = vec![f32::NEG_INFINITY; rows * width * total];
        for r in 0..rows {
            let pad = width - step.rows[r].len;
            for j in 0..width {
                let line = &mut mask[(r * width + j) * total..(r * width + j + 1) * total];
                if j < pad {
                    line[columns + j] = 0.0;
                    continue;
                }
                for (c, m) in line.iter_mut().enumerate().take(columns + j + 1) {
                    if self.valid[r][c] {
                        *m = 0.0;
                    }
                }
            }
        }
        let dev = &self.device;
        self.step = Some(StepGeometry {
            width,
            gather: Tensor::from_vec(gather, rows * width, dev)?,
            scatter: Tensor::from_vec(scatter, tokens, dev)?,
            mask: Tensor::from_vec(mask, (rows, 1, 1, width, total), dev)?,
        });
        Ok(())
    }

    /// `(T, heads x d)` packed rows to `(rows, heads, width, d)` padded ones.
    fn pad(&self, x: &Tensor, heads: usize, geometry: &StepGeometry) -> Result<Tensor> {
        let d = self.shape.head_dim;
        let rows = self.valid.len();
        let zero = Tensor::zeros((1, heads * d), x.dtype(), x.device())?;
        let x = Tensor::cat(&[x, &zero], 0)?.index_select(&geometry.gather, 0)?;
        Ok(x.reshape((rows, geometry.width, heads, d))?
            .transpose(1, 2)?
            .contiguous()?)
    }

    pub fn attend(&mut self, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let AttentionShape {
            heads,
            kv_heads,
            head_dim: d,
            ..
        } = self.shape;
        let geometry = self
            .step
            .as_ref()
            .ok_or_else(|| internal("attend before begin_step".into()))?;
        let rows = self.valid.len();
        let width = geometry.width;
        let group = heads / kv_heads;
        let q = self.pad(q, heads, geometry)?;
        let k = self.pad(k, kv_heads, geometry)?;
        let v = self.pad(v, kv_heads, geometry)?;
        let (k, v) = match self.layers[layer].take() {
            Some((kc, vc)) => (Tensor::cat(&[&kc, &k], 2)?, Tensor::cat(&[&vc, &v], 2)?),
            None => (k, v),
        };
        let columns = k.dim(2)?;
        let q = q.reshape((rows, kv_heads, group * width, d))?;
        let scores = (q.matmul(&k.t()?)? * (1.0 / (d as f64).sqrt()))?;
        let scores = scores
            .reshape((rows, kv_heads, group, width, columns))?
            .broadcast_add(&geometry.mask)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.reshape((
            rows,
            kv_heads,
            group * width,
            columns,
        ))?;
        let out = probs
            .matmul(&v)?
            .reshape((rows, heads, width, d))?
            .transpose(1, 2)?
            .reshape((rows * width, heads * d))?
            .index_select(&geometry.scatter, 0)?;
        self.layers[layer] = Some((k, v));
        Ok(out)
    }

    pub fn retain(&mut self, keep: &[usize]) -> Result<()> {
        let index: Vec<u32> = keep.iter().map(|&r| r as u32).collect();
        let index = Tensor::from_vec(index, keep.len(), &self.device)?;
        for layer in &mut self.layers {
            if let Some((k, v)) = layer.take() {
                *layer = Some((k.index_select(&index, 0)?, v.index_select(&index, 0)?));
            }
        }
        self.valid = keep.iter().map(|&r| self.valid[r].clone()).collect();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::attention::cpu::CpuKvCache;

    fn ramp(n: usize, seed: f32) -> Vec<f32> {
        (0..n).map(|i| (i as f32 * 0.61 + seed).cos()).collect()
    }

    /// Padded attention over two rows of different lengths, a prefill and two decode
    /// steps with a row dropped between them, equals the CPU kernel (to rounding).
    #[test]
    fn padded_attention_equals_the_cpu_kernel() {
        let shape = AttentionShape {
            heads: 4,
            kv_heads: 2,
            head_dim: 8,
            layers: 1,
        };
        let mut padded = TensorKvCache::new(shape, 3, &Device::Cpu);
        let mut direct =
            CpuKvCache::new(shape, &[32, 32, 32], crate::cpu_path::SupportedPath::best());
        // (rows as (past, new), rows kept after the step)
        type Step = (Vec<(usize, usize)>, Option<Vec<usize>>);
        let steps: Vec<Step> = vec![
            (vec![(0, 3), (0, 7), (0, 1)], None),
            (vec![(3, 1), (7, 1), (1, 1)], Some(vec![0, 2])),
            (vec![(4, 1), (2, 1)], None),
        ];
        for (s, (rows, drop_after)) in steps.into_iter().enumerate() {
            let step = StepRows::pack(rows);
            let t = step.tokens();
            let make = |w: usize, seed: f32| {
                Tensor::from_vec(ramp(t * w, seed + s as f32), (t, w), &Device::Cpu).unwrap()
            };
            let (q, k, v) = (make(32, 0.0), make(16, 0.3), make(16, 0.7));
            padded.begin_step(&step).unwrap();
            direct.begin_step(&step).unwrap();
            let a: Vec<f32> = padded
                .attend(0, &q, &k, &v)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let b: Vec<f32> = direct
                .attend(0, &q, &k, &v)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() < 1e-5, "step {s}: {x} vs {y}");
            }
            if let Some(keep) = drop_after {
                padded.retain(&keep).unwrap();
                direct.retain(&keep);
            }
        }
    }
}
