//! [`LlmGenerator`]: a decoder LLM, its tokenizer and chat template, generating replies
//! to chats in batches.
//!
//! Contract of [`LlmGenerator::generate`]: each request's chat is rendered by the model's
//! template with the assistant turn opened, tokenized without adding special tokens
//! (the template wrote them), and continued until an end-of-turn token (which is not part
//! of the output) or `max_new_tokens`. Requests are sorted by prompt length and run in
//! groups of at most `max_batch_rows` rows and `max_batch_tokens` prompt tokens; a group
//! is prefilled in one step, then decoded one token per row per step, and a row that
//! finishes leaves the group at once (the others go on without it). Outputs come back in
//! request order. Greedy decoding gives transformers' `generate(do_sample=False)` tokens;
//! sampling draws from each request's own seeded stream ([`super::sampling`]).
//!
//! Determinism on the CPU: a row's logits are the same bits alone or in any batch (its
//! attention sees only its own tokens, quantized products are row by row, and dense
//! products never take gemm's single-row path), so with its own random stream a
//! request's tokens do not depend on the other requests of the call, nor on
//! `max_batch_rows`. On other devices the padded path's reductions depend on the batch
//! width; the tokens are the same up to rounding.

use std::path::{Path, PathBuf};

use candle_core::Device;
use tokenizers::Tokenizer;

use super::attention::StepRows;
use super::chat_template::ChatMessage;
use super::chat_template::{self, ChatTemplate};
use super::config::LlmConfig;
use super::model::Decoder;
use super::weights::Weights;
use crate::cpu_path::CpuPath;
use crate::error::{OperatorError, Result};

mod batch;
mod prefix;

pub use prefix::{DEFAULT_PREFIX_CACHE_BYTES, MIN_SHARED_PREFIX};

/// End-of-turn and end-of-document markers of common chat formats: generation also
/// stops at any of these the tokenizer has as a single token, in case a model's
/// configuration lists only some of them (a GGUF file names one eos and one eot token;
/// Llama 3 ends documents with `<|end_of_text|>` and turns with `<|eot_id|>`).
pub const END_OF_TURN_TOKENS: [&str; 8] = [
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "</s>",
];

/// The default most rows decoded together: enough to keep two to four CPU cores busy on
/// a sub-billion-parameter model; raise it on a GPU.
pub const DEFAULT_MAX_BATCH_ROWS: usize = 16;
/// The default most prompt tokens prefilled in one step: bounds the activations of a
/// prefill (8,192 x a 4,864-wide MLP in f32 is 160 MB for Qwen2.5-0.5B).
pub const DEFAULT_MAX_BATCH_TOKENS: usize = 8192;

/// How to load and run a generator.
#[derive(Debug, Clone)]
pub struct LlmOptions {
    /// Where tokenizer.json (and tokenizer_config.json, chat_template.jinja) are; by
    /// default the model directory, or the directory of a .gguf file.
    pub tokenizer_dir: Option<PathBuf>,
    pub device: Device,
    /// Most requests decoded together.
    pub max_batch_rows: usize,
    /// Most prompt tokens prefilled together (a longer prompt runs alone).
    pub max_batch_tokens: usize,
    /// Use the padded, masked attention of non-CPU devices on the CPU too (slower; for
    /// comparing the two paths).
    pub padded_attention: bool,
    /// Most bytes of keys and values kept for prompt prefixes shared among requests
    /// (computed once, copied into every row that starts with them: see
    /// `generator::prefix`); 0 computes every prompt whole. CPU cache only.
    pub prefix_cache_bytes: usize,
}

impl Default for LlmOptions {
    fn default() -> Self {
        LlmOptions {
            tokenizer_dir: None,
            device: Device::Cpu,
            max_batch_rows: DEFAULT_MAX_BATCH_ROWS,
            max_batch_tokens: DEFAULT_MAX_BATCH_TOKENS,
            padded_attention: false,
            prefix_cache_bytes: DEFAULT_PREFIX_CACHE_BYTES,
        }
    }
}

