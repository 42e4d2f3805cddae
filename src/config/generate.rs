//! `[generate]`: query generation as written (passage preparation, query types, the
//! generator and its server), with the recipe's defaults. The generate job resolves it
//! further (prompts, generator); [`super::Pipeline::resolve`] resolves its paths.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Query generation, as written: passage preparation, query types, the generator.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateFile {
    /// `extractive` (no LLM, a baseline), `llm` (in-process, `model` = a Hugging Face
    /// model directory or a `.gguf` file) or `endpoint` (an OpenAI-compatible server).
    pub generator: String,
    /// The LLM (`llm`), or the model name sent to the server (`endpoint`).
    #[serde(default)]
    pub model: Option<String>,
    /// The tokenizer directory of a `.gguf` model (default: the file's directory).
    #[serde(default)]
    pub tokenizer: Option<PathBuf>,
    /// Query types: built-in names (`question`, `claim`, `title`, `keywords`, `search`,
    /// `web`) or the names of `[[generate.custom_types]]`. By default all six for an LLM,
    /// and `title`, `claim`, `keywords` for `extractive`.
    #[serde(default)]
    pub types: Option<Vec<String>>,
    #[serde(default)]
    pub custom_types: Vec<CustomTypeFile>,
    /// The run seed: each query's seed derives from (passage hash, type, this).
    #[serde(default = "default_seed")]
    pub seed: u64,
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    #[serde(default = "default_top_p")]
    pub top_p: f64,
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
    #[serde(default = "default_min_new_tokens")]
    pub min_new_tokens: usize,
    /// Passages are truncated to this many characters for generation.
    #[serde(default = "default_max_chars")]
    pub max_chars: usize,
    /// Passages shorter than this (characters) are dropped.
    #[serde(default = "default_min_chars")]
    pub min_chars: usize,
    /// The recipe's near-duplicate removal.
    #[serde(default = "default_true")]
    pub dedup: bool,
    /// At most this many passages (a seeded choice that is stable as the corpus grows).
    #[serde(default = "default_max_passages")]
    pub max_passages: Option<usize>,
    /// Requests handed to the generator at once (an LLM batch, an endpoint's in-flight
    /// window).
    #[serde(default = "default_generate_batch")]
    pub batch_size: usize,
    /// Megabytes of keys and values an in-process LLM keeps for prompt prefixes that
    /// requests share (a query type's instruction and rules, computed once and reused by
    /// every later prompt that starts with them); 0 computes every prompt whole. The
    /// queries are the same either way.
    #[serde(default = "default_prefix_cache_mb")]
    pub prefix_cache_mb: usize,
    /// The server, for `generator = "endpoint"`.
    #[serde(default)]
    pub endpoint: Option<EndpointFile>,
}

/// A query type of the user's: an instruction and a file of examples.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CustomTypeFile {
    pub name: String,
    pub instruction: String,
    /// JSONL, one `{"passage": ..., "query": ...}` per line; none for a zero-shot type
    /// (`shots = 0`).
    #[serde(default)]
    pub examples: Option<PathBuf>,
    /// Few-shot examples drawn per passage.
    #[serde(default = "default_shots")]
    pub shots: usize,
}

/// An OpenAI-compatible chat completions server.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointFile {
    /// Base URL, e.g. `http://localhost:8000/v1` (`/chat/completions` is appended).
    pub url: String,
    /// The NAME of the environment variable holding the API key (never the key).
    #[serde(default)]
    pub api_key_env: Option<String>,
    #[serde(default)]
    pub concurrency: Option<usize>,
    #[serde(default)]
    pub timeout_s: Option<f64>,
    #[serde(default)]
    pub max_retries: Option<u32>,
}

fn default_seed() -> u64 {
    42
}
fn default_temperature() -> f64 {
    distillery_operators::llm::DEFAULT_TEMPERATURE
}
fn default_top_p() -> f64 {
    1.0
}
fn default_max_new_tokens() -> usize {
    distillery_operators::llm::DEFAULT_MAX_NEW_TOKENS
}
fn default_min_new_tokens() -> usize {
    1
}
fn default_max_chars() -> usize {
    crate::generate::prepare::DEFAULT_MAX_CHARS
}
fn default_min_chars() -> usize {
    crate::generate::prepare::DEFAULT_MIN_CHARS
}
fn default_true() -> bool {
    true
}
fn default_max_passages() -> Option<usize> {
    Some(crate::generate::prepare::DEFAULT_MAX_PASSAGES)
}
fn default_generate_batch() -> usize {
    16
}
fn default_prefix_cache_mb() -> usize {
    distillery_operators::llm::generator::DEFAULT_PREFIX_CACHE_BYTES >> 20
}
fn default_shots() -> usize {
    crate::generate::prompts::DEFAULT_SHOTS
}

impl GenerateFile {
    /// The recipe's defaults with `generator` (`extractive`, `llm` or `endpoint`).
    pub fn with_generator(generator: &str) -> Self {
        GenerateFile {
            generator: generator.to_string(),
            model: None,
            tokenizer: None,
            types: None,
            custom_types: Vec::new(),
            seed: default_seed(),
            temperature: default_temperature(),
            top_p: default_top_p(),
            max_new_tokens: default_max_new_tokens(),
            min_new_tokens: default_min_new_tokens(),
            max_chars: default_max_chars(),
            min_chars: default_min_chars(),
            dedup: true,
            max_passages: default_max_passages(),
            batch_size: default_generate_batch(),
            prefix_cache_mb: default_prefix_cache_mb(),
            endpoint: None,
        }
    }
}
