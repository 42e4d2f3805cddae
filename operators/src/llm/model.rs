//! The decoder: Llama's architecture (transformers' `modeling_llama.py`), which Qwen2 and
//! Mistral share, over packed rows.
//!
//! A forward step takes the new tokens of every active row one after another (no
//! padding) with each row's past length ([`StepRows`]); embeddings, norms, projections
//! and the MLP treat them as one `(T, hidden)` matrix, RoPE rotates each token by its own
//! position, and the [`KvCache`] keeps the rows apart in attention. Only each row's last
//! token goes through the final norm and the output projection: a step returns
//! `(rows, vocab)` logits, the distribution of each row's next token. Every product is
//! computed row by row (the Q8_0 kernel of `q8_product`, or the dense product), so how a
//! token is computed never depends on the other rows of its step, nor on whether it is
//! a prompt token or a generated one.

use candle_core::{Device, Tensor};

use super::attention::cpu::CpuKvCache;
use super::attention::tensor::TensorKvCache;
use super::attention::{AttentionShape, KvCache, StepRows};
use super::config::LlmConfig;
use super::rope::Rope;
use super::weights::{Embedding, Linear, Projections, Weights};
use crate::cpu_path::{CpuPath, SupportedPath};
use crate::error::{OperatorError, Result};

/// One decoder layer (`LlamaDecoderLayer`): pre-norm attention and SwiGLU MLP, each
/// added to the residual stream. q/k/v and gate/up run as one product each where their
/// weights stack ([`Projections`]).
struct DecoderLayer {
    input_norm: Tensor,
    qkv: Projections,
    o: Linear,
    post_norm: Tensor,
    gate_up: Projections,
    down: Linear,
}

impl DecoderLayer {
    fn load(weights: &Weights, c: &LlmConfig, i: usize) -> Result<Self> {
        let p = format!("model.layers.{i}");
        let (h, d) = (c.hidden_size, c.head_dim);
        let attn = |name: &str, out: usize| {
            weights.linear(&format!("{p}.self_attn.{name}"), h, out, c.qkv_bias)
        };
        let mlp = |name: &str| {
            weights.linear(
                &format!("{p}.mlp.{name}"),
                h,
                c.intermediate_size,
                c.mlp_bias,
            )
        };
        Ok(DecoderLayer {
            input_norm: weights.vector(&format!("{p}.input_layernorm.weight"), h)?,
            qkv: Projections::new(vec![
                attn("q_proj", c.num_heads * d)?,
                attn("k_proj", c.num_kv_heads * d)?,
                attn("v_proj", c.num_kv_heads * d)?,
            ])?,
            o: weights.linear(
                &format!("{p}.self_attn.o_proj"),
                c.num_heads * d,
                h,
                c.o_bias,
            )?,
            post_norm: weights.vector(&format!("{p}.post_attention_layernorm.weight"), h)?,
            gate_up: Projections::new(vec![mlp("gate_proj")?, mlp("up_proj")?])?,
            down: weights.linear(
                &format!("{p}.mlp.down_proj"),
                c.intermediate_size,
                h,
                c.mlp_bias,
            )?,
        })
    }
}

/// A decoder-only language model ready to run steps.
pub(crate) struct Decoder {
    config: LlmConfig,
    embed: Embedding,
    layers: Vec<DecoderLayer>,
    norm: Tensor,
    lm_head: Linear,
    rope: Rope,
    device: Device,
    /// The CPU path of the CPU kernels: attention and the Q8_0 products
    /// ([`crate::cpu_path`]).
    cpu_path: SupportedPath,
}

impl Decoder {
    pub fn load(weights: &Weights, config: LlmConfig, device: &Device) -> Result<Self> {
        let embed = weights.embedding(
            "model.embed_tokens.weight",
            config.vocab_size,
            config.hidden_size,
        )?;
        let lm_head = if config.tie_word_embeddings && !weights.contains("lm_head.weight") {
            embed.as_linear()?
        } else {
            weights.linear("lm_head", config.hidden_size, config.vocab_size, false)?
        };
        let layers = (0..config.num_layers)
            .map(|i| DecoderLayer::load(weights, &config, i))
            .collect::<Result<Vec<_>>>()?;
        Ok(Decoder {
            norm: weights.vector("model.norm.weight", config.hidden_size)?,
            rope: Rope::new(&config),
            embed,
            layers,
            lm_head,
            config,
            device: device.clone(),
            cpu_path: SupportedPath::active()?,
        })
    }

