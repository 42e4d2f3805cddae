//! The embeddings of all three families, over packed (unpadded) token rows: word plus
//! position plus token type, layer norm, then (ELECTRA, when its embeddings are narrower
//! than the encoder) a linear projection to the hidden size. This is what transformers'
//! `BertEmbeddings`, `ElectraEmbeddings` + `embeddings_project` and
//! `XLMRobertaEmbeddings` compute in eval mode, for texts without padding: XLM-RoBERTa
//! numbers a text's tokens from `pad_token_id + 1`, and with no padding inside a text
//! that is exactly its position ids.

use candle_core::{Device, Tensor};

use super::checkpoint::Checkpoint;
use super::config::ModelConfig;
use crate::error::Result;

/// The packed tokens of a batch, one entry per token, text after text.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct PackedTokens {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
    /// Index of each token within its text (0 for a text's first token).
    pub positions: Vec<u32>,
}

pub(crate) struct Embeddings {
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    norm_weight: Tensor,
    norm_bias: Tensor,
    eps: f32,
    /// `[embedding, hidden]` (transposed) and `[hidden]`, when the widths differ.
    project: Option<(Tensor, Tensor)>,
    /// `config.position_offset`, added to every position.
    position_offset: u32,
}

impl Embeddings {
    pub fn load(ckpt: &Checkpoint, c: &ModelConfig) -> Result<Self> {
        let (e, h) = (c.embedding_size, c.encoder.hidden_size);
        let get = |name: &str, shape: &[usize]| ckpt.encoder(name, shape);
        let project = if e != h {
            let weight = get("embeddings_project.weight", &[h, e])?;
            let bias = get("embeddings_project.bias", &[h])?;
            Some((weight.t()?.contiguous()?, bias))
        } else {
            None
        };
        Ok(Self {
            word: get(
                "embeddings.word_embeddings.weight",
                &[c.encoder.vocab_size, e],
            )?,
            position: get(
                "embeddings.position_embeddings.weight",
                &[c.encoder.max_position_embeddings, e],
            )?,
            token_type: get(
                "embeddings.token_type_embeddings.weight",
                &[c.encoder.type_vocab_size, e],
            )?,
            norm_weight: get("embeddings.LayerNorm.weight", &[e])?,
            norm_bias: get("embeddings.LayerNorm.bias", &[e])?,
            eps: c.encoder.layer_norm_eps as f32,
            project,
            position_offset: u32::try_from(c.position_offset).unwrap_or(u32::MAX),
        })
    }

    /// `[tokens, hidden]` for checked tokens (ids within the vocabulary, type ids within
    /// the type vocabulary, positions within `max_positions`).
    pub fn forward(&self, tokens: &PackedTokens) -> Result<Tensor> {
        let device = self.word.device();
        let index = |values: &[u32]| -> Result<Tensor> {
            Ok(Tensor::from_slice(values, values.len(), device)?)
        };
        let positions: Vec<u32> = tokens
            .positions
            .iter()
            .map(|p| p.saturating_add(self.position_offset))
            .collect();
        let sum = (self.word.index_select(&index(&tokens.ids)?, 0)?
            + self.position.index_select(&index(&positions)?, 0)?)?
            + self.token_type.index_select(&index(&tokens.type_ids)?, 0)?;
        let normed =
            candle_nn::ops::layer_norm(&sum?, &self.norm_weight, &self.norm_bias, self.eps)?;
        Ok(match &self.project {
            Some((weight_t, bias)) => normed.matmul(weight_t)?.broadcast_add(bias)?,
            None => normed,
        })
    }

    pub fn device(&self) -> &Device {
        self.word.device()
    }
}
