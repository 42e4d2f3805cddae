//! The architecture of a decoder LLM, from Hugging Face's `config.json` (plus
//! `generation_config.json`) or from a GGUF file's metadata.
//!
//! Llama, Qwen2 and Mistral are one architecture here: pre-norm decoder layers of
//! RMSNorm, grouped-query attention with rotary position embeddings, and a SwiGLU MLP.
//! They differ only in what [`LlmConfig`] records: biases on the q/k/v projections
//! (Qwen2), tied embeddings, the RoPE base and Llama 3.1's frequency scaling, and a
//! sliding attention window (Mistral v0.1), which distillery does not implement: it
//! refuses sequences longer than the window instead (full attention is exact below it).

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file;
use serde::Deserialize;
use serde_json::Value;

use crate::error::{OperatorError, Result};

/// The model families this module runs, by `model_type` (config.json) or
/// `general.architecture` (GGUF).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Llama,
    Qwen2,
    Mistral,
}

/// What an error lists as supported `model_type`s.
pub const SUPPORTED_MODEL_TYPES: &str = "llama, qwen2, mistral";
/// What an error lists as supported GGUF architectures (llama.cpp writes Mistral
/// models as `llama`).
pub const SUPPORTED_GGUF_ARCHITECTURES: &str = "llama, qwen2";

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Qwen2 => "qwen2",
            Family::Mistral => "mistral",
        }
    }
}

/// How the rotary embedding pairs the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeLayout {
    /// Dimension i with i + d/2 (Hugging Face checkpoints; GGUF `qwen2`).
    Halves,
    /// Dimension 2i with 2i + 1 (GGUF `llama`, whose q/k rows were permuted by the
    /// converter to this order).
    Interleaved,
}

/// How the RoPE frequencies are derived from the base.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// base^(-2i/d).
    None,
    /// Llama 3.1's scaling (`rope_type: llama3`): low frequencies divided by `factor`,
    /// high ones kept, a smooth blend between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// One divisor per frequency, as GGUF's `rope_freqs.weight` stores Llama 3.1's
    /// scaling.
    Factors(Vec<f32>),
}

/// Everything the decoder needs to know about its shape.
#[derive(Debug, Clone, PartialEq)]
pub struct LlmConfig {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub rope_layout: RopeLayout,
    /// The output projection is the token embedding matrix.
    pub tie_word_embeddings: bool,
    /// Biases on the q, k and v projections (Qwen2; Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// A bias on the output projection (Llama with `attention_bias`).
    pub o_bias: bool,
    /// Biases on the MLP projections (Llama with `mlp_bias`).
    pub mlp_bias: bool,
    pub max_position_embeddings: usize,
    /// Tokens a query may look back over, where the model restricts it.
    pub sliding_window: Option<usize>,
    /// End-of-sequence ids from the configuration files (config.json and
    /// generation_config.json, or GGUF's eos/eot ids).
    pub eos_token_ids: Vec<u32>,
}

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

