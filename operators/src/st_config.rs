//! The sentence-transformers files of a model directory: which modules follow the
//! transformer (`modules.json`), how it pools (`1_Pooling/config.json`), its maximum
//! length and casing (`sentence_bert_config.json`) and its prompts
//! (`config_sentence_transformers.json`). A directory without `modules.json` is a plain
//! Hugging Face encoder, which sentence-transformers reads as mean pooling without
//! normalisation; distillery does the same.

use std::collections::BTreeMap;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{OperatorError, Result};

/// How token states become one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// The `[CLS]` token's state.
    Cls,
    /// The mean over real (unpadded) tokens.
    Mean,
}

impl Pooling {
    pub fn name(self) -> &'static str {
        match self {
            Pooling::Cls => "cls",
            Pooling::Mean => "mean",
        }
    }
}

/// What the sentence-transformers files say, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct SentenceTransformerSpec {
    pub pooling: Pooling,
    pub normalize: bool,
    /// Maximum tokens per text, special tokens included; `None` when the directory does
    /// not say (the caller then uses the position-embedding limit).
    pub max_seq_length: Option<usize>,
    pub do_lower_case: bool,
    /// Named prompts (`query`, `passage`, `document`, ...) prepended to the text.
    pub prompts: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct ModuleEntry {
    #[serde(default)]
    path: String,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize)]
struct PoolingFile {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
    #[serde(default)]
    pooling_mode_weightedmean_tokens: bool,
    #[serde(default)]
    pooling_mode_lasttoken: bool,
    #[serde(default)]
    pooling_mode: Option<String>,
}

#[derive(Deserialize)]
struct SentenceBertFile {
    max_seq_length: Option<usize>,
    #[serde(default)]
    do_lower_case: bool,
}

#[derive(Deserialize)]
struct StConfigFile {
    #[serde(default)]
    prompts: BTreeMap<String, String>,
}

const MODULE_TRANSFORMER: &str = "sentence_transformers.models.Transformer";
const MODULE_POOLING: &str = "sentence_transformers.models.Pooling";
const MODULE_NORMALIZE: &str = "sentence_transformers.models.Normalize";

fn read_json<T: DeserializeOwned>(path: &Path, what: &'static str) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|source| OperatorError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| OperatorError::BadConfig {
        path: path.to_path_buf(),
        what,
        message: e.to_string(),
    })
}

fn read_optional<T: DeserializeOwned>(path: &Path, what: &'static str) -> Result<Option<T>> {
    if path.is_file() {
        read_json(path, what).map(Some)
    } else {
        Ok(None)
    }
}

impl SentenceTransformerSpec {
    /// Reads the sentence-transformers files of `dir`.
    pub fn read(dir: &Path) -> Result<Self> {
        let modules_path = dir.join("modules.json");
        let mut pooling = Pooling::Mean;
        let mut normalize = false;
        if let Some(modules) =
            read_optional::<Vec<ModuleEntry>>(&modules_path, "sentence-transformers modules.json")?
        {
            for m in &modules {
                match m.kind.as_str() {
                    MODULE_TRANSFORMER => {}
                    MODULE_POOLING => {
                        pooling = read_pooling(&dir.join(&m.path).join("config.json"))?
                    }
                    MODULE_NORMALIZE => normalize = true,
                    other => {
                        return Err(OperatorError::Unsupported {
                            path: modules_path.clone(),
                            what: "sentence-transformers module",
                            value: other.to_string(),
                            supported: "Transformer, Pooling, Normalize",
                        })
                    }
                }
            }
        }
        let sbert: Option<SentenceBertFile> = read_optional(
            &dir.join("sentence_bert_config.json"),
            "sentence_bert_config.json",
        )?;
        let st: Option<StConfigFile> = read_optional(
            &dir.join("config_sentence_transformers.json"),
            "config_sentence_transformers.json",
        )?;
        Ok(Self {
            pooling,
            normalize,
            max_seq_length: sbert.as_ref().and_then(|s| s.max_seq_length),
            do_lower_case: sbert.map(|s| s.do_lower_case).unwrap_or(false),
            prompts: st.map(|s| s.prompts).unwrap_or_default(),
        })
    }
}

