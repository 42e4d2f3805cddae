//! The architecture from Hugging Face's config.json and generation_config.json.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use super::{
    Family, LlmConfig, RopeLayout, RopeScaling, DEFAULT_ROPE_THETA, SUPPORTED_MODEL_TYPES,
};
use crate::error::{OperatorError, Result};

/// `eos_token_id` is a number or a list of numbers.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    fn into_vec(self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![id],
            TokenIds::Many(ids) => ids,
        }
    }
}

/// The fields of config.json this module reads, as Hugging Face writes them for
/// `LlamaConfig`, `Qwen2Config` and `MistralConfig` (transformers 4 and 5).
#[derive(Debug, Deserialize)]
struct HfConfig {
    model_type: String,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    #[serde(default)]
    head_dim: Option<usize>,
    #[serde(default = "default_rms_norm_eps")]
    rms_norm_eps: f64,
    /// transformers 4: the RoPE base at top level, scaling apart.
    #[serde(default)]
    rope_theta: Option<f64>,
    #[serde(default)]
    rope_scaling: Option<Value>,
    /// transformers 5: both in one object.
    #[serde(default)]
    rope_parameters: Option<Value>,
    #[serde(default)]
    tie_word_embeddings: Option<bool>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    #[serde(default = "default_hidden_act")]
    hidden_act: String,
    #[serde(default = "default_max_positions")]
    max_position_embeddings: usize,
    #[serde(default)]
    sliding_window: Option<usize>,
    #[serde(default)]
    use_sliding_window: Option<bool>,
    #[serde(default)]
    eos_token_id: Option<TokenIds>,
}

/// transformers' default for all three families.
fn default_rms_norm_eps() -> f64 {
    1e-6
}

fn default_hidden_act() -> String {
    "silu".into()
}

/// transformers' `LlamaConfig` default.
fn default_max_positions() -> usize {
    2048
}

#[derive(Debug, Deserialize)]
struct GenerationConfig {
    #[serde(default)]
    eos_token_id: Option<TokenIds>,
}

fn read_json(path: &Path, what: &'static str) -> Result<Value> {
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

impl LlmConfig {
    /// Reads `dir/config.json` and, when present, `dir/generation_config.json`.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        if !path.is_file() {
            return Err(OperatorError::MissingFile {
                dir: dir.to_path_buf(),
                file: "config.json",
                why: "the model's architecture",
            });
        }
        let mut config = Self::from_hf_json(&read_json(&path, "model config")?, &path)?;
        let gen_path = dir.join("generation_config.json");
        if gen_path.is_file() {
            let gen: GenerationConfig =
                serde_json::from_value(read_json(&gen_path, "generation config")?).map_err(
                    |e| OperatorError::BadConfig {
                        path: gen_path.clone(),
                        what: "generation config",
                        message: e.to_string(),
                    },
                )?;
            for id in gen.eos_token_id.map(TokenIds::into_vec).unwrap_or_default() {
                if !config.eos_token_ids.contains(&id) {
                    config.eos_token_ids.push(id);
                }
            }
        }
        Ok(config)
    }

    /// Parses a config.json already read; `path` names it in errors.
    pub fn from_hf_json(json: &Value, path: &Path) -> Result<Self> {
        let bad = |message: String| OperatorError::BadConfig {
            path: path.to_path_buf(),
            what: "model config",
            message,
        };
        let model_type = json
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("no `model_type` string".into()))?;
        let family = match model_type {
            "llama" => Family::Llama,
            "qwen2" => Family::Qwen2,
            "mistral" => Family::Mistral,
            other => {
                return Err(OperatorError::Unsupported {
                    path: path.to_path_buf(),
                    what: "model_type",
                    value: other.to_string(),
                    supported: SUPPORTED_MODEL_TYPES,
                })
            }
        };
        let hf: HfConfig = serde_json::from_value(json.clone()).map_err(|e| bad(e.to_string()))?;
        debug_assert_eq!(hf.model_type, model_type);
        if hf.hidden_act != "silu" {
            return Err(OperatorError::Unsupported {
                path: path.to_path_buf(),
                what: "hidden_act",
                value: hf.hidden_act,
                supported: "silu",
            });
        }
        let (rope_theta, rope_scaling) = hf_rope(&hf, path)?;
        let num_kv_heads = hf.num_key_value_heads.unwrap_or(hf.num_attention_heads);
        let head_dim = hf
            .head_dim
            .unwrap_or(hf.hidden_size / hf.num_attention_heads.max(1));
        let sliding_window = match family {
            // Qwen2 declares a window but uses it only with `use_sliding_window`.
            Family::Qwen2 if hf.use_sliding_window != Some(true) => None,
            _ => hf.sliding_window,
        };
        let config = LlmConfig {
            family,
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_layers: hf.num_hidden_layers,
            num_heads: hf.num_attention_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: hf.rms_norm_eps,
            rope_theta,
            rope_scaling,
            rope_layout: RopeLayout::Halves,
            tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(false),
            qkv_bias: family == Family::Qwen2 || hf.attention_bias,
            o_bias: family == Family::Llama && hf.attention_bias,
            mlp_bias: family == Family::Llama && hf.mlp_bias,
            max_position_embeddings: hf.max_position_embeddings,
            sliding_window,
            eos_token_ids: hf.eos_token_id.map(TokenIds::into_vec).unwrap_or_default(),
        };
        config.check(path)?;
        Ok(config)
    }
}