/// transformers' default RoPE base for all three families.
const DEFAULT_ROPE_THETA: f64 = 10_000.0;

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

    /// Reads the architecture from a GGUF file's metadata, llama.cpp's keys
    /// (`{arch}.block_count`, ...). `has_tensor` answers whether the file holds a tensor
    /// (biases and the output matrix are optional); `rope_factors` is the content of
    /// `rope_freqs.weight` when present.
    pub fn from_gguf(
        content: &gguf_file::Content,
        path: &Path,
        rope_factors: Option<Vec<f32>>,
    ) -> Result<Self> {
        let md = GgufMetadata {
            map: &content.metadata,
            path,
        };
        let arch = md.string("general.architecture")?;
        let (family, rope_layout) = match arch.as_str() {
            "llama" => (Family::Llama, RopeLayout::Interleaved),
            "qwen2" => (Family::Qwen2, RopeLayout::Halves),
            other => {
                return Err(OperatorError::Unsupported {
                    path: path.to_path_buf(),
                    what: "GGUF general.architecture",
                    value: other.to_string(),
                    supported: SUPPORTED_GGUF_ARCHITECTURES,
                })
            }
        };
        let key = |k: &str| format!("{arch}.{k}");
        let hidden_size = md.usize(&key("embedding_length"))?;
        let num_heads = md.usize(&key("attention.head_count"))?;
        let num_kv_heads = md
            .opt_usize(&key("attention.head_count_kv"))?
            .unwrap_or(num_heads);
        let head_dim = match md.opt_usize(&key("attention.key_length"))? {
            Some(d) => d,
            None => hidden_size / num_heads.max(1),
        };
        if let Some(rope_dim) = md.opt_usize(&key("rope.dimension_count"))? {
            if rope_dim != head_dim {
                return Err(OperatorError::Unsupported {
                    path: path.to_path_buf(),
                    what: "GGUF rope.dimension_count (partial rotary embeddings)",
                    value: format!("{rope_dim} of head dimension {head_dim}"),
                    supported: "the whole head rotated",
                });
            }
        }
        let vocab_size = match md.opt_usize(&key("vocab_size"))? {
            Some(v) => v,
            None => content
                .tensor_infos
                .get("token_embd.weight")
                .map(|t| t.shape.dims()[0])
                .ok_or_else(|| OperatorError::BadTensor {
                    path: path.to_path_buf(),
                    name: "token_embd.weight".into(),
                    message: "absent (and no vocab_size in the metadata)".into(),
                })?,
        };
        let mut eos_token_ids = Vec::new();
        for k in [
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
        ] {
            if let Some(id) = md.opt_usize(k)? {
                let id = id as u32;
                if !eos_token_ids.contains(&id) {
                    eos_token_ids.push(id);
                }
            }
        }
        let has = |name: &str| content.tensor_infos.contains_key(name);
        let config = LlmConfig {
            family,
            vocab_size,
            hidden_size,
            intermediate_size: md.usize(&key("feed_forward_length"))?,
            num_layers: md.usize(&key("block_count"))?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: md.f64(&key("attention.layer_norm_rms_epsilon"))?,
            rope_theta: md
                .opt_f64(&key("rope.freq_base"))?
                .unwrap_or(DEFAULT_ROPE_THETA),
            rope_scaling: match rope_factors {
                Some(f) => RopeScaling::Factors(f),
                None => RopeScaling::None,
            },
            rope_layout,
            tie_word_embeddings: !has("output.weight"),
            qkv_bias: has("blk.0.attn_q.bias"),
            o_bias: has("blk.0.attn_output.bias"),
            mlp_bias: has("blk.0.ffn_up.bias"),
            max_position_embeddings: md.opt_usize(&key("context_length"))?.unwrap_or(2048),
            sliding_window: None,
            eos_token_ids,
        };
        config.check(path)?;
        Ok(config)
    }

    /// Shapes that cannot be a valid decoder are configuration errors, not panics later.
    fn check(&self, path: &Path) -> Result<()> {
        let bad = |message: String| {
            Err(OperatorError::BadConfig {
                path: path.to_path_buf(),
                what: "model config",
                message,
            })
        };
        if self.vocab_size == 0 || self.hidden_size == 0 || self.num_layers == 0 {
            return bad("vocab_size, hidden_size and the number of layers must be positive".into());
        }
        if self.num_heads == 0 || self.num_kv_heads == 0 || self.num_heads % self.num_kv_heads != 0
        {
            return bad(format!(
                "{} attention heads cannot share {} key/value heads evenly",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.head_dim == 0 || self.head_dim % 2 != 0 {
            return bad(format!(
                "head dimension {} must be even (rotary pairs)",
                self.head_dim
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return bad(format!(
                "rms_norm_eps {} is not a small positive number",
                self.rms_norm_eps
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return bad(format!("rope_theta {} must be positive", self.rope_theta));
        }
        if let RopeScaling::Factors(f) = &self.rope_scaling {
            if f.len() != self.head_dim / 2 {
                return bad(format!(
                    "rope_freqs.weight has {} factors, the head needs {}",
                    f.len(),
                    self.head_dim / 2
                ));
            }
        }
        Ok(())
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

/// Typed reads of GGUF metadata whose errors name the file and the key.
struct GgufMetadata<'a> {
    map: &'a HashMap<String, gguf_file::Value>,
    path: &'a Path,
}

impl GgufMetadata<'_> {
    fn err(&self, key: &str, message: &str) -> OperatorError {
        OperatorError::BadConfig {
            path: self.path.to_path_buf(),
            what: "GGUF metadata",
            message: format!("`{key}`: {message}"),
        }
    }

    fn string(&self, key: &str) -> Result<String> {
        match self.map.get(key) {
            None => Err(self.err(key, "missing")),
            Some(v) => v
                .to_string()
                .cloned()
                .map_err(|e| self.err(key, &format!("not a string: {e}"))),
        }
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        use gguf_file::Value as V;
        let Some(v) = self.map.get(key) else {
            return Ok(None);
        };
        let n: Option<u64> = match *v {
            V::U8(x) => Some(x.into()),
            V::U16(x) => Some(x.into()),
            V::U32(x) => Some(x.into()),
            V::U64(x) => Some(x),
            V::I8(x) => u64::try_from(x).ok(),
            V::I16(x) => u64::try_from(x).ok(),
            V::I32(x) => u64::try_from(x).ok(),
            V::I64(x) => u64::try_from(x).ok(),
            _ => None,
        };
        n.and_then(|n| usize::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| self.err(key, &format!("not a non-negative integer: {v:?}")))
    }

    fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?.ok_or_else(|| self.err(key, "missing"))
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        use gguf_file::Value as V;
        match self.map.get(key) {
            None => Ok(None),
            Some(V::F32(x)) => Ok(Some(f64::from(*x))),
            Some(V::F64(x)) => Ok(Some(*x)),
            Some(v) => Err(self.err(key, &format!("not a float: {v:?}"))),
        }
    }

    fn f64(&self, key: &str) -> Result<f64> {
        self.opt_f64(key)?.ok_or_else(|| self.err(key, "missing"))
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
