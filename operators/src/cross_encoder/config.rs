//! What a cross-encoder reads from a sequence-classification checkpoint's `config.json`:
//! the family (from `model_type`, checked against `architectures`), the encoder's shape
//! (as a [`BertConfig`], since all three families share BERT's layers), and what differs
//! around it: the embedding width, the position table's offset, the number of labels.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::bert::BertConfig;
use crate::error::{OperatorError, Result};

/// The checkpoint families a cross-encoder loads. All three run BERT's encoder layers;
/// they differ in embeddings, tensor prefix and classification head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `BertForSequenceClassification`: tanh pooler on `[CLS]`, then `classifier`.
    Bert,
    /// `ElectraForSequenceClassification`: embeddings of their own width (projected to
    /// the hidden size when it differs), head `dense` -> GELU -> `out_proj`.
    Electra,
    /// `XLMRobertaForSequenceClassification`: positions counted from `pad_token_id + 1`,
    /// no token types, head `dense` -> tanh -> `out_proj`.
    XlmRoberta,
}

/// `model_type` values [`Family::parse`] accepts, for error messages.
pub const SUPPORTED_MODEL_TYPES: &str = "bert, electra, xlm-roberta";

/// transformers' `ElectraConfig` default, used when `config.json` omits `embedding_size`.
const ELECTRA_DEFAULT_EMBEDDING_SIZE: usize = 128;

/// transformers' `PretrainedConfig` default when `config.json` names no labels.
const DEFAULT_NUM_LABELS: usize = 2;

impl Family {
    /// The family of a `model_type`, if supported.
    pub fn parse(model_type: &str) -> Option<Self> {
        match model_type {
            "bert" => Some(Self::Bert),
            "electra" => Some(Self::Electra),
            "xlm-roberta" => Some(Self::XlmRoberta),
            _ => None,
        }
    }

    /// The `model_type` of the family, as `config.json` spells it.
    pub fn model_type(self) -> &'static str {
        match self {
            Self::Bert => "bert",
            Self::Electra => "electra",
            Self::XlmRoberta => "xlm-roberta",
        }
    }

    /// The class transformers loads the checkpoint with.
    pub fn architecture(self) -> &'static str {
        match self {
            Self::Bert => "BertForSequenceClassification",
            Self::Electra => "ElectraForSequenceClassification",
            Self::XlmRoberta => "XLMRobertaForSequenceClassification",
        }
    }

    /// The prefix of the encoder's tensors in the checkpoint.
    pub fn prefix(self) -> &'static str {
        match self {
            Self::Bert => "bert.",
            Self::Electra => "electra.",
            Self::XlmRoberta => "roberta.",
        }
    }

    /// Whether the model tells a pair's two texts apart by token type. XLM-RoBERTa's
    /// tokenizer returns no `token_type_ids`, so transformers feeds it zeros.
    pub fn uses_token_types(self) -> bool {
        !matches!(self, Self::XlmRoberta)
    }
}

/// The fields of `config.json` beyond [`BertConfig`]'s.
#[derive(Debug, Deserialize)]
struct Extra {
    model_type: Option<String>,
    #[serde(default)]
    architectures: Vec<String>,
    embedding_size: Option<usize>,
    num_labels: Option<usize>,
    #[serde(default)]
    id2label: BTreeMap<String, String>,
}

/// A checked cross-encoder configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub family: Family,
    /// The encoder's shape; its `model_type` is left as the file says.
    pub encoder: BertConfig,
    /// Width of the word, position and token-type embeddings (ELECTRA's may be narrower
    /// than `hidden_size`; the others' equal it).
    pub embedding_size: usize,
    pub num_labels: usize,
    /// Row of the position table that a text's first token uses: `pad_token_id + 1` for
    /// XLM-RoBERTa, whose positions skip the padding row and the rows before it; 0 else.
    pub position_offset: usize,
    /// Most tokens a text may have: position rows from `position_offset` on.
    pub max_positions: usize,
}