fn read_pooling(path: &Path) -> Result<Pooling> {
    let f: PoolingFile = read_json(path, "sentence-transformers pooling config")?;
    if let Some(mode) = &f.pooling_mode {
        return match mode.as_str() {
            "cls" => Ok(Pooling::Cls),
            "mean" => Ok(Pooling::Mean),
            other => Err(unsupported_pooling(path, other)),
        };
    }
    let modes = [
        (f.pooling_mode_cls_token, "cls"),
        (f.pooling_mode_mean_tokens, "mean"),
        (f.pooling_mode_max_tokens, "max"),
        (f.pooling_mode_mean_sqrt_len_tokens, "mean_sqrt_len"),
        (f.pooling_mode_weightedmean_tokens, "weightedmean"),
        (f.pooling_mode_lasttoken, "lasttoken"),
    ];
    let on: Vec<&str> = modes.iter().filter(|(b, _)| *b).map(|(_, n)| *n).collect();
    match on.as_slice() {
        ["cls"] => Ok(Pooling::Cls),
        ["mean"] => Ok(Pooling::Mean),
        [] => Err(unsupported_pooling(path, "none")),
        several => Err(unsupported_pooling(path, &several.join("+"))),
    }
}

fn unsupported_pooling(path: &Path, value: &str) -> OperatorError {
    OperatorError::Unsupported {
        path: path.to_path_buf(),
        what: "pooling mode",
        value: value.to_string(),
        supported: "exactly one of cls, mean",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        let p = dir.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    #[test]
    fn reads_minilm_style_directory() {
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            "modules.json",
            r#"[{"idx":0,"name":"0","path":"","type":"sentence_transformers.models.Transformer"},
                {"idx":1,"name":"1","path":"1_Pooling","type":"sentence_transformers.models.Pooling"},
                {"idx":2,"name":"2","path":"2_Normalize","type":"sentence_transformers.models.Normalize"}]"#,
        );
        write(
            d.path(),
            "1_Pooling/config.json",
            r#"{"word_embedding_dimension":384,"pooling_mode_cls_token":false,"pooling_mode_mean_tokens":true}"#,
        );
        write(
            d.path(),
            "sentence_bert_config.json",
            r#"{"max_seq_length":256,"do_lower_case":false}"#,
        );
        write(
            d.path(),
            "config_sentence_transformers.json",
            r#"{"prompts":{"query":"query: ","passage":"passage: "}}"#,
        );
        let s = SentenceTransformerSpec::read(d.path()).unwrap();
        assert_eq!(s.pooling, Pooling::Mean);
        assert!(s.normalize);
        assert_eq!(s.max_seq_length, Some(256));
        assert_eq!(s.prompts["query"], "query: ");
    }

    #[test]
    fn plain_hf_directory_is_mean_unnormalised() {
        let d = tempfile::tempdir().unwrap();
        let s = SentenceTransformerSpec::read(d.path()).unwrap();
        assert_eq!(s.pooling, Pooling::Mean);
        assert!(!s.normalize);
        assert_eq!(s.max_seq_length, None);
    }

    #[test]
    fn unsupported_pooling_names_file_and_mode() {
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            "modules.json",
            r#"[{"path":"1_Pooling","type":"sentence_transformers.models.Pooling"}]"#,
        );
        write(
            d.path(),
            "1_Pooling/config.json",
            r#"{"pooling_mode_max_tokens":true}"#,
        );
        let e = SentenceTransformerSpec::read(d.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("1_Pooling/config.json"), "{e}");
        assert!(e.contains("unsupported pooling mode `max`"), "{e}");
    }

    #[test]
    fn malformed_modules_json_is_named() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "modules.json", "[{");
        let e = SentenceTransformerSpec::read(d.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("modules.json: not a valid"), "{e}");
    }
}