/// One request's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenerationOutput {
    /// The new tokens decoded, special tokens skipped.
    pub text: String,
    /// The new tokens, without the end-of-turn token that stopped them.
    pub token_ids: Vec<u32>,
    /// Tokens of the rendered prompt.
    pub prompt_tokens: usize,
    /// Generation stopped at an end-of-turn token (else at `max_new_tokens`).
    pub finished_by_eos: bool,
}

/// What identifies a generator's outputs, for a stable generator id: hash the files'
/// bytes together with `kind`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FingerprintMaterial {
    /// `candle-safetensors` or `candle-gguf`, and the device kind (`cpu`, `cuda`):
    /// different arithmetic, possibly different samples.
    pub kind: String,
    /// Every file read to build the generator (weights, configs, tokenizer, template),
    /// in a fixed order.
    pub files: Vec<PathBuf>,
}

/// A loaded decoder LLM with its tokenizer and chat template.
pub struct LlmGenerator {
    decoder: Decoder,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    stop_tokens: Vec<u32>,
    options: LlmOptions,
    files: Vec<PathBuf>,
    kind: &'static str,
    path: PathBuf,
    /// Shared prompt prefixes kept across calls.
    prefixes: std::sync::Mutex<prefix::PrefixStore>,
    /// Prompt tokens taken from shared prefixes instead of computed, since loading.
    prefix_tokens_reused: std::sync::atomic::AtomicU64,
    /// Nanoseconds spent in prompt steps (shared prefixes, each group's prefill and its
    /// first tokens' choice) and in the steps after, since loading.
    prefill_nanos: std::sync::atomic::AtomicU64,
    decode_nanos: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for LlmGenerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlmGenerator")
            .field("path", &self.path)
            .field("kind", &self.kind)
            .field("family", &self.decoder.config().family)
            .finish()
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> OperatorError + '_ {
    move |source| OperatorError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl LlmGenerator {
    /// The device the model's weights live on.
    pub fn device(&self) -> &Device {
        &self.options.device
    }

    /// Loads a Hugging Face model directory (config.json, safetensors weights,
    /// tokenizer.json, a chat template) or a `.gguf` file (its tokenizer.json beside it
    /// or in `options.tokenizer_dir`).
    pub fn load(path: &Path, options: &LlmOptions) -> Result<Self> {
        let device = &options.device;
        let meta = std::fs::metadata(path).map_err(io(path))?;
        let is_gguf = meta.is_file();
        let (weights, config, mut files, kind) = if is_gguf {
            let weights = Weights::from_gguf(path, device)?;
            let factors = weights.gguf_vector("rope_freqs.weight")?;
            let content = weights
                .gguf_content()
                .ok_or_else(|| internal("a GGUF source without content"))?;
            let config = LlmConfig::from_gguf(content, path, factors)?;
            (weights, config, vec![path.to_path_buf()], "candle-gguf")
        } else {
            let config = LlmConfig::from_hf_dir(path)?;
            let (weights, mut files) = Weights::from_safetensors_dir(path, device)?;
            files.push(path.join("config.json"));
            let generation = path.join("generation_config.json");
            if generation.is_file() {
                files.push(generation);
            }
            (weights, config, files, "candle-safetensors")
        };
        let tokenizer_dir = match &options.tokenizer_dir {
            Some(d) => d.clone(),
            None if is_gguf => path.parent().unwrap_or(Path::new(".")).to_path_buf(),
            None => path.to_path_buf(),
        };
        let tokenizer_path = tokenizer_dir.join("tokenizer.json");
        if !tokenizer_path.is_file() {
            return Err(OperatorError::MissingFile {
                dir: tokenizer_dir,
                file: "tokenizer.json",
                why: "the tokenizer, in Hugging Face tokenizers' format",
            });
        }
        let tokenizer = Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| OperatorError::Tokenizer(format!("{}: {e}", tokenizer_path.display())))?;
        let tokenizer_size = tokenizer.get_vocab_size(true);
        if tokenizer_size > config.vocab_size {
            return Err(OperatorError::BadConfig {
                path: tokenizer_path,
                what: "tokenizer for this model",
                message: format!(
                    "{tokenizer_size} tokens, but the model has only {} embeddings",
                    config.vocab_size
                ),
            });
        }
        files.push(tokenizer_path);
        let template = load_template(&tokenizer_dir, &weights, path)?;
        for extra in ["tokenizer_config.json", "chat_template.jinja"] {
            let f = tokenizer_dir.join(extra);
            if f.is_file() {
                files.push(f);
            }
        }
        let stop_tokens = stop_tokens(&config, &tokenizer, &template.1);
        let decoder = Decoder::load(&weights, config, device)?;
        Ok(LlmGenerator {
            decoder,
            tokenizer,
            template: template.0,
            stop_tokens,
            options: options.clone(),
            files,
            kind,
            path: path.to_path_buf(),
            prefixes: Default::default(),
            prefix_tokens_reused: Default::default(),
            prefill_nanos: Default::default(),
            decode_nanos: Default::default(),
        })
    }

