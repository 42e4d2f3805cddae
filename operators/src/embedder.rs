//! A sentence embedder: a BERT-family encoder from a Hugging Face / sentence-transformers
//! model directory, its tokenizer, pooling, optional L2 normalisation and prompts.
//!
//! The contract matches `SentenceTransformer.encode`: the same tokens (the prompt
//! prepended, lower-cased when `do_lower_case`, truncated to `max_seq_length` with the
//! special tokens kept), the same pooling over unpadded tokens, the same normalisation.
//! Tokenisation and the forward pass are separate calls, so that a dataflow can
//! tokenise on its workers and keep the device busy with batches only.
//!
//! Two backends compute the same function: on the CPU, the hand-written kernel of
//! [`crate::cpu_bert`] (no padding, fused layers); elsewhere (CUDA), candle's
//! [`BertModel`]. [`Embedder::load`] picks by device; [`Embedder::load_with_backend`]
//! chooses, so tests can compare the two.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use crate::backend::{Backend, Encoder};
use crate::batcher::TokenBatch;
use crate::bert::{cls_pool, l2_normalize, mean_pool, BertConfig, BertModel, Weights};
use crate::cpu_bert::CpuBert;
use crate::cpu_path::CpuPath;
use crate::error::{OperatorError, Result};
use crate::st_config::{ModelLayout, Pooling, SentenceTransformerSpec};

/// Which side of retrieval a text is on, for models with query and passage prompts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextKind {
    Query,
    Passage,
}

/// Options a user may set over what the model directory says.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EmbedderOptions {
    /// Overrides `max_seq_length` (capped at the model's position embeddings).
    pub max_seq_length: Option<usize>,
    /// Overrides the directory's `query` prompt.
    pub query_prefix: Option<String>,
    /// Overrides the directory's `passage` (or `document`) prompt.
    pub passage_prefix: Option<String>,
}

/// The files a model directory must have, and why.
pub const REQUIRED_FILES: [(&str, &str); 3] = [
    ("config.json", "the encoder's architecture"),
    (
        "tokenizer.json",
        "the tokenizer, in Hugging Face tokenizers' format",
    ),
    (
        "model.safetensors",
        "the weights (pickled .bin files are never read)",
    ),
];

/// A loaded embedder. Cheap calls: `tokenize` (CPU, any thread) and `embed_batch`
/// (the device).
pub struct Embedder {
    encoder: Encoder<BertModel>,
    config: BertConfig,
    device: Device,
    tokenizer: Tokenizer,
    pooling: Pooling,
    normalize: bool,
    max_seq_length: usize,
    do_lower_case: bool,
    query_prefix: String,
    passage_prefix: String,
    dir: PathBuf,
    /// The directory of this encoder's weights, config and tokenizer: `dir` itself, or
    /// a Router route's transformer directory inside it.
    weights_dir: PathBuf,
    /// A Router model's query encoder; `None` when one encoder embeds both sides.
    query_tower: Option<Box<Embedder>>,
}

impl Embedder {
    /// Loads `dir` (config.json, tokenizer.json, model.safetensors and the optional
    /// sentence-transformers files) onto `device`, with the fastest backend for it. A
    /// sentence-transformers Router of `query` and `document` routes loads both
    /// encoders: queries are embedded by the first, passages by the second
    /// ([`Embedder::side`]).
    pub fn load(dir: &Path, options: &EmbedderOptions, device: &Device) -> Result<Self> {
        Self::load_with_backend(dir, options, device, Backend::for_device(device))
    }

