//! The student's encoder: BERT (transformers' `modeling_bert.py`: `BertEmbeddings`,
//! `BertSelfAttention`, `BertSelfOutput`, `BertIntermediate`, `BertOutput`) written with
//! candle operations that all have a backward pass, so that every weight receives a
//! gradient.
//!
//! What differs from the inference encoders ([`crate::bert`], [`crate::cpu_bert`]), and
//! why:
//! - Layer norm, softmax and erf GELU are the operations of [`super::fused`], which have
//!   backward passes: candle-nn's fused `layer_norm` and `softmax_last_dim` have none and
//!   silently cut the graph (/work/shared/FINDINGS.md), and candle's composed versions
//!   are slow backward.
//! - Linear weights stay `[out, in]` as the checkpoint stores them and are transposed
//!   as a view inside the graph; query, key and value are three products rather than
//!   one fused product, because a concatenation made at load time would be a new tensor,
//!   not the trained variable.
//! - There is no dropout (the recipe trains with dropout 0).
//!
//! Inputs are padded `[batch, len]` with an additive attention mask, as in transformers.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor, Var};

use crate::batcher::TokenBatch;
use crate::bert::BertConfig;
use crate::error::{OperatorError, Result};

/// Added to attention scores of padding keys; its exponential underflows to exactly 0,
/// as with transformers' dtype minimum, so padding never changes a real token's state.
const MASKED_SCORE: f32 = -1e9;

/// Name and shape of every trainable tensor of a BERT encoder with `config`, by the names
/// of a Hugging Face `BertModel` checkpoint without prefix.
pub(crate) fn parameter_shapes(config: &BertConfig) -> Vec<(String, Vec<usize>)> {
    let h = config.hidden_size;
    let i_size = config.intermediate_size;
    let mut out = vec![
        (
            "embeddings.word_embeddings.weight".to_string(),
            vec![config.vocab_size, h],
        ),
        (
            "embeddings.position_embeddings.weight".to_string(),
            vec![config.max_position_embeddings, h],
        ),
        (
            "embeddings.token_type_embeddings.weight".to_string(),
            vec![config.type_vocab_size, h],
        ),
        ("embeddings.LayerNorm.weight".to_string(), vec![h]),
        ("embeddings.LayerNorm.bias".to_string(), vec![h]),
    ];
    for layer in 0..config.num_hidden_layers {
        let p = format!("encoder.layer.{layer}");
        let linears = [
            ("attention.self.query", h, h),
            ("attention.self.key", h, h),
            ("attention.self.value", h, h),
            ("attention.output.dense", h, h),
            ("intermediate.dense", h, i_size),
            ("output.dense", i_size, h),
        ];
        for (name, d_in, d_out) in linears {
            out.push((format!("{p}.{name}.weight"), vec![d_out, d_in]));
            out.push((format!("{p}.{name}.bias"), vec![d_out]));
        }
        for norm in ["attention.output.LayerNorm", "output.LayerNorm"] {
            out.push((format!("{p}.{norm}.weight"), vec![h]));
            out.push((format!("{p}.{norm}.bias"), vec![h]));
        }
    }
    out
}

/// Which parameter tensors the graph is built from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tracking {
    /// The variables themselves: operations are recorded for `backward`.
    Gradients,
    /// Detached views of the same storage: the same values, nothing recorded, and every
    /// intermediate freed as soon as it is used.
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Activation {
    /// transformers' "gelu": the exact, erf-based GELU.
    GeluErf,
    /// "gelu_new" / "gelu_pytorch_tanh": the tanh approximation.
    GeluTanh,
    Relu,
}

impl Activation {
    fn parse(name: &str) -> Result<Self> {
        match name {
            "gelu" => Ok(Self::GeluErf),
            "gelu_new" | "gelu_pytorch_tanh" => Ok(Self::GeluTanh),
            "relu" => Ok(Self::Relu),
            other => Err(OperatorError::Candle(candle_core::Error::Msg(format!(
                "hidden_act `{other}` passed config validation but has no student activation"
            )))),
        }
    }

    fn apply(self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::GeluErf => super::fused::gelu_erf(xs),
            Self::GeluTanh => xs.gelu(),
            Self::Relu => xs.relu(),
        }
    }
}

/// A linear layer over `[rows, in]` inputs; `weight` is `[out, in]`.
struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        xs.matmul(&self.weight.t()?)?.broadcast_add(&self.bias)
    }
}