impl ModelConfig {
    /// Reads and checks `path` (a `config.json`).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| OperatorError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&text, path)
    }

    /// Parses and checks the text of a `config.json`; `path` only names it in errors.
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let bad = |message: String| OperatorError::BadConfig {
            path: path.to_path_buf(),
            what: "sequence-classification config.json",
            message,
        };
        let extra: Extra = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        let model_type = extra
            .model_type
            .ok_or_else(|| bad("no `model_type`".into()))?;
        let family = Family::parse(&model_type).ok_or_else(|| OperatorError::Unsupported {
            path: path.to_path_buf(),
            what: "model_type",
            value: model_type.clone(),
            supported: SUPPORTED_MODEL_TYPES,
        })?;
        if !extra.architectures.is_empty()
            && !extra
                .architectures
                .iter()
                .any(|a| a == family.architecture())
        {
            return Err(OperatorError::Unsupported {
                path: path.to_path_buf(),
                what: "architectures",
                value: extra.architectures.join(", "),
                supported: "BertForSequenceClassification, ElectraForSequenceClassification, \
                            XLMRobertaForSequenceClassification (matching model_type)",
            });
        }
        let encoder: BertConfig = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        if encoder.position_embedding_type != "absolute" {
            return Err(OperatorError::Unsupported {
                path: path.to_path_buf(),
                what: "position_embedding_type",
                value: encoder.position_embedding_type.clone(),
                supported: "absolute",
            });
        }
        if encoder.num_attention_heads == 0
            || !encoder
                .hidden_size
                .is_multiple_of(encoder.num_attention_heads)
        {
            return Err(bad(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                encoder.hidden_size, encoder.num_attention_heads
            )));
        }
        let embedding_size = match family {
            Family::Electra => extra
                .embedding_size
                .unwrap_or(ELECTRA_DEFAULT_EMBEDDING_SIZE),
            Family::Bert | Family::XlmRoberta => encoder.hidden_size,
        };
        // transformers sets num_labels from id2label when the file has one.
        let num_labels = if extra.id2label.is_empty() {
            extra.num_labels.unwrap_or(DEFAULT_NUM_LABELS)
        } else {
            extra.id2label.len()
        };
        if !(1..=2).contains(&num_labels) {
            return Err(OperatorError::Unsupported {
                path: path.to_path_buf(),
                what: "num_labels",
                value: num_labels.to_string(),
                supported: "1 (the logit is the score) or 2 (label 1's logit is the score)",
            });
        }
        let position_offset = match family {
            Family::XlmRoberta => encoder.pad_token_id + 1,
            Family::Bert | Family::Electra => 0,
        };
        let max_positions = encoder
            .max_position_embeddings
            .saturating_sub(position_offset);
        if max_positions == 0 {
            return Err(bad(format!(
                "max_position_embeddings {} leaves no position after the first {} rows",
                encoder.max_position_embeddings, position_offset
            )));
        }
        Ok(Self {
            family,
            encoder,
            embedding_size,
            num_labels,
            position_offset,
            max_positions,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: &str = r#""vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 16, "max_position_embeddings": 20"#;

    fn parse(fields: &str) -> Result<ModelConfig> {
        ModelConfig::from_json(&format!("{{{SHAPE}, {fields}}}"), Path::new("config.json"))
    }

    #[test]
    fn families_offsets_and_labels() {
        let bert = parse(r#""model_type": "bert", "id2label": {"0": "LABEL_0"}"#).unwrap();
        assert_eq!(bert.family, Family::Bert);
        assert_eq!((bert.num_labels, bert.embedding_size), (1, 8));
        assert_eq!((bert.position_offset, bert.max_positions), (0, 20));

        let xlmr = parse(r#""model_type": "xlm-roberta", "pad_token_id": 1"#).unwrap();
        // Rows 0 and 1 are skipped: 20 - 2 = 18 positions; no labels named: 2.
        assert_eq!((xlmr.position_offset, xlmr.max_positions), (2, 18));
        assert_eq!(xlmr.num_labels, 2);
        assert!(!xlmr.family.uses_token_types());

        let electra = parse(
            r#""model_type": "electra", "embedding_size": 4,
            "architectures": ["ElectraForSequenceClassification"]"#,
        )
        .unwrap();
        assert_eq!(electra.embedding_size, 4);
        let electra_default = parse(r#""model_type": "electra""#).unwrap();
        assert_eq!(electra_default.embedding_size, 128);
    }

    #[test]
    fn rejects_what_it_cannot_run() {
        let err = parse(r#""model_type": "deberta-v2""#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unsupported model_type `deberta-v2`"), "{err}");
        assert!(err.contains("bert, electra, xlm-roberta"), "{err}");

        let err = parse(r#""model_type": "bert", "architectures": ["BertForMaskedLM"]"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("architectures `BertForMaskedLM`"), "{err}");

        let three = r#""model_type": "bert", "id2label": {"0": "a", "1": "b", "2": "c"}"#;
        let err = parse(three).unwrap_err().to_string();
        assert!(err.contains("num_labels `3`"), "{err}");

        let err = parse(r#""model_type": "xlm-roberta", "pad_token_id": 19"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("leaves no position"), "{err}");

        let err = ModelConfig::from_json(r#"{"vocab_size": 3}"#, Path::new("c.json"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no `model_type`"), "{err}");
    }
}
