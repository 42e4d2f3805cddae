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
use std::path::Path;

use distillery_operators::{Embedder, TextKind};

use crate::corpus::{open_passages, ReadOptions};
use crate::dataflow::TextSource;
use crate::error::EngineError;

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
    /// [`distillery_operators::cpu_bert::ARITHMETIC_REVISION`]: vectors of another
    /// revision of the kernel may differ in the last bits.
    arithmetic: u32,
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
        arithmetic: distillery_operators::cpu_bert::ARITHMETIC_REVISION,
    })?)
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