/// Layer norm over the last dimension, from operations that all differentiate.
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        super::fused::layer_norm(xs, &self.weight, &self.bias, self.eps)
    }
}

struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    inter: Linear,
    out: Linear,
    out_norm: LayerNorm,
}

/// Looks parameters up by name, as variables or as detached views.
struct Lookup<'a> {
    vars: &'a BTreeMap<String, Var>,
    tracking: Tracking,
    eps: f32,
}

impl Lookup<'_> {
    fn tensor(&self, name: &str) -> Result<Tensor> {
        let var = self.vars.get(name).ok_or_else(|| {
            OperatorError::Candle(candle_core::Error::Msg(format!(
                "student parameter `{name}` was not loaded"
            )))
        })?;
        Ok(match self.tracking {
            Tracking::Gradients => var.as_tensor().clone(),
            Tracking::None => var.as_detached_tensor(),
        })
    }

    fn linear(&self, name: &str) -> Result<Linear> {
        Ok(Linear {
            weight: self.tensor(&format!("{name}.weight"))?,
            bias: self.tensor(&format!("{name}.bias"))?,
        })
    }

    fn norm(&self, name: &str) -> Result<LayerNorm> {
        Ok(LayerNorm {
            weight: self.tensor(&format!("{name}.weight"))?,
            bias: self.tensor(&format!("{name}.bias"))?,
            eps: self.eps,
        })
    }
}

/// A BERT encoder over the student's variables.
pub(crate) struct Encoder {
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    emb_norm: LayerNorm,
    layers: Vec<Layer>,
    heads: usize,
    head_dim: usize,
    act: Activation,
}