    pub fn config(&self) -> &LlmConfig {
        self.decoder.config()
    }

    /// Seconds spent since loading in prompt steps (computing shared prefixes, each
    /// group's prefill and the choice of its first tokens) and in the decode steps after
    /// them: where generation's time goes.
    pub fn step_seconds(&self) -> (f64, f64) {
        let load = |a: &std::sync::atomic::AtomicU64| {
            a.load(std::sync::atomic::Ordering::Relaxed) as f64 * 1e-9
        };
        (load(&self.prefill_nanos), load(&self.decode_nanos))
    }

    /// Drops the shared prefixes kept from earlier calls (benchmarks time a run as if
    /// it were the first).
    pub fn forget_prefixes(&self) {
        *self.prefixes.lock().unwrap_or_else(|e| e.into_inner()) = Default::default();
    }

    /// Prompt tokens whose keys and values were copied from a shared prefix instead of
    /// computed (see `LlmOptions::prefix_cache_bytes`), since the generator was loaded.
    pub fn prefix_tokens_reused(&self) -> u64 {
        self.prefix_tokens_reused
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The token ids that end a reply.
    pub fn stop_tokens(&self) -> &[u32] {
        &self.stop_tokens
    }

    /// The CPU path the CPU attention kernel runs on ([`crate::cpu_path`]).
    pub fn cpu_path(&self) -> CpuPath {
        self.decoder.cpu_path()
    }

    /// Runs the CPU attention kernel on `path` from the next call on; fails, changing
    /// nothing, when this CPU cannot run it.
    pub fn set_cpu_path(&mut self, path: CpuPath) -> Result<()> {
        self.decoder.set_cpu_path(path)
    }

    /// The quantization of the layers' matrices (`Q8_0`, `Q4K`, ...), `None` for f32.
    pub fn quantization(&self) -> Option<String> {
        self.decoder.quantization()
    }

    pub fn fingerprint_material(&self) -> FingerprintMaterial {
        let device = match &self.options.device {
            Device::Cpu => "cpu",
            Device::Cuda(_) => "cuda",
            Device::Metal(_) => "metal",
        };
        FingerprintMaterial {
            kind: format!("{}/{device}", self.kind),
            files: self.files.clone(),
        }
    }

    /// The prompt text for `messages`: the chat template rendered with the assistant's
    /// turn opened.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String> {
        self.template.render(messages, true)
    }

