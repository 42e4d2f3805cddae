//! Where a decoder's weights come from: safetensors (one file or shards listed by
//! `model.safetensors.index.json`) or a GGUF file, behind one interface that hands out
//! shape-checked layers.
//!
//! Tensors are asked for by their Hugging Face names (`model.layers.3.mlp.up_proj.weight`);
//! a GGUF source translates them to llama.cpp's (`blk.3.ffn_up.weight`). Every error
//! names the file and the tensor. Safetensors weights (f32, f16 or bf16) become f32
//! dense matrices, and so do GGUF f32/f16/bf16 ones. Quantized GGUF matrices: on the
//! CPU every one becomes Q8_0 tiles multiplied by [`Q8Matrix::product`] (Q8_0 as
//! stored, Q4_0 and Q5_0 widened to Q8_0 exactly; Q4_K, Q5_K, Q6_K, Q4_1, Q5_1, ...
//! dequantized and quantized again to Q8_0, 8.5 bits per weight, which holds what the
//! file holds to within a 254th of each block's largest value); on a GPU they stay in
//! their stored type for candle's kernels. The quantized
//! embedding table stays in its stored type and, tied, serves as the output projection
//! through candle's tiled kernels: on the CPU a Q8_0 table whose width is not a multiple
//! of [`TILED_WIDTH`] gets zero blocks appended to every row (and its inputs zero
//! columns), which leaves the product unchanged (see [`pad_for_tiles`]).

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use super::attention::cpu::with_cpu_slice;
use super::q8_product::{widen_to_q8_0, Q8Matrix};
use crate::cpu_path::SupportedPath;
use crate::error::{OperatorError, Result};

/// A linear layer `y = x W^T + b` whose `W` is dense f32 or quantized.
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    weight: Matrix,
    bias: Option<Tensor>,
    out_features: usize,
    /// The width of the inputs; a candle weight may be wider (zero columns, see
    /// [`pad_for_tiles`]), in which case inputs are widened with zeros to match.
    in_features: usize,
}

/// A weight matrix in the form its device multiplies.
#[derive(Debug, Clone)]
enum Matrix {
    /// Dense f32 anywhere; quantized on a GPU; and, on the CPU, the tied output
    /// projection (candle's tiled kernels over the padded embedding table).
    Candle(QMatMul),
    /// Quantized, on the CPU: Q8_0 tiles multiplied by [`Q8Matrix::product`], whatever
    /// the file's type (see [`Weights::linear`]).
    Q8 {
        matrix: Arc<Q8Matrix>,
        /// The file's type, for reports.
        stored: GgmlDType,
    },
}

