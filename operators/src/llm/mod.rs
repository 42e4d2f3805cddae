//! Decoder LLMs for query generation: chat messages in, sampled text out.
//!
//! [`LlmGenerator`] loads a Llama-family model (Llama, Qwen2, Mistral) from a Hugging
//! Face directory (config.json + safetensors) or a GGUF file (quantized: Q8_0, Q4_K,
//! ...), renders chats with the model's own template as transformers does, and generates
//! replies for many requests at once with a key/value cache: greedy, or sampled with a
//! per-request seed. The pieces, bottom-up:
//! - [`config`]: the architecture, from config.json or GGUF metadata;
//! - `weights`: safetensors or GGUF tensors behind one interface, dense or quantized
//!   linear layers;
//! - `rope`, `attention` and `model`: the decoder over packed rows of different
//!   lengths, with a CPU attention kernel and a padded, masked one for other devices;
//! - [`chat_template`]: Jinja rendering with Hugging Face's settings;
//! - [`sampling`]: greedy, temperature and top-p, and the seeded random stream;
//! - [`generator`]: tokenisation, batching, stopping, decoding to text;
//! - [`random`]: random models as GGUF files, for tests and speed checks.

pub(crate) mod attention;
pub mod chat_template;
pub mod config;
pub mod generator;
pub(crate) mod model;
pub(crate) mod q8_product;
pub mod random;
pub(crate) mod rope;
pub mod sampling;
pub(crate) mod weights;

pub use config::{Family, LlmConfig};
pub use generator::{FingerprintMaterial, GenerationOutput, LlmGenerator, LlmOptions};

use serde::{Deserialize, Serialize};

/// One message of a chat, as in Hugging Face chat templates and OpenAI's chat API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// How new tokens are drawn (RECIPE.md section 2).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// 0 is greedy decoding (argmax); the recipe samples at 0.8.
    pub temperature: f64,
    /// Nucleus sampling: draw from the smallest set of tokens whose probabilities sum to
    /// at least this; 1.0 keeps every token.
    pub top_p: f64,
    /// Most tokens generated per sequence (the recipe: 50).
    pub max_new_tokens: usize,
    /// End-of-turn is not accepted before this many tokens (the recipe: 1).
    pub min_new_tokens: usize,
}

/// The recipe's temperature.
pub const DEFAULT_TEMPERATURE: f64 = 0.8;
/// The recipe's cap on new tokens: a query is under 20 words.
pub const DEFAULT_MAX_NEW_TOKENS: usize = 50;

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: DEFAULT_TEMPERATURE,
            top_p: 1.0,
            max_new_tokens: DEFAULT_MAX_NEW_TOKENS,
            min_new_tokens: 1,
        }
    }
}
