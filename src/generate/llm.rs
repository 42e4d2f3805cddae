//! The in-process LLM as a [`QueryGenerator`]: the candle decoder of
//! [`distillery_operators::llm`] over the requests' chat messages and seeds.
//!
//! Contracts:
//! - The generator id hashes every file the model was built from (weights, config,
//!   tokenizer, chat template), the arithmetic it runs (`candle-gguf/cpu`, ...) and the
//!   sampling settings: another model, quantisation, device or temperature is another
//!   cache.
//! - Each request is sampled with its own seed from its own logits, so its query does not
//!   depend on which requests share its batch.
//! - The raw output goes through [`postprocess`](crate::generate::postprocess): an
//!   empty one is a [`Generated::Failed`] naming the passage.

use std::path::Path;

use distillery_operators::llm::{ChatMessage, LlmGenerator, LlmOptions, SamplingParams};
use serde::Serialize;

use crate::error::EngineError;
use crate::generate::postprocess::outcome;
use crate::generate::{Generated, GenerationRequest, QueryGenerator};
use crate::store::hash_file;
use crate::store::{hash_settings, ContentHasher};

/// Bumped when what a request produces changes (prompt rendering, post-processing, or
/// the model's arithmetic, which moves what a seed samples), so that cached queries of
/// the old behaviour are not served. v2: every quantized product through the Q8_0 kernel
/// (prompt tokens included), the attention kernel's exponentials, Q5_0 widened exactly.
const LLM_GENERATOR_VERSION: &str = "llm-v2";

/// An LLM loaded in this process.
pub struct LlmQueryGenerator {
    llm: LlmGenerator,
    params: SamplingParams,
    id: String,
}

impl LlmQueryGenerator {
    /// Loads the model (a Hugging Face directory or a `.gguf` file) and fingerprints it.
    pub fn load(
        path: &Path,
        options: &LlmOptions,
        params: SamplingParams,
    ) -> Result<Self, EngineError> {
        let llm = LlmGenerator::load(path, options)?;
        let material = llm.fingerprint_material();
        let mut files = ContentHasher::new();
        for file in &material.files {
            files.field(hash_file(file)?);
        }
        #[derive(Serialize)]
        struct Identity<'a> {
            version: &'a str,
            kind: &'a str,
            files: &'a str,
            sampling: &'a SamplingParams,
        }
        let files = files.finish();
        let hash = hash_settings(&Identity {
            version: LLM_GENERATOR_VERSION,
            kind: &material.kind,
            files: &files,
            sampling: &params,
        })?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(LlmQueryGenerator {
            id: format!("{LLM_GENERATOR_VERSION}:{name}:{}", &hash[..16]),
            llm,
            params,
        })
    }

    /// The loaded model.
    pub fn llm(&self) -> &LlmGenerator {
        &self.llm
    }
}

impl QueryGenerator for LlmQueryGenerator {
    fn id(&self) -> String {
        self.id.clone()
    }

    fn device(&self) -> Option<&candle_core::Device> {
        Some(self.llm.device())
    }

    fn generate(&self, requests: &[GenerationRequest]) -> Result<Vec<Generated>, EngineError> {
        let inputs: Vec<(Vec<ChatMessage>, u64)> = requests
            .iter()
            .map(|r| (r.messages.clone(), r.seed))
            .collect();
        let outputs = self.llm.generate(&inputs, &self.params)?;
        Ok(outputs
            .into_iter()
            .zip(requests)
            .map(|(o, r)| outcome(&r.passage.id, o.text, o.token_ids.len()))
            .collect())
    }
}