impl Linear {
    /// `x` is `(T, in)`; the result `(T, out)`. The arithmetic of a row depends on the
    /// row only, never on the other rows (see [`dense_product`] and [`Q8Matrix`]); the
    /// CPU kernels run on `path`.
    pub fn forward(&self, x: &Tensor, path: SupportedPath) -> Result<Tensor> {
        let y = match &self.weight {
            Matrix::Q8 { matrix, .. } if x.device().is_cpu() => {
                let rows = x.dim(0)?;
                let mut y = vec![0f32; rows * matrix.rows()];
                with_cpu_slice(x, |x| matrix.product(path, x, rows, &mut y))?;
                Tensor::from_vec(y, (rows, matrix.rows()), x.device())?
            }
            Matrix::Q8 { .. } => {
                return Err(OperatorError::Candle(candle_core::Error::Msg(format!(
                    "a CPU weight given a {:?} input (a bug)",
                    x.device()
                ))))
            }
            Matrix::Candle(QMatMul::Tensor(w)) => dense_product(x, w)?,
            Matrix::Candle(weight) => {
                let width = match weight {
                    QMatMul::QTensor(q) => q.shape().dims()[1],
                    _ => self.in_features,
                };
                if width > self.in_features {
                    let zeros = Tensor::zeros(
                        (x.dim(0)?, width - self.in_features),
                        x.dtype(),
                        x.device(),
                    )?;
                    weight.forward(&Tensor::cat(&[x, &zeros], 1)?)?
                } else {
                    weight.forward(x)?
                }
            }
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// The stored type of the weight: `None` for dense f32.
    pub fn quantization(&self) -> Option<GgmlDType> {
        match &self.weight {
            Matrix::Candle(QMatMul::QTensor(q)) => Some(q.dtype()),
            Matrix::Candle(_) => None,
            Matrix::Q8 { stored, .. } => Some(*stored),
        }
    }
}

/// `x W^T` for a dense `W` (`out x in`). gemm multiplies a single row with a vector
/// kernel whose sums round differently from its matrix kernel, which gives every row the
/// same bits whatever the number of rows (checked from 2 to 512): a lone row is
/// therefore multiplied as two copies, so that a request's logits do not depend on
/// whether other rows share its step.
fn dense_product(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if x.dim(0)? == 1 {
        let pair = Tensor::cat(&[x, x], 0)?;
        return Ok(pair.matmul(&w.t()?)?.narrow(0, 0, 1)?);
    }
    Ok(x.matmul(&w.t()?)?)
}

/// Linear layers over the same input computed as one product (`q`, `k`, `v`; `gate`,
/// `up`): their weights stacked row-wise, so one pass reads the input once and, on the
/// CPU, one synchronisation of the thread pool replaces several. Layers whose weights
/// cannot be stacked (different quantizations, as Q4_K_M files mix) stay separate.
#[derive(Debug, Clone)]
pub(crate) enum Projections {
    Fused { linear: Linear, widths: Vec<usize> },
    Separate(Vec<Linear>),
}

impl Projections {
    /// Stacks `parts` when they share an input width, a storage type and the presence of
    /// a bias.
    pub fn new(parts: Vec<Linear>) -> Result<Self> {
        let widths: Vec<usize> = parts.iter().map(|p| p.out_features).collect();
        let same_bias =
            parts.iter().all(|p| p.bias.is_some()) || parts.iter().all(|p| p.bias.is_none());
        let stacked = if same_bias { stack(&parts)? } else { None };
        Ok(match stacked {
            Some(weight) => {
                let bias = if parts[0].bias.is_some() {
                    let biases: Vec<&Tensor> =
                        parts.iter().filter_map(|p| p.bias.as_ref()).collect();
                    Some(Tensor::cat(&biases, 0)?)
                } else {
                    None
                };
                Projections::Fused {
                    linear: Linear {
                        weight,
                        bias,
                        out_features: widths.iter().sum(),
                        in_features: parts[0].in_features,
                    },
                    widths,
                }
            }
            None => Projections::Separate(parts),
        })
    }

    /// The outputs of every layer, `(T, out_i)` each: views into one product when fused.
    pub fn forward(&self, x: &Tensor, path: SupportedPath) -> Result<Vec<Tensor>> {
        match self {
            Projections::Separate(parts) => parts.iter().map(|p| p.forward(x, path)).collect(),
            Projections::Fused { linear, widths } => {
                let y = linear.forward(x, path)?;
                let mut start = 0;
                widths
                    .iter()
                    .map(|&w| {
                        let part = y.narrow(1, start, w)?;
                        start += w;
                        Ok(part)
                    })
                    .collect()
            }
        }
    }

    /// The storage type of the first layer's weight (`None`: dense f32).
    pub fn quantization(&self) -> Option<GgmlDType> {
        match self {
            Projections::Fused { linear, .. } => linear.quantization(),
            Projections::Separate(parts) => parts.first().and_then(Linear::quantization),
        }
    }
}

/// The weights of `parts` stacked row-wise, when they are all dense, all CPU Q8_0
/// tiles, or all quantized in one type on a GPU, over the same input width (a quantized
/// matrix is a sequence of independent rows of blocks, so stacking is concatenating
/// bytes).
fn stack(parts: &[Linear]) -> Result<Option<Matrix>> {
    if parts.len() < 2 || parts.iter().any(|p| p.in_features != parts[0].in_features) {
        return Ok(None);
    }
    let q8: Vec<(&Arc<Q8Matrix>, GgmlDType)> = parts
        .iter()
        .filter_map(|p| match &p.weight {
            Matrix::Q8 { matrix, stored } => Some((matrix, *stored)),
            Matrix::Candle(_) => None,
        })
        .collect();
    if q8.len() == parts.len() {
        let matrices: Vec<&Q8Matrix> = q8.iter().map(|(m, _)| m.as_ref()).collect();
        return Ok(Q8Matrix::stack(&matrices).map(|m| Matrix::Q8 {
            matrix: Arc::new(m),
            stored: q8[0].1,
        }));
    }
    let candle: Vec<&QMatMul> = parts
        .iter()
        .filter_map(|p| match &p.weight {
            Matrix::Candle(w) => Some(w),
            Matrix::Q8 { .. } => None,
        })
        .collect();
    if candle.len() != parts.len() {
        return Ok(None);
    }
    if candle.iter().all(|w| matches!(w, QMatMul::Tensor(_))) {
        let dense: Vec<&Tensor> = candle
            .iter()
            .filter_map(|w| match w {
                QMatMul::Tensor(t) => Some(t),
                _ => None,
            })
            .collect();
        let in_dim = dense[0].dim(1)?;
        if dense.iter().any(|t| t.dim(1).ok() != Some(in_dim)) {
            return Ok(None);
        }
        return Ok(Some(Matrix::Candle(QMatMul::Tensor(Tensor::cat(
            &dense, 0,
        )?))));
    }
    let quantized: Vec<&Arc<QTensor>> = candle
        .iter()
        .filter_map(|w| match w {
            QMatMul::QTensor(q) => Some(q),
            _ => None,
        })
        .collect();
    if quantized.len() != parts.len() {
        return Ok(None);
    }
    let dtype = quantized[0].dtype();
    let in_dim = quantized[0].shape().dims()[1];
    if quantized
        .iter()
        .any(|q| q.dtype() != dtype || q.shape().dims()[1] != in_dim)
    {
        return Ok(None);
    }
    let mut bytes = Vec::new();
    let mut rows = 0;
    for q in &quantized {
        bytes.extend_from_slice(&q.data()?);
        rows += q.shape().dims()[0];
    }
    let device = quantized[0].device();
    let storage = QStorage::from_data(std::borrow::Cow::Owned(bytes), &device, dtype)?;
    Ok(Some(Matrix::Candle(QMatMul::QTensor(Arc::new(
        QTensor::new(storage, (rows, in_dim))?,
    )))))
}

/// The token embedding table: dense rows, or quantized rows dequantized on lookup.
#[derive(Debug, Clone)]
pub(crate) enum Embedding {
    Dense(Tensor),
    /// `table` may carry zero columns past `hidden` (see [`pad_for_tiles`]), so that
    /// the same storage serves as a tiled output projection.
    Quantized {
        table: Arc<QTensor>,
        hidden: usize,
    },
}

impl Embedding {
    /// `ids` is `(T,)` u32; the result `(T, hidden)` f32.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Embedding::Dense(w) => w.index_select(ids, 0)?,
            Embedding::Quantized { table, hidden } => {
                let rows = table.embedding(ids)?;
                if rows.dim(1)? > *hidden {
                    rows.narrow(1, 0, *hidden)?.contiguous()?
                } else {
                    rows
                }
            }
        })
    }

    /// The same matrix as an output projection (tied embeddings), sharing its storage.
    pub fn as_linear(&self) -> Result<Linear> {
        let (weight, rows, in_features) = match self {
            Embedding::Dense(w) => (QMatMul::Tensor(w.clone()), w.dim(0)?, w.dim(1)?),
            Embedding::Quantized { table, hidden } => (
                QMatMul::from_arc(table.clone())?,
                table.shape().dims()[0],
                *hidden,
            ),
        };
        Ok(Linear {
            weight: Matrix::Candle(weight),
            bias: None,
            out_features: rows,
            in_features,
        })
    }
}

