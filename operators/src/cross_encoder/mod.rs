//! Cross-encoders: sequence-classification models that read a query and a passage
//! together and give the pair one relevance score. They are the teachers whose scores
//! distillation learns from.
//!
//! [`CrossEncoder::load`] reads a Hugging Face checkpoint directory (`config.json`,
//! `tokenizer.json`, `model.safetensors`, optionally `tokenizer_config.json`) of one of
//! three families (see [`Family`]): `BertForSequenceClassification`,
//! `ElectraForSequenceClassification`, `XLMRobertaForSequenceClassification`.
//!
//! Contract, matching transformers in eval mode:
//! - [`CrossEncoder::tokenize_pairs`] gives the ids of `tokenizer(query, passage,
//!   truncation=True, max_length=max_length)`: the pair template of `tokenizer.json`,
//!   longest-first truncation. Token types are the tokenizer's (0 for the query and its
//!   separator, 1 for the passage) for BERT and ELECTRA, and all 0 for XLM-RoBERTa, whose
//!   tokenizer returns none.
//! - [`CrossEncoder::logits_batch`] gives the classifier's logits, `num_labels` per row;
//!   [`CrossEncoder::score_batch`] one score per row: the logit itself when
//!   `num_labels` is 1, else label 1's logit (by transformers' convention for two-label
//!   relevance heads, label 1 is "relevant"; `id2label` is not consulted). Checkpoints
//!   with more than two labels are refused rather than scored by a guess.
//!
//! How it runs: the embeddings (word + position + token type, layer norm, ELECTRA's
//! projection) and the head are small candle computations on the model's device; the
//! encoder layers run on one of two backends ([`Backend`]):
//! - on the CPU, the CPU kernel's ([`crate::cpu_bert`], entered at
//!   [`CpuBert::forward_embedded`]), on packed, unpadded rows, so every text attends to
//!   its own tokens only and a row's score does not depend on its batch-mates;
//! - on any device (CUDA), candle's [`BertEncoder`] on padded rows with masked
//!   attention: the packed embeddings are gathered into `[rows, longest, hidden]`, padding
//!   slots from a zero row, and each row's first token goes to the head.
//!
//! [`CrossEncoder::load`] picks by device; [`CrossEncoder::load_with_backend`] chooses, so
//! tests compare the two on the CPU.

mod checkpoint;
mod config;
mod embeddings;
mod heads;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use tokenizers::{
    EncodeInput, PostProcessor, Tokenizer, TruncationDirection, TruncationParams,
    TruncationStrategy,
};

use crate::backend::{Backend, Encoder};
use crate::batcher::{TokenBatch, TokenizedText};
use crate::bert::BertEncoder;
use crate::cpu_bert::CpuBert;
use crate::cpu_path::CpuPath;
use crate::error::{OperatorError, Result};
use checkpoint::Checkpoint;
pub use config::{Family, ModelConfig, SUPPORTED_MODEL_TYPES};
use embeddings::{Embeddings, PackedTokens};
use heads::Head;

/// Options a user may set over what the model directory says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CrossEncoderOptions {
    /// Most tokens of a tokenised pair, special tokens included. Defaults to the smaller
    /// of `tokenizer_config.json`'s `model_max_length` and the model's position limit,
    /// and is capped at the latter.
    pub max_length: Option<usize>,
}

/// The files a cross-encoder directory must have, and why.
pub const REQUIRED_FILES: [(&str, &str); 3] = [
    ("config.json", "the model's family and shape"),
    (
        "tokenizer.json",
        "the tokenizer, in Hugging Face tokenizers' format",
    ),
    (
        "model.safetensors",
        "the weights (pickled .bin files are never read)",
    ),
];

/// A loaded cross-encoder; see the module docs.
pub struct CrossEncoder {
    config: ModelConfig,
    tokenizer: Tokenizer,
    embeddings: Embeddings,
    encoder: Encoder<BertEncoder>,
    head: Head,
    max_length: usize,
    dir: PathBuf,
}

impl CrossEncoder {
    /// Loads the checkpoint in `dir` onto `device`, with the fastest backend for it.
    pub fn load(dir: &Path, options: &CrossEncoderOptions, device: &Device) -> Result<Self> {
        Self::load_with_backend(dir, options, device, Backend::for_device(device))
    }