impl Encoder {
    /// Builds the encoder over `vars` (every name of [`parameter_shapes`] must be there).
    pub(crate) fn new(
        vars: &BTreeMap<String, Var>,
        config: &BertConfig,
        tracking: Tracking,
    ) -> Result<Self> {
        let w = Lookup {
            vars,
            tracking,
            eps: config.layer_norm_eps as f32,
        };
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let p = format!("encoder.layer.{i}");
                Ok(Layer {
                    query: w.linear(&format!("{p}.attention.self.query"))?,
                    key: w.linear(&format!("{p}.attention.self.key"))?,
                    value: w.linear(&format!("{p}.attention.self.value"))?,
                    attn_out: w.linear(&format!("{p}.attention.output.dense"))?,
                    attn_norm: w.norm(&format!("{p}.attention.output.LayerNorm"))?,
                    inter: w.linear(&format!("{p}.intermediate.dense"))?,
                    out: w.linear(&format!("{p}.output.dense"))?,
                    out_norm: w.norm(&format!("{p}.output.LayerNorm"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            word: w.tensor("embeddings.word_embeddings.weight")?,
            position: w.tensor("embeddings.position_embeddings.weight")?,
            token_type: w.tensor("embeddings.token_type_embeddings.weight")?,
            emb_norm: w.norm("embeddings.LayerNorm")?,
            layers,
            heads: config.num_attention_heads,
            head_dim: config.head_dim(),
            act: Activation::parse(&config.hidden_act)?,
        })
    }

    /// Hidden states `[rows, len, hidden]` of `batch` padded to its longest row, and the
    /// `[rows, len]` u32 mask (1 for tokens, 0 for padding).
    pub(crate) fn forward(&self, batch: &TokenBatch) -> Result<(Tensor, Tensor)> {
        let device = self.word.device();
        let rows = batch.rows.len();
        let len = batch.padded_len().max(1);
        let max_len = self.position.dim(0)?;
        if len > max_len {
            return Err(OperatorError::Candle(candle_core::Error::Msg(format!(
                "a batch row has {len} tokens, more than the model's {max_len} positions \
                 (tokenize truncates; this batch was built elsewhere)"
            ))));
        }
        let mut ids = vec![0u32; rows * len];
        let mut types = vec![0u32; rows * len];
        let mut mask = vec![0u32; rows * len];
        let mut bias = vec![MASKED_SCORE; rows * len];
        for (r, row) in batch.rows.iter().enumerate() {
            let span = r * len..r * len + row.ids.len();
            ids[span.clone()].copy_from_slice(&row.ids);
            if row.type_ids.len() == row.ids.len() {
                types[span.clone()].copy_from_slice(&row.type_ids);
            }
            mask[span.clone()].fill(1);
            bias[span].fill(0.0);
        }
        let hidden = self.heads * self.head_dim;
        let ids = Tensor::from_vec(ids, rows * len, device)?;
        let types = Tensor::from_vec(types, rows * len, device)?;
        let mask = Tensor::from_vec(mask, (rows, len), device)?;
        let bias = Tensor::from_vec(bias, (rows, 1, 1, len), device)?;

        let words = self.word.index_select(&ids, 0)?;
        let segments = self.token_type.index_select(&types, 0)?;
        let positions = self.position.narrow(0, 0, len)?;
        let embedded = (words + segments)?
            .reshape((rows, len, hidden))?
            .broadcast_add(&positions)?;
        let mut xs = self
            .emb_norm
            .forward(&embedded)?
            .reshape((rows * len, hidden))?;
        for layer in &self.layers {
            xs = self.layer_forward(layer, &xs, &bias, rows, len)?;
        }
        Ok((xs.reshape((rows, len, hidden))?, mask))
    }

    /// One encoder layer: `xs` `[rows * len, hidden]`, `bias` `[rows, 1, 1, len]`.
    fn layer_forward(
        &self,
        layer: &Layer,
        xs: &Tensor,
        bias: &Tensor,
        rows: usize,
        len: usize,
    ) -> candle_core::Result<Tensor> {
        let hidden = self.heads * self.head_dim;
        let heads = |t: Tensor| -> candle_core::Result<Tensor> {
            t.reshape((rows, len, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let q = heads((layer.query.forward(xs)? * scale)?)?;
        let k = heads(layer.key.forward(xs)?)?;
        let v = heads(layer.value.forward(xs)?)?;
        let scores = q.matmul(&k.t()?)?.broadcast_add(bias)?;
        let probs = super::fused::softmax_last_dim(&scores)?;
        let context = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((rows * len, hidden))?;
        let attn = layer
            .attn_norm
            .forward(&(layer.attn_out.forward(&context)? + xs)?)?;
        let inter = self.act.apply(&layer.inter.forward(&attn)?)?;
        layer
            .out_norm
            .forward(&(layer.out.forward(&inter)? + attn)?)
    }
}

/// Converts a loaded tensor to a trainable f32 variable.
pub(crate) fn to_var(t: &Tensor) -> Result<Var> {
    Ok(Var::from_tensor(&t.to_dtype(DType::F32)?.contiguous()?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(layers: usize) -> BertConfig {
        BertConfig {
            vocab_size: 30,
            hidden_size: 8,
            num_hidden_layers: layers,
            num_attention_heads: 2,
            intermediate_size: 12,
            hidden_act: "gelu".into(),
            max_position_embeddings: 16,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            pad_token_id: 0,
            model_type: "bert".into(),
            position_embedding_type: "absolute".into(),
        }
    }

    #[test]
    fn parameter_count_is_five_plus_sixteen_per_layer() {
        // Embeddings: word, position, token type, norm weight and bias. Each layer: six
        // linears (weight + bias) and two norms (weight + bias).
        assert_eq!(parameter_shapes(&config(0)).len(), 5);
        assert_eq!(parameter_shapes(&config(3)).len(), 5 + 3 * 16);
        let shapes: BTreeMap<String, Vec<usize>> =
            parameter_shapes(&config(1)).into_iter().collect();
        assert_eq!(shapes["encoder.layer.0.intermediate.dense.weight"], [12, 8]);
        assert_eq!(shapes["encoder.layer.0.output.dense.weight"], [8, 12]);
        assert_eq!(shapes["embeddings.position_embeddings.weight"], [16, 8]);
    }

    #[test]
    fn layer_norm_normalises_rows() {
        let device = candle_core::Device::Cpu;
        let norm = LayerNorm {
            weight: Tensor::new(&[1f32, 1., 1., 1.], &device).unwrap(),
            bias: Tensor::new(&[0f32, 0., 0., 0.], &device).unwrap(),
            eps: 1e-12,
        };
        let xs = Tensor::new(&[[1f32, 2., 3., 4.]], &device).unwrap();
        let out: Vec<f32> = norm
            .forward(&xs)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        // Mean 2.5, population variance 1.25: (x - 2.5) / sqrt(1.25).
        let expected = [-1.341_640_8, -0.447_213_6, 0.447_213_6, 1.341_640_8];
        for (o, e) in out.iter().zip(expected) {
            assert!((o - e).abs() < 1e-6, "{out:?}");
        }
    }
}