/// The input widths (in values) candle 0.11's tiled x86 kernels require: they walk the
/// input in super-blocks of 256 (`QK_K`). Qwen2.5-0.5B's hidden size, 896, is not one.
pub const TILED_WIDTH: usize = 256;

/// The output widths the tiled kernels require a multiple of (`TILE_N`: 16 rows per
/// tile).
pub const TILE_ROWS: usize = 16;

/// `q` with zero blocks appended to each row up to the next multiple of
/// [`TILED_WIDTH`] columns, when that lets candle multiply it with its tiled kernels:
/// Q8_0 on the CPU, with an output width that is a multiple of [`TILE_ROWS`]. A zero
/// block (scale 0, values 0) adds exact zeros to every dot product, and the inputs are
/// widened with zeros too ([`Linear::forward`]), so the product is the same sum; the
/// tiled kernels were measured 2.3x (one row) to 4.7x (8 rows) faster on 896-wide
/// matrices, which outweighs the 14% more bytes read. Otherwise `q` is returned as is.
fn pad_for_tiles(q: Arc<QTensor>) -> Result<Arc<QTensor>> {
    let dims = q.shape().dims().to_vec();
    let dtype = q.dtype();
    let (rows, width) = (dims[0], dims[1]);
    let device = q.device();
    if !device.is_cpu()
        || dtype != GgmlDType::Q8_0
        || width % TILED_WIDTH == 0
        || rows % TILE_ROWS != 0
        || width % dtype.block_size() != 0
    {
        return Ok(q);
    }
    let padded_width = width.div_ceil(TILED_WIDTH) * TILED_WIDTH;
    let row_bytes = width / dtype.block_size() * dtype.type_size();
    let pad_bytes = (padded_width - width) / dtype.block_size() * dtype.type_size();
    let data = q.data()?;
    let mut bytes = Vec::with_capacity(rows * (row_bytes + pad_bytes));
    // A Q8_0 block is an f16 scale and 32 i8 values; all-zero bytes are scale 0.0 and
    // values 0.
    for row in data.chunks_exact(row_bytes) {
        bytes.extend_from_slice(row);
        bytes.resize(bytes.len() + pad_bytes, 0);
    }
    let storage = QStorage::from_data(std::borrow::Cow::Owned(bytes), &device, dtype)?;
    Ok(Arc::new(QTensor::new(storage, (rows, padded_width))?))
}