    /// [`CrossEncoder::load`] with a chosen backend; [`Backend::Cpu`] needs `device` to be
    /// the CPU.
    pub fn load_with_backend(
        dir: &Path,
        options: &CrossEncoderOptions,
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
        for (file, why) in REQUIRED_FILES {
            if !dir.join(file).is_file() {
                return Err(OperatorError::MissingFile {
                    dir: dir.to_path_buf(),
                    file,
                    why,
                });
            }
        }
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let ckpt = Checkpoint::load(&dir.join("model.safetensors"), config.family, device)?;
        let embeddings = Embeddings::load(&ckpt, &config)?;
        let head = Head::load(&ckpt, &config)?;
        let encoder = match backend {
            Backend::Cpu => {
                Encoder::Cpu(ckpt.named(CpuBert::load_layers(ckpt.weights(), &config.encoder))?)
            }
            Backend::Candle => {
                Encoder::Candle(ckpt.named(BertEncoder::load(ckpt.weights(), &config.encoder))?)
            }
        };
        drop(ckpt);

        let mut tokenizer = Tokenizer::from_file(dir.join("tokenizer.json")).map_err(|e| {
            OperatorError::Tokenizer(format!("{}: {e}", dir.join("tokenizer.json").display()))
        })?;
        let limit = config.max_positions;
        let max_length = options
            .max_length
            .or(model_max_length(dir)?)
            .unwrap_or(limit)
            .min(limit);
        let specials = tokenizer
            .get_post_processor()
            .map_or(0, |p| p.added_tokens(true));
        if max_length <= specials {
            return Err(OperatorError::BadConfig {
                path: dir.to_path_buf(),
                what: "max_length",
                message: format!(
                    "{max_length} leaves no room for text beside a pair's {specials} special tokens"
                ),
            });
        }
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| OperatorError::Tokenizer(e.to_string()))?;
        tokenizer.with_padding(None);
        Ok(Self {
            config,
            tokenizer,
            embeddings,
            encoder,
            head,
            max_length,
            dir: dir.to_path_buf(),
        })
    }

    pub fn family(&self) -> Family {
        self.config.family
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn num_labels(&self) -> usize {
        self.config.num_labels
    }

    /// Most tokens of a tokenised pair.
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn device(&self) -> &Device {
        self.embeddings.device()
    }

    /// Which backend runs the encoder layers.
    pub fn backend(&self) -> Backend {
        self.encoder.backend()
    }

    /// The CPU path the encoder's kernels run on ([`crate::cpu_path`]); `None` for the
    /// candle backend, which does not use the hand-written kernels.
    pub fn cpu_path(&self) -> Option<CpuPath> {
        self.encoder.cpu_path()
    }

    /// Runs the encoder's kernels on `path` from now on; fails, changing nothing, when
    /// this CPU cannot run it. The candle backend checks the path and otherwise ignores
    /// it.
    pub fn set_cpu_path(&mut self, path: CpuPath) -> Result<()> {
        self.encoder.set_cpu_path(path)
    }

    /// Tokenises (query, passage) pairs; row `i` has `index` `i`. Token types are filled
    /// for BERT and ELECTRA and left empty (all 0) for XLM-RoBERTa.
    pub fn tokenize_pairs(&self, pairs: &[(&str, &str)]) -> Result<Vec<TokenizedText>> {
        let inputs: Vec<EncodeInput> = pairs.iter().map(|&(q, p)| (q, p).into()).collect();
        let encodings = self
            .tokenizer
            .encode_batch(inputs, true)
            .map_err(|e| OperatorError::Tokenizer(e.to_string()))?;
        let typed = self.config.family.uses_token_types();
        Ok(encodings
            .into_iter()
            .enumerate()
            .map(|(index, e)| {
                let types = e.get_type_ids();
                TokenizedText {
                    index,
                    ids: e.get_ids().to_vec(),
                    type_ids: if typed && types.iter().any(|&t| t != 0) {
                        types.to_vec()
                    } else {
                        Vec::new()
                    },
                }
            })
            .collect())
    }

    /// The classifier's logits for every row: `rows x num_labels`, row-major, rows in
    /// the batch's order.
    pub fn logits_batch(&self, batch: &TokenBatch) -> Result<Vec<f32>> {
        if batch.rows.is_empty() {
            return Ok(Vec::new());
        }
        let tokens = self.pack(&batch.rows)?;
        let lens: Vec<usize> = batch.rows.iter().map(|r| r.ids.len()).collect();
        let embedded = self.embeddings.forward(&tokens)?;
        let first = match &self.encoder {
            Encoder::Cpu(kernel) => {
                let hidden =
                    kernel.forward_embedded(&lens, embedded.flatten_all()?.to_vec1::<f32>()?)?;
                let h = self.config.encoder.hidden_size;
                let mut first = Vec::with_capacity(lens.len() * h);
                let mut start = 0;
                for len in &lens {
                    first.extend_from_slice(&hidden[start * h..(start + 1) * h]);
                    start += len;
                }
                Tensor::from_vec(first, (lens.len(), h), self.device())?
            }
            Encoder::Candle(encoder) => {
                let (padded, mask) = pad_packed(&embedded, &lens)?;
                encoder
                    .forward(&padded, &mask)?
                    .narrow(1, 0, 1)?
                    .squeeze(1)?
            }
        };
        Ok(self.head.forward(&first)?.flatten_all()?.to_vec1::<f32>()?)
    }

    /// One relevance score per row, in the batch's order (see the module docs).
    pub fn score_batch(&self, batch: &TokenBatch) -> Result<Vec<f32>> {
        let logits = self.logits_batch(batch)?;
        let labels = self.config.num_labels;
        let column = if labels == 1 { 0 } else { 1 };
        Ok(logits.chunks_exact(labels).map(|row| row[column]).collect())
    }

    /// Checks rows against the model and packs them. Rows come from
    /// [`CrossEncoder::tokenize_pairs`] in the normal course; a failure here means they
    /// came from another tokenizer.
    fn pack(&self, rows: &[TokenizedText]) -> Result<PackedTokens> {
        let c = &self.config;
        let total: usize = rows.iter().map(|r| r.ids.len()).sum();
        let mut tokens = PackedTokens {
            ids: Vec::with_capacity(total),
            type_ids: Vec::with_capacity(total),
            positions: Vec::with_capacity(total),
        };
        for row in rows {
            let len = row.ids.len();
            let bad = |message: String| {
                Err(OperatorError::Tokenizer(format!(
                    "row {} of the batch: {message}",
                    row.index
                )))
            };
            if len == 0 {
                return bad("no tokens, so no first token to classify".into());
            }
            if len > c.max_positions {
                return bad(format!(
                    "{len} tokens exceed the model's {} positions",
                    c.max_positions
                ));
            }
            if !row.type_ids.is_empty() && row.type_ids.len() != len {
                return bad(format!(
                    "{} token types for {len} tokens",
                    row.type_ids.len()
                ));
            }
            if let Some(id) = row
                .ids
                .iter()
                .find(|&&id| id as usize >= c.encoder.vocab_size)
            {
                return bad(format!(
                    "token id {id} is outside the model's vocabulary of {}",
                    c.encoder.vocab_size
                ));
            }
            if let Some(t) = row
                .type_ids
                .iter()
                .find(|&&t| t as usize >= c.encoder.type_vocab_size)
            {
                return bad(format!(
                    "token type {t} is outside the model's {} types",
                    c.encoder.type_vocab_size
                ));
            }
            tokens.ids.extend_from_slice(&row.ids);
            if row.type_ids.is_empty() {
                tokens.type_ids.extend(std::iter::repeat_n(0, len));
            } else {
                tokens.type_ids.extend_from_slice(&row.type_ids);
            }
            // len <= max_positions, which came from a usize config value: it fits u32 for
            // any table that fits in memory, and the cast saturates otherwise.
            tokens.positions.extend((0..len).map(|p| p as u32));
        }
        Ok(tokens)
    }
}