    /// The prompt's token ids: [`Self::render`] tokenized without adding special tokens.
    pub fn prompt_ids(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        let text = self.render(messages)?;
        let encoding = self
            .tokenizer
            .encode(text.as_str(), false)
            .map_err(|e| OperatorError::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The logits of the token after the prompt of `messages`.
    pub fn next_token_logits(&self, messages: &[ChatMessage]) -> Result<Vec<f32>> {
        let mut all = self.continuation_logits(messages, &[])?;
        all.pop()
            .ok_or_else(|| internal("a prompt step without logits"))
    }

    /// The logits after the prompt of `messages`, then after each token of
    /// `continuation` fed one at a time as generation feeds them (`continuation.len() + 1`
    /// rows): what the model computes while generating that continuation.
    pub fn continuation_logits(
        &self,
        messages: &[ChatMessage],
        continuation: &[u32],
    ) -> Result<Vec<Vec<f32>>> {
        let ids = self.prompt_ids(messages)?;
        if ids.is_empty() {
            return Err(OperatorError::Tokenizer(
                "the rendered prompt has no tokens".into(),
            ));
        }
        let mut cache = self.decoder.new_cache(
            &[ids.len() + continuation.len()],
            self.options.padded_attention,
        );
        let mut step = StepRows::pack([(0, ids.len())]);
        let mut tokens = ids.clone();
        let mut all = Vec::with_capacity(continuation.len() + 1);
        for next in continuation.iter().map(Some).chain([None]) {
            let logits = self.decoder.forward(&tokens, &step, &mut cache)?;
            all.push(logits.squeeze(0)?.to_vec1()?);
            if let Some(&t) = next {
                step = StepRows::pack([(ids.len() + all.len() - 1, 1)]);
                tokens = vec![t];
            }
        }
        Ok(all)
    }
}

fn internal(message: &str) -> OperatorError {
    OperatorError::Candle(candle_core::Error::Msg(format!("{message} (a bug)")))
}

/// The chat template: from the tokenizer directory, else (GGUF) the file's metadata.
/// Returns the template and the eos string it knows (to add to the stop tokens).
fn load_template(
    tokenizer_dir: &Path,
    weights: &Weights,
    model_path: &Path,
) -> Result<(ChatTemplate, Option<String>)> {
    if let Some(found) = chat_template::from_tokenizer_dir(tokenizer_dir)? {
        let eos = found
            .special_tokens
            .iter()
            .find(|(f, _)| f == "eos_token")
            .map(|(_, t)| t.clone());
        return Ok((
            ChatTemplate::new(found.text, found.path, found.special_tokens)?,
            eos,
        ));
    }
    if let Some(content) = weights.gguf_content() {
        if let Some(text) = content
            .metadata
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok())
        {
            let tokens = content
                .metadata
                .get("tokenizer.ggml.tokens")
                .and_then(|v| v.to_vec().ok());
            let token = |key: &str| -> Option<String> {
                let id = content.metadata.get(key)?.to_u32().ok()? as usize;
                tokens?.get(id)?.to_string().ok().cloned()
            };
            let mut specials = Vec::new();
            for (field, key) in [
                ("bos_token", "tokenizer.ggml.bos_token_id"),
                ("eos_token", "tokenizer.ggml.eos_token_id"),
                ("unk_token", "tokenizer.ggml.unknown_token_id"),
                ("pad_token", "tokenizer.ggml.padding_token_id"),
            ] {
                if let Some(t) = token(key) {
                    specials.push((field.to_string(), t));
                }
            }
            let eos = token("tokenizer.ggml.eos_token_id");
            let source =
                PathBuf::from(format!("{}: tokenizer.chat_template", model_path.display()));
            return Ok((ChatTemplate::new(text.clone(), source, specials)?, eos));
        }
    }
    Err(OperatorError::MissingFile {
        dir: tokenizer_dir.to_path_buf(),
        file: "tokenizer_config.json",
        why: "a chat template (`chat_template` there, or chat_template.jinja; \
              or tokenizer.chat_template in the GGUF file)",
    })
}

/// End-of-turn ids: the configuration's, the tokenizer config's `eos_token`, and the
/// known end-of-turn markers the tokenizer has.
fn stop_tokens(config: &LlmConfig, tokenizer: &Tokenizer, eos: &Option<String>) -> Vec<u32> {
    let mut ids = config.eos_token_ids.clone();
    let named = eos.iter().map(String::as_str).chain(END_OF_TURN_TOKENS);
    for token in named {
        if let Some(id) = tokenizer.token_to_id(token) {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
    }
    ids
}