/// Weights read from safetensors files, widened to f32 on the model's device.
struct SafetensorsWeights {
    /// What errors name: `model.safetensors` or the shard index.
    path: PathBuf,
    tensors: HashMap<String, Tensor>,
}

/// A GGUF file: its metadata and tensor directory, tensors read on demand.
struct GgufWeights {
    path: PathBuf,
    content: gguf_file::Content,
    file: File,
}

/// One model's weights, from either kind of file.
pub(crate) struct Weights {
    source: Source,
    device: Device,
}

enum Source {
    Safetensors(SafetensorsWeights),
    Gguf(GgufWeights),
}

/// The file listing the shards of a sharded safetensors checkpoint.
pub const SHARD_INDEX: &str = "model.safetensors.index.json";

impl Weights {
    /// `dir/model.safetensors`, or every shard named by `dir/model.safetensors.index.json`.
    /// Returns the weights and the files read.
    pub fn from_safetensors_dir(dir: &Path, device: &Device) -> Result<(Self, Vec<PathBuf>)> {
        let single = dir.join("model.safetensors");
        let index = dir.join(SHARD_INDEX);
        let (path, files) = if single.is_file() {
            (single.clone(), vec![single])
        } else if index.is_file() {
            (index.clone(), shard_files(dir, &index)?)
        } else {
            return Err(OperatorError::MissingFile {
                dir: dir.to_path_buf(),
                file: "model.safetensors",
                why: "the weights (or model.safetensors.index.json and its shards; \
                      pickled .bin files are never read)",
            });
        };
        let mut tensors = HashMap::new();
        for file in &files {
            let shard = candle_core::safetensors::load(file, device).map_err(|e| {
                OperatorError::BadTensor {
                    path: file.clone(),
                    name: "*".into(),
                    message: format!("cannot read safetensors file: {e}"),
                }
            })?;
            for (name, t) in shard {
                let t = if t.dtype() == DType::F32 {
                    t
                } else {
                    t.to_dtype(DType::F32)?
                };
                tensors.insert(name, t);
            }
        }
        let mut fingerprinted = files;
        if index.is_file() && !fingerprinted.contains(&index) {
            fingerprinted.push(index);
        }
        Ok((
            Weights {
                source: Source::Safetensors(SafetensorsWeights { path, tensors }),
                device: device.clone(),
            },
            fingerprinted,
        ))
    }