/// RoPE base and scaling from either transformers 4's `rope_theta` + `rope_scaling` or
/// transformers 5's `rope_parameters`.
fn hf_rope(hf: &HfConfig, path: &Path) -> Result<(f64, RopeScaling)> {
    let params = hf.rope_parameters.as_ref().or(hf.rope_scaling.as_ref());
    let field = if hf.rope_parameters.is_some() {
        "rope_parameters"
    } else {
        "rope_scaling"
    };
    let theta = hf
        .rope_theta
        .or_else(|| {
            params
                .and_then(|p| p.get("rope_theta"))
                .and_then(Value::as_f64)
        })
        .unwrap_or(DEFAULT_ROPE_THETA);
    let Some(params) = params.filter(|p| !p.is_null()) else {
        return Ok((theta, RopeScaling::None));
    };
    let rope_type = params
        .get("rope_type")
        .or_else(|| params.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    match rope_type {
        "default" => Ok((theta, RopeScaling::None)),
        "llama3" => {
            let num = |k: &'static str| {
                params
                    .get(k)
                    .and_then(Value::as_f64)
                    .ok_or_else(|| OperatorError::BadConfig {
                        path: path.to_path_buf(),
                        what: "model config",
                        message: format!("{field}.{k}: missing or not a number (rope_type llama3)"),
                    })
            };
            Ok((
                theta,
                RopeScaling::Llama3 {
                    factor: num("factor")?,
                    low_freq_factor: num("low_freq_factor")?,
                    high_freq_factor: num("high_freq_factor")?,
                    original_max_position_embeddings: num("original_max_position_embeddings")?,
                },
            ))
        }
        other => Err(OperatorError::Unsupported {
            path: path.to_path_buf(),
            what: "rope_type (in rope_scaling / rope_parameters)",
            value: other.to_string(),
            supported: "default, llama3",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({
            "model_type": "llama", "vocab_size": 100, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "eos_token_id": [1, 2]
        })
    }

    #[test]
    fn reads_transformers_4_and_5_rope_fields() {
        let mut v4 = base();
        v4["rope_theta"] = json!(500000.0);
        v4["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192});
        let mut v5 = base();
        v5["rope_parameters"] = json!({"rope_type": "llama3", "rope_theta": 500000.0,
            "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192});
        let a = LlmConfig::from_hf_json(&v4, Path::new("c.json")).unwrap();
        let b = LlmConfig::from_hf_json(&v5, Path::new("c.json")).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.rope_theta, 500000.0);
        assert_eq!(a.head_dim, 16);
        assert_eq!(a.eos_token_ids, vec![1, 2]);
        assert!(matches!(a.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
    }

    #[test]
    fn unknown_rope_type_and_activation_are_named() {
        let mut c = base();
        c["rope_scaling"] = json!({"type": "dynamic", "factor": 2.0});
        let e = LlmConfig::from_hf_json(&c, Path::new("x/config.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("x/config.json") && e.contains("dynamic"), "{e}");
        let mut c = base();
        c["hidden_act"] = json!("gelu");
        let e = LlmConfig::from_hf_json(&c, Path::new("x/config.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("hidden_act") && e.contains("gelu"), "{e}");
    }

    #[test]
    fn qwen2_has_qkv_bias_and_ignores_unused_window() {
        let mut c = base();
        c["model_type"] = json!("qwen2");
        c["sliding_window"] = json!(4096);
        c["use_sliding_window"] = json!(false);
        let q = LlmConfig::from_hf_json(&c, Path::new("c.json")).unwrap();
        assert!(q.qkv_bias && !q.o_bias);
        assert_eq!(q.sliding_window, None);
        c["model_type"] = json!("mistral");
        let m = LlmConfig::from_hf_json(&c, Path::new("c.json")).unwrap();
        assert!(!m.qkv_bias);
        assert_eq!(m.sliding_window, Some(4096));
    }

    #[test]
    fn uneven_head_grouping_is_a_config_error() {
        let mut c = base();
        c["num_key_value_heads"] = json!(3);
        let e = LlmConfig::from_hf_json(&c, Path::new("c.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("key/value heads"), "{e}");
    }
}
