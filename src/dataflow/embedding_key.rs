//! The one embedding key: what an embedding depends on besides its text. Every stage
//! that embeds (the retrievers', a bi-encoder teacher's, an evaluation's) keys its
//! vectors by it, so two stages with equal keys hold the same vector for the same text
//! and one can take the other's.

use distillery_operators::{Embedder, TextKind};

use crate::error::EngineError;

/// What an embedding depends on besides its text.
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
