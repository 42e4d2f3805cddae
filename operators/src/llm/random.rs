//! Random decoder models as GGUF files, for tests and speed checks: any shape (a
//! Qwen2.5-0.5B-shaped one for throughput), any storage type candle can quantize to,
//! weights drawn from our own seeded generator so that the same seed gives the same
//! file everywhere. They compute nothing meaningful; they have a real model's arithmetic.

use std::path::Path;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use super::sampling::SplitMix64;
use crate::error::{OperatorError, Result};

/// Half-width of the uniform distribution of every weight (norm weights are 1 plus such
/// a draw): wide enough that logits differ between tokens, small enough that 24 layers
/// do not overflow.
pub const WEIGHT_SCALE: f32 = 0.1;

/// The architecture of a random `qwen2` model (q/k/v biases, tied embeddings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RandomShape {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub vocab: usize,
}

impl RandomShape {
    /// Qwen2.5-0.5B's configuration (config.json of Qwen/Qwen2.5-0.5B-Instruct).
    pub const QWEN2_5_0_5B: RandomShape = RandomShape {
        hidden: 896,
        intermediate: 4864,
        layers: 24,
        heads: 14,
        kv_heads: 2,
        vocab: 151_936,
    };
}

/// Writes a random `qwen2` GGUF of `shape` to `path`, its matrices stored as `dtype` (the
/// same weights before quantization for the same seed, whatever `dtype`), vectors in
/// f32. A `dtype` with blocks needs every matrix's row length to be a multiple of its
/// block size (32 for Q8_0, 256 for the K types).
pub fn write_random_gguf(
    path: &Path,
    shape: &RandomShape,
    dtype: GgmlDType,
    seed: u64,
) -> Result<()> {
    let mut rng = SplitMix64::new(seed);
    let mut random = |dims: &[usize], around: f32| -> Result<Tensor> {
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| around + (2.0 * rng.next_f64() as f32 - 1.0) * WEIGHT_SCALE)
            .collect();
        Ok(Tensor::from_vec(v, dims, &Device::Cpu)?)
    };
    let d = shape.hidden / shape.heads.max(1);
    let (h, kv) = (shape.hidden, shape.kv_heads * d);
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut vectors: Vec<(String, QTensor)> = Vec::new();
    tensors.push((
        "token_embd.weight".into(),
        QTensor::quantize(&random(&[shape.vocab, h], 0.0)?, dtype)?,
    ));
    vectors.push((
        "output_norm.weight".into(),
        QTensor::quantize(&random(&[h], 1.0)?, GgmlDType::F32)?,
    ));
    for l in 0..shape.layers {
        for (name, dims) in [
            ("attn_q", [h, h]),
            ("attn_k", [kv, h]),
            ("attn_v", [kv, h]),
            ("attn_output", [h, h]),
            ("ffn_gate", [shape.intermediate, h]),
            ("ffn_up", [shape.intermediate, h]),
            ("ffn_down", [h, shape.intermediate]),
        ] {
            let w = QTensor::quantize(&random(&dims, 0.0)?, dtype)?;
            tensors.push((format!("blk.{l}.{name}.weight"), w));
        }
        for (name, len, around) in [
            ("attn_q.bias", h, 0.0),
            ("attn_k.bias", kv, 0.0),
            ("attn_v.bias", kv, 0.0),
            ("attn_norm.weight", h, 1.0),
            ("ffn_norm.weight", h, 1.0),
        ] {
            let v = QTensor::quantize(&random(&[len], around)?, GgmlDType::F32)?;
            vectors.push((format!("blk.{l}.{name}"), v));
        }
    }
    tensors.extend(vectors);
    use gguf_file::Value as V;
    let u32 = |x: usize| V::U32(x as u32);
    let meta: Vec<(&str, V)> = vec![
        ("general.architecture", V::String("qwen2".into())),
        ("general.name", V::String("random".into())),
        ("qwen2.embedding_length", u32(h)),
        ("qwen2.feed_forward_length", u32(shape.intermediate)),
        ("qwen2.block_count", u32(shape.layers)),
        ("qwen2.attention.head_count", u32(shape.heads)),
        ("qwen2.attention.head_count_kv", u32(shape.kv_heads)),
        ("qwen2.attention.layer_norm_rms_epsilon", V::F32(1e-6)),
        ("qwen2.rope.freq_base", V::F32(1e6)),
        ("qwen2.context_length", u32(32768)),
    ];
    let meta: Vec<(&str, &V)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let io = |source| OperatorError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).map_err(io)?);
    gguf_file::write(&mut file, &meta, &tensors)?;
    std::io::Write::flush(&mut file).map_err(io)?;
    Ok(())
}
