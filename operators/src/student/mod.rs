//! The trainable student: a BERT-family sentence embedder whose weights are candle
//! variables, for fine-tuning (RECIPE.md section 5).
//!
//! Contracts:
//! - [`Student::load`] reads a model directory exactly as [`crate::Embedder::load`] does
//!   (config.json, tokenizer.json, model.safetensors with or without the `bert.` prefix,
//!   pooling, normalisation, casing and prompts from the sentence-transformers files);
//!   every encoder tensor becomes one f32 [`Var`] named as in a Hugging Face `BertModel`
//!   checkpoint without prefix (`encoder.layer.0.attention.self.query.weight`).
//! - [`Student::embed`] is differentiable end to end: `loss.backward()` gives a gradient
//!   for every variable, and on the same tokens it computes what the inference
//!   [`crate::Embedder`] computes (pooled, L2-normalised when the model normalises).
//! - Variables are updated in place ([`Var::set`], or an optimiser over
//!   [`Student::vars`]); every later call sees the new values, and
//!   [`Student::save_weights`] / [`Student::export_sentence_transformers`] write them.
//! - Queries and passages have their own maximum length and prompt ([`StudentOptions`]).

mod cpu_train;
mod export;
mod fused;
mod gradients;
mod model;

pub use cpu_train::CHUNK_TOKENS;
pub use gradients::{GradientPath, Gradients, KeptActivations, GRAPH_TOKEN_BUDGET};

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, Var};
use candle_nn::VarMap;
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use crate::batcher::TokenBatch;
use crate::bert::{cls_pool, l2_normalize, mean_pool, BertConfig, Weights};
use crate::cpu_path::CpuPath;
use crate::embedder::encode_texts;
use crate::embedder::{TextKind, REQUIRED_FILES};
use crate::error::{OperatorError, Result};
use crate::st_config::{Pooling, SentenceTransformerSpec};

use model::{Encoder, Tracking};

/// Maximum query length of the recipe, in tokens (special tokens included).
pub const DEFAULT_QUERY_MAX_LENGTH: usize = 64;
/// Maximum passage length of the recipe, in tokens (special tokens included).
pub const DEFAULT_PASSAGE_MAX_LENGTH: usize = 512;

/// How the student tokenises; everything else comes from the model directory.
#[derive(Debug, Clone, PartialEq)]
pub struct StudentOptions {
    /// Most tokens of a query; capped at the model's position embeddings.
    pub query_max_length: usize,
    /// Most tokens of a passage; capped at the model's position embeddings.
    pub passage_max_length: usize,
    /// Prepended to queries; `None` takes the directory's `query` prompt, if any.
    pub query_prefix: Option<String>,
    /// Prepended to passages; `None` takes the directory's `passage` (else `document`)
    /// prompt, if any.
    pub passage_prefix: Option<String>,
}

impl Default for StudentOptions {
    fn default() -> Self {
        Self {
            query_max_length: DEFAULT_QUERY_MAX_LENGTH,
            passage_max_length: DEFAULT_PASSAGE_MAX_LENGTH,
            query_prefix: None,
            passage_prefix: None,
        }
    }
}

/// Prefixes under which checkpoints store the encoder (as [`Weights`] reads them): the
/// untrained pooler is found under the same one.
const POOLER_PREFIXES: [&str; 2] = ["", "bert."];

/// A trainable sentence embedder.
pub struct Student {
    encoder: Encoder,
    /// The same network over detached views of the variables.
    encoder_no_grad: Encoder,
    /// Variables sorted by name.
    named: Vec<(String, Var)>,
    varmap: VarMap,
    /// Checkpoint tensors the embedding never uses (BERT's pooler), written back
    /// unchanged so an exported model loads without newly initialised weights.
    frozen: Vec<(String, Tensor)>,
    config: BertConfig,
    device: Device,
    query_tokenizer: Tokenizer,
    passage_tokenizer: Tokenizer,
    pooling: Pooling,
    normalize: bool,
    do_lower_case: bool,
    query_max_length: usize,
    passage_max_length: usize,
    query_prefix: String,
    passage_prefix: String,
    dir: PathBuf,
    /// The CPU training kernel's view of the network (derived once from the config).
    kernel_shape: cpu_train::Shape,
    /// The CPU training kernel's buffers, kept between calls.
    kernel_scratch: std::sync::Mutex<cpu_train::Scratch>,
}

fn tokenizer_with_limit(base: &Tokenizer, max_length: usize) -> Result<Tokenizer> {
    let mut t = base.clone();
    t.with_truncation(Some(TruncationParams {
        max_length,
        strategy: TruncationStrategy::LongestFirst,
        stride: 0,
        direction: TruncationDirection::Right,
    }))
    .map_err(|e| OperatorError::Tokenizer(e.to_string()))?;
    t.with_padding(None);
    Ok(t)
}

