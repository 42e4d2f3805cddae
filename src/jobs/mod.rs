//! The jobs the CLI runs, as library functions: each takes one resolved settings struct,
//! runs its stages through the dataflow and the store, and returns what it measured.

pub mod embed;
pub mod eval;
pub mod generate;
pub mod label;
pub mod mine;
pub mod score;
pub mod train;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;
use distillery_operators::{Embedder, EmbedderOptions, TextKind, TokenBudgetBatcher};

use crate::corpus::{open_passages, BadRecordPolicy, Quarantine, ReadOptions};
use crate::dataflow::TextSource;
use crate::error::EngineError;
use crate::model::{resolve_model, ResolvedModel};
use crate::store::ContentHasher;

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
        read_options(self.quarantine.as_deref())
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
        let embedder = Embedder::load(&resolved.dir, &options, &self.device)?;
        Ok((Arc::new(embedder), resolved))
    }
}

/// What an embedding depends on besides its text. One key for every stage that embeds
/// (the retrievers', a bi-encoder teacher's): two stages with equal keys hold the same
/// vector for the same text, so one can take the other's.
#[derive(serde::Serialize)]
struct EmbeddingKey<'a> {
    /// [`crate::model::fingerprint`] of the model's files.
    model: &'a str,
    max_seq_length: usize,
    prefix: &'a str,
    kind: &'a str,
}

/// The settings hash of `embedder`'s embeddings of `kind` texts; `model_fingerprint` is
/// [`crate::model::fingerprint`] of its directory.
pub fn embedding_settings_hash(
    embedder: &Embedder,
    model_fingerprint: &str,
    kind: TextKind,
) -> Result<String, EngineError> {
    Ok(crate::store::hash_settings(&EmbeddingKey {
        model: model_fingerprint,
        max_seq_length: embedder.max_seq_length(),
        prefix: embedder.prefix(kind),
        kind: match kind {
            TextKind::Query => "query",
            TextKind::Passage => "passage",
        },
    })?)
}

/// Reading that fails on the first bad record, or skips bad records into `quarantine`.
pub fn read_options(quarantine: Option<&Path>) -> Result<ReadOptions, EngineError> {
    let policy = match quarantine {
        None => BadRecordPolicy::Fail,
        Some(path) => BadRecordPolicy::Skip(Quarantine::open(path)?),
    };
    Ok(ReadOptions {
        policy,
        ..ReadOptions::default()
    })
}

/// Records skipped into the quarantine of `read`, and its path (none under `Fail`).
pub fn quarantined(read: &ReadOptions) -> Result<(u64, Option<PathBuf>), EngineError> {
    Ok(match &read.policy {
        BadRecordPolicy::Fail => (0, None),
        BadRecordPolicy::Skip(q) => (q.finish()?, Some(q.path().to_path_buf())),
    })
}

/// Passages of `path` as `(id, title + " " + text)`, streamed.
pub fn passage_texts(path: &Path, opts: &ReadOptions) -> Result<TextSource, EngineError> {
    let reader = open_passages(path, opts)?;
    Ok(Box::new(reader.map(|r| {
        r.map(|p| {
            let text = p.embedding_text();
            (p.id, text)
        })
        .map_err(EngineError::from)
    })))
}

/// A content hash of a file's bytes, streamed.
pub fn hash_file(path: &Path) -> Result<String, EngineError> {
    let io = |source| EngineError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut h = ContentHasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finish())
}

/// Records in a text file (its newline count) or a Parquet file (its row count), for
/// progress; `None` when it cannot be told cheaply.
pub fn count_records(path: &Path) -> Option<u64> {
    let is_parquet = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("parquet"));
    let mut f = std::fs::File::open(path).ok()?;
    if is_parquet {
        use parquet::file::reader::{FileReader, SerializedFileReader};
        let r = SerializedFileReader::new(f).ok()?;
        return Some(r.metadata().file_metadata().num_rows().max(0) as u64);
    }
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    let mut last = b'\n';
    loop {
        let k = f.read(&mut buf).ok()?;
        if k == 0 {
            break;
        }
        n += buf[..k].iter().filter(|&&b| b == b'\n').count() as u64;
        last = buf[k - 1];
    }
    Some(n + u64::from(last != b'\n'))
}