/// Packed rows `[tokens, hidden]` (row after row, `lens` tokens each) gathered into
/// padded `[rows, longest, hidden]`, padding slots zero, and the attention mask
/// `[rows, longest]` (u32: 1 for tokens, 0 for padding), both on `packed`'s device.
fn pad_packed(packed: &Tensor, lens: &[usize]) -> Result<(Tensor, Tensor)> {
    let (total, hidden) = packed.dims2()?;
    let longest = lens.iter().copied().max().unwrap_or(0);
    // Row `total` of the gathered-from table is the zero row every padding slot reads.
    let with_zero = Tensor::cat(
        &[
            packed,
            &Tensor::zeros((1, hidden), packed.dtype(), packed.device())?,
        ],
        0,
    )?;
    let zero_row = u32::try_from(total).map_err(|_| {
        OperatorError::Candle(candle_core::Error::Msg(format!(
            "{total} tokens in one batch exceed u32 indices"
        )))
    })?;
    let mut index = Vec::with_capacity(lens.len() * longest);
    let mut mask = Vec::with_capacity(lens.len() * longest);
    let mut start = 0u32;
    for &len in lens {
        // len <= max_positions and the sum fits u32 (checked above).
        index.extend((0..len as u32).map(|t| start + t));
        index.extend(std::iter::repeat_n(zero_row, longest - len));
        mask.extend(std::iter::repeat_n(1u32, len));
        mask.extend(std::iter::repeat_n(0u32, longest - len));
        start += len as u32;
    }
    let device = packed.device();
    let index = Tensor::from_vec(index, lens.len() * longest, device)?;
    let padded = with_zero
        .index_select(&index, 0)?
        .reshape((lens.len(), longest, hidden))?;
    let mask = Tensor::from_vec(mask, (lens.len(), longest), device)?;
    Ok((padded, mask))
}