    /// Opens a GGUF file and reads its metadata and tensor directory.
    pub fn from_gguf(path: &Path, device: &Device) -> Result<Self> {
        let mut file = File::open(path).map_err(|source| OperatorError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let content =
            gguf_file::Content::read(&mut file).map_err(|e| OperatorError::BadConfig {
                path: path.to_path_buf(),
                what: "GGUF file",
                message: e.to_string(),
            })?;
        Ok(Weights {
            source: Source::Gguf(GgufWeights {
                path: path.to_path_buf(),
                content,
                file,
            }),
            device: device.clone(),
        })
    }

    /// The GGUF content (metadata), for a GGUF source.
    pub fn gguf_content(&self) -> Option<&gguf_file::Content> {
        match &self.source {
            Source::Gguf(g) => Some(&g.content),
            Source::Safetensors(_) => None,
        }
    }

    fn path(&self) -> &Path {
        match &self.source {
            Source::Safetensors(s) => &s.path,
            Source::Gguf(g) => &g.path,
        }
    }

    fn bad(&self, name: &str, message: String) -> OperatorError {
        OperatorError::BadTensor {
            path: self.path().to_path_buf(),
            name: name.to_string(),
            message,
        }
    }

    /// Whether the checkpoint has tensor `hf_name`.
    pub fn contains(&self, hf_name: &str) -> bool {
        match &self.source {
            Source::Safetensors(s) => s.tensors.contains_key(hf_name),
            Source::Gguf(g) => {
                gguf_name(hf_name).is_some_and(|n| g.content.tensor_infos.contains_key(&n))
            }
        }
    }

    /// A raw tensor of any rank, as stored (GGUF) or as f32 (safetensors).
    fn raw(&self, hf_name: &str) -> Result<Raw> {
        match &self.source {
            Source::Safetensors(s) => s
                .tensors
                .get(hf_name)
                .map(|t| Raw::Dense(t.clone()))
                .ok_or_else(|| self.bad(hf_name, "absent from the checkpoint".into())),
            Source::Gguf(g) => {
                let name = gguf_name(hf_name)
                    .ok_or_else(|| self.bad(hf_name, "has no GGUF counterpart (a bug)".into()))?;
                if !g.content.tensor_infos.contains_key(&name) {
                    return Err(self.bad(&name, "absent from the GGUF file".into()));
                }
                let q = g
                    .content
                    .tensor(&mut &g.file, &name, &self.device)
                    .map_err(|e| self.bad(&name, format!("cannot read: {e}")))?;
                Ok(Raw::Quantized(Arc::new(q)))
            }
        }
    }

    fn check_shape(&self, hf_name: &str, found: &[usize], want: &[usize]) -> Result<()> {
        if found != want {
            let name = match &self.source {
                Source::Gguf(_) => gguf_name(hf_name).unwrap_or_else(|| hf_name.into()),
                Source::Safetensors(_) => hf_name.into(),
            };
            return Err(self.bad(
                &name,
                format!("shape {found:?}, the config implies {want:?}"),
            ));
        }
        Ok(())
    }

    /// A 1-D f32 vector of `len` (norm weights, biases).
    pub fn vector(&self, hf_name: &str, len: usize) -> Result<Tensor> {
        let t = match self.raw(hf_name)? {
            Raw::Dense(t) => t,
            Raw::Quantized(q) => q.dequantize(&self.device)?,
        };
        self.check_shape(hf_name, t.dims(), &[len])?;
        Ok(t)
    }

    /// The linear layer `{prefix}.weight` (`out x in`) and, when `bias`,
    /// `{prefix}.bias`.
    pub fn linear(
        &self,
        prefix: &str,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
    ) -> Result<Linear> {
        let name = format!("{prefix}.weight");
        let weight = match self.raw(&name)? {
            Raw::Dense(t) => {
                self.check_shape(&name, t.dims(), &[out_dim, in_dim])?;
                Matrix::Candle(QMatMul::Tensor(t))
            }
            Raw::Quantized(q) => {
                self.check_shape(&name, q.shape().dims(), &[out_dim, in_dim])?;
                let stored = q.dtype();
                let dense = matches!(stored, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
                if self.device.is_cpu() && !dense {
                    let data = q.data()?;
                    // Q8_0 as stored; Q4_0 and Q5_0 widened exactly; the others (their
                    // blocks have minimums or 16-value scales) quantized again.
                    let bytes = match (stored, widen_to_q8_0(stored, &data)) {
                        (GgmlDType::Q8_0, _) => data.into_owned(),
                        (_, Some(wide)) => wide,
                        _ => {
                            let dense = q.dequantize(&self.device)?;
                            QTensor::quantize(&dense, GgmlDType::Q8_0)?
                                .data()?
                                .into_owned()
                        }
                    };
                    let matrix = Q8Matrix::from_q8_0(&bytes, out_dim, in_dim)
                        .map_err(|e| self.bad(&name, e.to_string()))?;
                    Matrix::Q8 {
                        matrix: Arc::new(matrix),
                        stored,
                    }
                } else {
                    // f32/f16/bf16 become dense f32 (candle widens them).
                    Matrix::Candle(QMatMul::from_arc(q)?)
                }
            }
        };
        let bias = if bias {
            Some(self.vector(&format!("{prefix}.bias"), out_dim)?)
        } else {
            None
        };
        Ok(Linear {
            weight,
            bias,
            out_features: out_dim,
            in_features: in_dim,
        })
    }

    /// The embedding table `name` (`vocab x hidden`); quantized tables stay quantized.
    pub fn embedding(&self, name: &str, vocab: usize, hidden: usize) -> Result<Embedding> {
        Ok(match self.raw(name)? {
            Raw::Dense(t) => {
                self.check_shape(name, t.dims(), &[vocab, hidden])?;
                Embedding::Dense(t)
            }
            Raw::Quantized(q) => {
                self.check_shape(name, q.shape().dims(), &[vocab, hidden])?;
                match q.dtype() {
                    GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {
                        Embedding::Dense(q.dequantize(&self.device)?)
                    }
                    _ => Embedding::Quantized {
                        table: pad_for_tiles(q)?,
                        hidden,
                    },
                }
            }
        })
    }

    /// A GGUF-only tensor by its GGUF name (`rope_freqs.weight`), as f32 values.
    pub fn gguf_vector(&self, gguf_name: &str) -> Result<Option<Vec<f32>>> {
        let Source::Gguf(g) = &self.source else {
            return Ok(None);
        };
        if !g.content.tensor_infos.contains_key(gguf_name) {
            return Ok(None);
        }
        let q = g
            .content
            .tensor(&mut &g.file, gguf_name, &Device::Cpu)
            .map_err(|e| self.bad(gguf_name, format!("cannot read: {e}")))?;
        let t = q.dequantize(&Device::Cpu)?;
        Ok(Some(t.flatten_all()?.to_vec1::<f32>()?))
    }
}

enum Raw {
    Dense(Tensor),
    Quantized(Arc<QTensor>),
}

/// The shard files named in a `model.safetensors.index.json`'s `weight_map`, in order of
/// first appearance, each checked to exist.
fn shard_files(dir: &Path, index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|source| OperatorError::Io {
        path: index.to_path_buf(),
        source,
    })?;
    let bad = |message: String| OperatorError::BadConfig {
        path: index.to_path_buf(),
        what: "safetensors shard index",
        message,
    };
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no `weight_map` object".into()))?;
    let mut files: Vec<PathBuf> = Vec::new();
    for (tensor, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| bad(format!("weight_map.{tensor}: not a file name")))?;
        // A shard is a file of this directory, never a path elsewhere.
        if file.contains('/') || file.contains('\\') || file.starts_with('.') {
            return Err(bad(format!(
                "weight_map.{tensor}: `{file}` is not a plain file name"
            )));
        }
        let path = dir.join(file);
        if !files.contains(&path) {
            if !path.is_file() {
                return Err(bad(format!(
                    "shard `{file}` (of weight_map.{tensor}) is missing"
                )));
            }
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// llama.cpp's name for a Hugging Face tensor name (the mapping of its converter for the
/// llama and qwen2 architectures).
pub(crate) fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, kind) = rest.rsplit_once('.')?;
    let module = match module {
        "input_layernorm" => "attn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "post_attention_layernorm" => "ffn_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{module}.{kind}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Q8_0 matrix of `rows x width` with values a reader can regenerate.
    fn q8(rows: usize, width: usize) -> Arc<QTensor> {
        let values: Vec<f32> = (0..rows * width)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 64.0)
            .collect();
        let dense = Tensor::from_vec(values, (rows, width), &Device::Cpu).unwrap();
        Arc::new(QTensor::quantize(&dense, GgmlDType::Q8_0).unwrap())
    }

    #[test]
    fn padding_for_tiles_adds_only_zero_columns() {
        // 96 columns (three Q8_0 blocks) padded to 256: the first 96 dequantize to the
        // same bits, the other 160 to exact zeros.
        let q = q8(16, 96);
        let padded = pad_for_tiles(Arc::clone(&q)).unwrap();
        assert_eq!(padded.shape().dims(), &[16, 256]);
        let before = q.dequantize(&Device::Cpu).unwrap();
        let after = padded.dequantize(&Device::Cpu).unwrap();
        let kept = after.narrow(1, 0, 96).unwrap();
        assert_eq!(
            kept.to_vec2::<f32>().unwrap(),
            before.to_vec2::<f32>().unwrap()
        );
        let added = after.narrow(1, 96, 160).unwrap().to_vec2::<f32>().unwrap();
        assert!(added.iter().flatten().all(|&v| v == 0.0));

        // Left as they are: a width already a multiple of 256, and an output width the
        // tiled kernels cannot take (not a multiple of 16 rows).
        assert_eq!(
            pad_for_tiles(q8(16, 256)).unwrap().shape().dims(),
            &[16, 256]
        );
        assert_eq!(pad_for_tiles(q8(8, 96)).unwrap().shape().dims(), &[8, 96]);
    }

    #[test]
    fn gguf_names_follow_llama_cpp() {
        assert_eq!(
            gguf_name("model.layers.11.self_attn.k_proj.bias").unwrap(),
            "blk.11.attn_k.bias"
        );
        assert_eq!(
            gguf_name("model.layers.0.mlp.down_proj.weight").unwrap(),
            "blk.0.ffn_down.weight"
        );
        assert_eq!(gguf_name("lm_head.weight").unwrap(), "output.weight");
        assert!(gguf_name("model.layers.0.rotary.inv_freq").is_none());
    }

    #[test]
    fn shard_index_names_missing_shards_and_refuses_paths() {
        let dir = tempfile::tempdir().unwrap();
        let index = dir.path().join(SHARD_INDEX);
        std::fs::write(
            &index,
            r#"{"weight_map": {"a": "model-00001.safetensors"}}"#,
        )
        .unwrap();
        let e = shard_files(dir.path(), &index).unwrap_err().to_string();
        assert!(
            e.contains("model-00001.safetensors") && e.contains("missing"),
            "{e}"
        );
        std::fs::write(&index, r#"{"weight_map": {"a": "../x.safetensors"}}"#).unwrap();
        let e = shard_files(dir.path(), &index).unwrap_err().to_string();
        assert!(e.contains("not a plain file name"), "{e}");
    }
}