    /// [`Embedder::load`] with a chosen backend; [`Backend::Cpu`] needs `device` to be
    /// the CPU.
    pub fn load_with_backend(
        dir: &Path,
        options: &EmbedderOptions,
        device: &Device,
        backend: Backend,
    ) -> Result<Self> {
        if !backend.runs_on(device) {
            return Err(OperatorError::Unsupported {
                path: dir.to_path_buf(),
                what: "backend for this device",
                value: format!("cpu kernel on {device:?}"),
                supported: "the cpu kernel on the CPU; candle on any device",
            });
        }
        match ModelLayout::read(dir)? {
            ModelLayout::Single(spec) => Self::load_tower(dir, dir, spec, options, device, backend),
            ModelLayout::Router { query, document } => {
                let mut passages = Self::load_tower(
                    dir,
                    &document.transformer_dir,
                    document.spec,
                    options,
                    device,
                    backend,
                )?;
                let queries = Self::load_tower(
                    dir,
                    &query.transformer_dir,
                    query.spec,
                    options,
                    device,
                    backend,
                )?;
                if queries.dim() != passages.dim() {
                    return Err(OperatorError::BadConfig {
                        path: dir.to_path_buf(),
                        what: "sentence-transformers Router",
                        message: format!(
                            "the query route embeds in {} dimensions, the document route in {}",
                            queries.dim(),
                            passages.dim()
                        ),
                    });
                }
                passages.query_tower = Some(Box::new(queries));
                Ok(passages)
            }
        }
    }