impl Student {
    /// Loads `dir` onto `device` with every encoder tensor as a variable.
    pub fn load(dir: &Path, options: &StudentOptions, device: &Device) -> Result<Self> {
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
        let spec = SentenceTransformerSpec::read(dir)?;
        for (what, value) in [
            ("query_max_length", options.query_max_length),
            ("passage_max_length", options.passage_max_length),
        ] {
            if value == 0 {
                return Err(OperatorError::BadConfig {
                    path: dir.to_path_buf(),
                    what: "student options",
                    message: format!("{what} is 0; a text needs at least its special tokens"),
                });
            }
        }
        let weights_path = dir.join("model.safetensors");
        let tensors: HashMap<String, Tensor> =
            candle_core::safetensors::load(&weights_path, device).map_err(|e| {
                OperatorError::BadTensor {
                    path: weights_path.clone(),
                    name: "*".into(),
                    message: format!("cannot read safetensors file: {e}"),
                }
            })?;
        let weights = Weights::from_tensors(&weights_path, tensors.clone(), device)?;
        let mut vars = BTreeMap::new();
        for (name, shape) in model::parameter_shapes(&config) {
            let var = model::to_var(&weights.get(&name, &shape)?)?;
            vars.insert(name, var);
        }
        let frozen = pooler_tensors(&tensors, &config)?;
        drop(weights);
        drop(tensors);

        let encoder = Encoder::new(&vars, &config, Tracking::Gradients)?;
        let encoder_no_grad = Encoder::new(&vars, &config, Tracking::None)?;
        let varmap = VarMap::new();
        varmap
            .data()
            .lock()
            .map_err(|_| {
                OperatorError::Candle(candle_core::Error::Msg("student VarMap poisoned".into()))
            })?
            .extend(vars.iter().map(|(n, v)| (n.clone(), v.clone())));

        let limit = config.max_position_embeddings;
        let query_max_length = options.query_max_length.min(limit);
        let passage_max_length = options.passage_max_length.min(limit);
        let tokenizer_path = dir.join("tokenizer.json");
        let base = Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| OperatorError::Tokenizer(format!("{}: {e}", tokenizer_path.display())))?;
        let prompt = |key: &str| spec.prompts.get(key).cloned();
        Ok(Self {
            encoder,
            encoder_no_grad,
            named: vars.into_iter().collect(),
            varmap,
            frozen,
            device: device.clone(),
            query_tokenizer: tokenizer_with_limit(&base, query_max_length)?,
            passage_tokenizer: tokenizer_with_limit(&base, passage_max_length)?,
            pooling: spec.pooling,
            normalize: spec.normalize,
            do_lower_case: spec.do_lower_case,
            query_max_length,
            passage_max_length,
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
            kernel_shape: cpu_train::Shape::new(&config, spec.pooling, spec.normalize)?,
            config,
            dir: dir.to_path_buf(),
            kernel_scratch: std::sync::Mutex::default(),
        })
    }

    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// Embedding width (the encoder's hidden size).
    pub fn dim(&self) -> usize {
        self.config.hidden_size
    }

    pub fn pooling(&self) -> Pooling {
        self.pooling
    }

    pub fn normalizes(&self) -> bool {
        self.normalize
    }

    pub fn do_lower_case(&self) -> bool {
        self.do_lower_case
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The directory the student was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CPU path the CPU training kernel runs on ([`crate::cpu_path`]).
    pub fn cpu_path(&self) -> CpuPath {
        self.kernel_shape.path.path()
    }

    /// Runs the CPU training kernel on `path` from now on; fails, changing nothing, when
    /// this CPU cannot run it.
    pub fn set_cpu_path(&mut self, path: CpuPath) -> Result<()> {
        self.kernel_shape.path = path.check()?;
        Ok(())
    }

    /// Most tokens of a text of `kind`, after capping at the position embeddings.
    pub fn max_length(&self, kind: TextKind) -> usize {
        match kind {
            TextKind::Query => self.query_max_length,
            TextKind::Passage => self.passage_max_length,
        }
    }

    /// The prompt prepended to texts of `kind`.
    pub fn prefix(&self, kind: TextKind) -> &str {
        match kind {
            TextKind::Query => &self.query_prefix,
            TextKind::Passage => &self.passage_prefix,
        }
    }

    /// Token ids of each text: the kind's prompt prepended, lower-cased when the model
    /// says `do_lower_case`, special tokens added, truncated to the kind's maximum length.
    pub fn tokenize(&self, texts: &[&str], kind: TextKind) -> Result<Vec<Vec<u32>>> {
        let tokenizer = match kind {
            TextKind::Query => &self.query_tokenizer,
            TextKind::Passage => &self.passage_tokenizer,
        };
        encode_texts(tokenizer, texts, self.prefix(kind), self.do_lower_case)
    }

    /// Differentiable embeddings of `batch`: `[rows, dim]`, rows in the batch's order.
    pub fn embed(&self, batch: &TokenBatch) -> Result<Tensor> {
        self.pooled(&self.encoder, batch)
    }

    /// The same values as [`Student::embed`] with nothing recorded for `backward` (for
    /// gradient caching's first pass, and evaluation): less memory, no gradients.
    pub fn embed_no_grad(&self, batch: &TokenBatch) -> Result<Tensor> {
        self.pooled(&self.encoder_no_grad, batch)
    }

    fn pooled(&self, encoder: &Encoder, batch: &TokenBatch) -> Result<Tensor> {
        if batch.rows.is_empty() {
            return Ok(Tensor::zeros(
                (0, self.dim()),
                candle_core::DType::F32,
                &self.device,
            )?);
        }
        let (hidden, mask) = encoder.forward(batch)?;
        let pooled = match self.pooling {
            Pooling::Mean => mean_pool(&hidden, &mask)?,
            Pooling::Cls => cls_pool(&hidden)?,
        };
        if self.normalize {
            l2_normalize(&pooled)
        } else {
            Ok(pooled)
        }
    }

    /// Every variable, sorted by name.
    pub fn vars(&self) -> Vec<Var> {
        self.named.iter().map(|(_, v)| v.clone()).collect()
    }

    /// Every variable with its Hugging Face name, sorted by name.
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        self.named.clone()
    }

    /// The variables as a candle-nn [`VarMap`] (the same variables, shared storage).
    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    /// Number of trainable scalars.
    pub fn num_parameters(&self) -> usize {
        self.named.iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Writes the current weights (and the untrained pooler, when the checkpoint had one)
    /// to `path` as safetensors with Hugging Face names without prefix. The file is
    /// written beside `path` and renamed over it, so it is whole or absent.
    pub fn save_weights(&self, path: &Path) -> Result<()> {
        export::save_weights(self, path)
    }

    /// Writes a complete sentence-transformers directory at `out_dir` from the current
    /// weights, with the configuration and tokenizer files of `source_dir` and the given
    /// (query, passage) prompts: config.json and the tokenizer files copied, the weights,
    /// modules.json (Transformer, Pooling, Normalize when the student normalises),
    /// 1_Pooling/config.json, sentence_bert_config.json (`max_seq_length` = the passage
    /// maximum) and config_sentence_transformers.json (the prompts that are set,
    /// `default_prompt_name` null). The directory is built beside `out_dir` and renamed
    /// into place (replacing an older one), so it is whole or absent.
    pub fn export_sentence_transformers(
        &self,
        source_dir: &Path,
        out_dir: &Path,
        prompts: (Option<String>, Option<String>),
    ) -> Result<()> {
        export::export_sentence_transformers(self, source_dir, out_dir, prompts)
    }

    /// Writes a sentence-transformers Router at `out_dir`: the `query` route is this
    /// student (as [`Student::export_sentence_transformers`] writes it, its
    /// `max_seq_length` the query maximum), the `document` route the encoder of
    /// `document_model` with its files copied unchanged (a Router's document route when
    /// it is one). `encode_query` then embeds with the fine-tuned weights and
    /// `encode_document` (and a plain `encode`) as `document_model` does. Whole or
    /// absent, as the plain export.
    pub fn export_query_document_router(
        &self,
        source_dir: &Path,
        document_model: &Path,
        out_dir: &Path,
        prompts: (Option<String>, Option<String>),
    ) -> Result<()> {
        export::export_query_document_router(self, source_dir, document_model, out_dir, prompts)
    }

    fn weight_tensors(&self) -> HashMap<String, Tensor> {
        self.named
            .iter()
            .map(|(n, v)| (n.clone(), v.as_detached_tensor()))
            .chain(self.frozen.iter().cloned())
            .collect()
    }
}

/// BERT's pooler (`pooler.dense.*`), when the checkpoint has it under a known prefix.
fn pooler_tensors(
    tensors: &HashMap<String, Tensor>,
    config: &BertConfig,
) -> Result<Vec<(String, Tensor)>> {
    let h = config.hidden_size;
    let mut out = Vec::new();
    for (name, shape) in [
        ("pooler.dense.weight", vec![h, h]),
        ("pooler.dense.bias", vec![h]),
    ] {
        let found = POOLER_PREFIXES
            .iter()
            .find_map(|p| tensors.get(&format!("{p}{name}")));
        if let Some(t) = found {
            if t.dims() == shape.as_slice() {
                out.push((name.to_string(), t.to_dtype(candle_core::DType::F32)?));
            }
        }
    }
    Ok(out)
}
