//! The architecture from a GGUF file's metadata, llama.cpp's keys.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file;

use super::{
    Family, LlmConfig, RopeLayout, RopeScaling, DEFAULT_ROPE_THETA, SUPPORTED_GGUF_ARCHITECTURES,
};
use crate::error::{OperatorError, Result};

impl LlmConfig {
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