    pub fn config(&self) -> &LlmConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The CPU path the CPU attention kernel runs on.
    pub fn cpu_path(&self) -> CpuPath {
        self.cpu_path.path()
    }

    /// Runs the Q8_0 products, and the CPU attention kernel of caches made from now on,
    /// on `path`; fails, changing nothing, when this CPU cannot run it.
    pub fn set_cpu_path(&mut self, path: CpuPath) -> Result<()> {
        self.cpu_path = path.check()?;
        Ok(())
    }

    /// The stored type of the layers' matrices (`None`: dense f32), for reports.
    pub fn quantization(&self) -> Option<String> {
        self.layers
            .first()
            .and_then(|l| l.qkv.quantization())
            .map(|q| format!("{q:?}"))
    }

    fn attention_shape(&self) -> AttentionShape {
        AttentionShape {
            heads: self.config.num_heads,
            kv_heads: self.config.num_kv_heads,
            head_dim: self.config.head_dim,
            layers: self.config.num_layers,
        }
    }

    /// An empty cache for rows that will hold at most `capacity[i]` tokens each: the CPU
    /// kernel's on the CPU, padded tensors elsewhere (or everywhere when `padded`).
    pub fn new_cache(&self, capacity: &[usize], padded: bool) -> KvCache {
        if self.device.is_cpu() && !padded {
            KvCache::Cpu(CpuKvCache::new(
                self.attention_shape(),
                capacity,
                self.cpu_path,
            ))
        } else {
            KvCache::Tensor(TensorKvCache::new(
                self.attention_shape(),
                capacity.len(),
                &self.device,
            ))
        }
    }

    /// Runs one step: `tokens` are the packed new tokens of the rows of `step` (prompt
    /// tokens or generated ones, as `phase` says); returns the `(rows, vocab)` f32 logits
    /// of each row's next token.
    pub fn forward(&self, tokens: &[u32], step: &StepRows, cache: &mut KvCache) -> Result<Tensor> {
        let c = &self.config;
        if tokens.len() != step.tokens() || tokens.is_empty() {
            return Err(OperatorError::Candle(candle_core::Error::Msg(format!(
                "decoder step: {} tokens for rows holding {} (a bug)",
                tokens.len(),
                step.tokens()
            ))));
        }
        let eps = c.rms_norm_eps as f32;
        let path = self.cpu_path;
        let ids = Tensor::from_slice(tokens, tokens.len(), &self.device)?;
        let mut x = self.embed.forward(&ids)?;
        let (cos, sin) = self.rope.tables(&step.positions(), &self.device)?;
        cache.begin_step(step)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.input_norm, eps)?;
            let [q, k, v] = three(layer.qkv.forward(&h, path)?)?;
            let q = self.rope.apply(&q.contiguous()?, c.num_heads, &cos, &sin)?;
            let k = self
                .rope
                .apply(&k.contiguous()?, c.num_kv_heads, &cos, &sin)?;
            let a = cache.attend(i, &q, &k, &v)?;
            x = (x + layer.o.forward(&a, path)?)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.post_norm, eps)?;
            let [gate, up] = two(layer.gate_up.forward(&h, path)?)?;
            let gated = (candle_nn::ops::silu(&gate)? * up)?;
            x = (x + layer.down.forward(&gated, path)?)?;
        }
        let last = step.last_tokens();
        let last = Tensor::from_slice(&last, last.len(), &self.device)?;
        let x = candle_nn::ops::rms_norm(&x.index_select(&last, 0)?, &self.norm, eps)?;
        let logits = self.lm_head.forward(&x, path)?;
        debug_assert_eq!(self.lm_head.out_features(), c.vocab_size);
        Ok(logits)
    }
}

fn parts<const N: usize>(v: Vec<Tensor>) -> Result<[Tensor; N]> {
    v.try_into().map_err(|v: Vec<Tensor>| {
        OperatorError::Candle(candle_core::Error::Msg(format!(
            "{} projections where {N} were built (a bug)",
            v.len()
        )))
    })
}

fn three(v: Vec<Tensor>) -> Result<[Tensor; 3]> {
    parts(v)
}

fn two(v: Vec<Tensor>) -> Result<[Tensor; 2]> {
    parts(v)
}