/// `model_max_length` from `tokenizer_config.json`, when the file exists and gives a
/// usable one (transformers writes about 1e30 for "no limit": that is capped later).
fn model_max_length(dir: &Path) -> Result<Option<usize>> {
    let path = dir.join("tokenizer_config.json");
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|source| OperatorError::Io {
        path: path.clone(),
        source,
    })?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| OperatorError::BadConfig {
            path: path.clone(),
            what: "tokenizer_config.json",
            message: e.to_string(),
        })?;
    Ok(value
        .get("model_max_length")
        .and_then(|v| v.as_f64())
        .filter(|v| v.is_finite() && *v >= 1.0)
        // `as` saturates: 1e30 becomes usize::MAX, then the position limit caps it.
        .map(|v| v as usize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_rows_pad_with_zeros_and_mask_the_padding() {
        // Rows of 2, 3 and 1 tokens; token t's state is [t, -t].
        let packed: Vec<f32> = (0..6).flat_map(|t| [t as f32, -(t as f32)]).collect();
        let packed = Tensor::from_vec(packed, (6, 2), &Device::Cpu).unwrap();
        let (padded, mask) = pad_packed(&packed, &[2, 3, 1]).unwrap();
        assert_eq!(padded.dims(), &[3, 3, 2]);
        assert_eq!(
            padded.to_vec3::<f32>().unwrap(),
            vec![
                vec![vec![0., 0.], vec![1., -1.], vec![0., 0.]],
                vec![vec![2., -2.], vec![3., -3.], vec![4., -4.]],
                vec![vec![5., -5.], vec![0., 0.], vec![0., 0.]],
            ]
        );
        assert_eq!(
            mask.to_vec2::<u32>().unwrap(),
            vec![vec![1, 1, 0], vec![1, 1, 1], vec![1, 0, 0]]
        );
    }

    #[test]
    fn model_max_length_reads_caps_and_ignores() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(model_max_length(dir.path()).unwrap(), None);
        let file = dir.path().join("tokenizer_config.json");
        std::fs::write(&file, r#"{"model_max_length": 100}"#).unwrap();
        assert_eq!(model_max_length(dir.path()).unwrap(), Some(100));
        // transformers' "unlimited" marker.
        std::fs::write(
            &file,
            r#"{"model_max_length": 1000000000000000019884624838656}"#,
        )
        .unwrap();
        assert_eq!(model_max_length(dir.path()).unwrap(), Some(usize::MAX));
        std::fs::write(&file, r#"{"do_lower_case": true}"#).unwrap();
        assert_eq!(model_max_length(dir.path()).unwrap(), None);
        std::fs::write(&file, "{").unwrap();
        assert!(model_max_length(dir.path()).is_err());
    }
}
