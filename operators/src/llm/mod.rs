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
//! - [`chat_template`]: chat messages, and Jinja rendering with Hugging Face's settings;
//! - [`sampling`]: the sampling parameters; greedy, temperature and top-p, and the
//!   seeded random stream;
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

pub use chat_template::ChatMessage;
pub use config::{Family, LlmConfig};
pub use generator::{FingerprintMaterial, GenerationOutput, LlmGenerator, LlmOptions};
pub use q8_product::widen_to_q8_0;
pub use sampling::{SamplingParams, DEFAULT_MAX_NEW_TOKENS, DEFAULT_TEMPERATURE};
