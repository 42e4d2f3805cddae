//! The settings of an embedder as every stage that runs one reads them: the model, its
//! overrides, the batcher, the workers, the quarantine and the device; and loading the
//! embedder they name.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;
use distillery_operators::{Embedder, EmbedderOptions, TokenBudgetBatcher};

use crate::corpus::{open_passages, read_options, ReadOptions};
use crate::error::EngineError;
use crate::model::{resolve_model, ResolvedModel};

/// Padded tokens per device batch: 128 texts of 256 tokens. The CPU kernel packs texts
/// without padding and splits a batch between threads, so larger batches keep both
/// cores busy; measured on MiniLM-L6 on two cores (SciFact, 1,000 passages), 32,768 is
/// about 5% faster than 16,384 and 65,536 no faster.
pub const DEFAULT_BATCH_TOKENS: usize = 32_768;
/// Most texts per device batch, however short.
pub const DEFAULT_BATCH_ROWS: usize = 256;

/// Settings shared by every job that runs an embedder.
#[derive(Debug, Clone)]
pub struct EmbedSettings {
    /// `--model`: a directory or hub id; `None` resolves as [`crate::model`] describes.
    pub model: Option<String>,
    pub max_seq_length: Option<usize>,
    pub query_prefix: Option<String>,
    pub passage_prefix: Option<String>,
    pub batch_tokens: usize,
    pub batch_rows: usize,
    /// Timely worker threads.
    pub workers: usize,
    /// Skip bad records into this quarantine file instead of stopping.
    pub quarantine: Option<PathBuf>,
    pub quiet: bool,
    /// Where the model runs.
    pub device: Device,
}

impl Default for EmbedSettings {
    fn default() -> Self {
        Self {
            model: None,
            max_seq_length: None,
            query_prefix: None,
            passage_prefix: None,
            batch_tokens: DEFAULT_BATCH_TOKENS,
            batch_rows: DEFAULT_BATCH_ROWS,
            workers: 1,
            quarantine: None,
            quiet: false,
            device: Device::Cpu,
        }
    }
}

impl EmbedSettings {
    pub fn batcher(&self) -> TokenBudgetBatcher {
        TokenBudgetBatcher {
            max_tokens: self.batch_tokens.max(1),
            max_rows: self.batch_rows.max(1),
        }
    }

    pub fn read_options(&self) -> Result<ReadOptions, EngineError> {
        Ok(read_options(self.quarantine.as_deref())?)
    }

    /// Resolves and loads the embedder; a tiny model, when one must be built, gets a
    /// tokenizer trained on `corpus`.
    pub fn load_embedder(
        &self,
        corpus: &Path,
        read: &ReadOptions,
        tiny_dir: &Path,
    ) -> Result<(Arc<Embedder>, ResolvedModel), EngineError> {
        let resolved = resolve_model(self.model.as_deref(), tiny_dir, &mut || {
            // Training a tiny tokenizer reads the corpus once more; the run's quarantine
            // lists each bad record once however often it is read.
            let reader = open_passages(corpus, read)?;
            let mut texts = Vec::new();
            for p in reader {
                texts.push(p?.embedding_text());
            }
            Ok(texts)
        })?;
        if !self.quiet {
            eprintln!("using {resolved}");
        }
        let options = EmbedderOptions {
            max_seq_length: self.max_seq_length,
            query_prefix: self.query_prefix.clone(),
            passage_prefix: self.passage_prefix.clone(),
        };
        let embedder = crate::model::load_shared_embedder(&resolved.dir, &options, &self.device)?;
        Ok((embedder, resolved))
    }
}