    /// One encoder of model `model_dir`, its files in `dir` (the model directory itself,
    /// or a Router route's transformer directory inside it).
    fn load_tower(
        model_dir: &Path,
        dir: &Path,
        spec: SentenceTransformerSpec,
        options: &EmbedderOptions,
        device: &Device,
        backend: Backend,
    ) -> Result<Self> {
        for (file, why) in REQUIRED_FILES {
            if !dir.join(file).is_file() {
                return Err(OperatorError::MissingFile {
                    dir: dir.to_path_buf(),
                    file,
                    why,
                });
            }
        }
        let config = BertConfig::from_file(&dir.join("config.json"))?;
        let weights = Weights::load(&dir.join("model.safetensors"), device)?;
        let encoder = match backend {
            Backend::Candle => Encoder::Candle(BertModel::load(&weights, &config)?),
            Backend::Cpu => Encoder::Cpu(CpuBert::load(&weights, &config)?),
        };
        drop(weights);
        let max_seq_length = options
            .max_seq_length
            .or(spec.max_seq_length)
            .unwrap_or(config.max_position_embeddings)
            .min(config.max_position_embeddings);
        let mut tokenizer = Tokenizer::from_file(dir.join("tokenizer.json")).map_err(|e| {
            OperatorError::Tokenizer(format!("{}: {e}", dir.join("tokenizer.json").display()))
        })?;
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_seq_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| OperatorError::Tokenizer(e.to_string()))?;
        tokenizer.with_padding(None);
        let prompt = |key: &str| spec.prompts.get(key).cloned();
        Ok(Self {
            encoder,
            config,
            device: device.clone(),
            tokenizer,
            pooling: spec.pooling,
            normalize: spec.normalize,
            max_seq_length,
            do_lower_case: spec.do_lower_case,
            query_prefix: options
                .query_prefix
                .clone()
                .or_else(|| prompt("query"))
                .unwrap_or_default(),
            passage_prefix: options
                .passage_prefix
                .clone()
                .or_else(|| prompt("passage"))
                .or_else(|| prompt("document"))
                .unwrap_or_default(),
            dir: model_dir.to_path_buf(),
            weights_dir: dir.to_path_buf(),
            query_tower: None,
        })
    }

    /// The encoder that embeds texts of `kind`: the query route of a Router for
    /// queries, this one otherwise.
    pub fn side(&self, kind: TextKind) -> &Embedder {
        match (kind, &self.query_tower) {
            (TextKind::Query, Some(tower)) => tower,
            _ => self,
        }
    }

    /// Whether queries and passages have encoders of their own (a Router).
    pub fn has_query_tower(&self) -> bool {
        self.query_tower.is_some()
    }

    /// The directory holding this encoder's config.json, tokenizer.json and
    /// model.safetensors (for a Router, the document route's; see [`Embedder::side`]).
    pub fn weights_dir(&self) -> &Path {
        &self.weights_dir
    }

    pub fn dim(&self) -> usize {
        self.config.hidden_size
    }

    pub fn max_seq_length(&self) -> usize {
        self.max_seq_length
    }

    pub fn pooling(&self) -> Pooling {
        self.pooling
    }

    pub fn normalizes(&self) -> bool {
        self.normalize
    }

    /// Whether texts are lower-cased before tokenising (`do_lower_case`).
    pub fn do_lower_case(&self) -> bool {
        self.do_lower_case
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn backend(&self) -> Backend {
        self.encoder.backend()
    }

    /// The CPU path the CPU kernel runs on ([`crate::cpu_path`]); `None` for the candle
    /// backend, which does not use the hand-written kernels.
    pub fn cpu_path(&self) -> Option<CpuPath> {
        self.encoder.cpu_path()
    }

    /// Runs the CPU kernel on `path` from now on; fails, changing nothing, when this CPU
    /// cannot run it. The candle backend checks the path and otherwise ignores it.
    pub fn set_cpu_path(&mut self, path: CpuPath) -> Result<()> {
        if let Some(tower) = &mut self.query_tower {
            tower.set_cpu_path(path)?;
        }
        self.encoder.set_cpu_path(path)
    }

    /// The prompt prepended to texts of `kind`.
    pub fn prefix(&self, kind: TextKind) -> &str {
        match kind {
            TextKind::Query => &self.query_prefix,
            TextKind::Passage => &self.passage_prefix,
        }
    }

    /// Token ids of each text, special tokens included, truncated to `max_seq_length`,
    /// by the tokenizer of the encoder of `kind` ([`Embedder::side`]).
    pub fn tokenize(&self, texts: &[&str], kind: TextKind) -> Result<Vec<Vec<u32>>> {
        let side = self.side(kind);
        encode_texts(
            &side.tokenizer,
            texts,
            side.prefix(kind),
            side.do_lower_case,
        )
    }

    /// Embeds one batch of texts of `kind` (tokenised by [`Embedder::tokenize`] for the
    /// same kind) with that side's encoder.
    pub fn embed_batch_as(&self, batch: &TokenBatch, kind: TextKind) -> Result<Vec<f32>> {
        self.side(kind).embed_batch(batch)
    }

    /// Embeds one batch with this encoder (for a Router, the document route's, as
    /// sentence-transformers' plain `encode` does): a `rows x dim` row-major matrix,
    /// rows in the batch's order.
    pub fn embed_batch(&self, batch: &TokenBatch) -> Result<Vec<f32>> {
        let rows = batch.rows.len();
        if rows == 0 {
            return Ok(Vec::new());
        }
        let model = match &self.encoder {
            Encoder::Cpu(kernel) => {
                let texts: Vec<&[u32]> = batch.rows.iter().map(|r| r.ids.as_slice()).collect();
                return kernel.embed(&texts, self.pooling, self.normalize);
            }
            Encoder::Candle(model) => model,
        };
        let len = batch.padded_len().max(1);
        let mut ids = vec![0u32; rows * len];
        let mut mask = vec![0u32; rows * len];
        for (r, row) in batch.rows.iter().enumerate() {
            ids[r * len..r * len + row.ids.len()].copy_from_slice(&row.ids);
            mask[r * len..r * len + row.ids.len()].fill(1);
        }
        let device = model.device();
        let ids = Tensor::from_vec(ids, (rows, len), device)?;
        let mask = Tensor::from_vec(mask, (rows, len), device)?;
        let hidden = model.forward(&ids, &mask)?;
        let pooled = match self.pooling {
            Pooling::Mean => mean_pool(&hidden, &mask)?,
            Pooling::Cls => cls_pool(&hidden)?,
        };
        let out = if self.normalize {
            l2_normalize(&pooled)?
        } else {
            pooled
        };
        Ok(out.flatten_all()?.to_vec1::<f32>()?)
    }
}

/// Token ids of `texts` as sentence-transformers feeds them: `prefix` prepended,
/// lower-cased when the model says `do_lower_case`, special tokens added, truncated as
/// `tokenizer` is configured. Shared by the embedder and the trainable student.
pub fn encode_texts(
    tokenizer: &Tokenizer,
    texts: &[&str],
    prefix: &str,
    do_lower_case: bool,
) -> Result<Vec<Vec<u32>>> {
    let inputs: Vec<String> = texts
        .iter()
        .map(|t| {
            let s = format!("{prefix}{t}");
            if do_lower_case {
                s.to_lowercase()
            } else {
                s
            }
        })
        .collect();
    let encodings = tokenizer
        .encode_batch(inputs, true)
        .map_err(|e| OperatorError::Tokenizer(e.to_string()))?;
    Ok(encodings
        .into_iter()
        .map(|e| e.get_ids().to_vec())
        .collect())
}
