//! The one embedding key: what an embedding depends on besides its text. Every stage
//! that embeds (the retrievers', a bi-encoder teacher's, an evaluation's) keys its
//! vectors by it, so two stages with equal keys hold the same vector for the same text
//! and one can take the other's.

use distillery_operators::{Embedder, TextKind};

use crate::error::EngineError;
use crate::model::tower_fingerprint;

/// What an embedding depends on besides its text.
#[derive(serde::Serialize)]
struct EmbeddingKey<'a> {
    /// [`crate::model::tower_fingerprint`] of the encoder that embeds the side: its
    /// weights, config, tokenizer, pooling, normalisation and casing, wherever its files
    /// live (a Router's document route with the base model's files has the base
    /// model's key).
    model: &'a str,
    max_seq_length: usize,
    prefix: &'a str,
    kind: &'a str,
    /// [`distillery_operators::cpu_bert::ARITHMETIC_REVISION`]: vectors of another
    /// revision of the kernel may differ in the last bits.
    arithmetic: u32,
}

/// The settings hash of `embedder`'s embeddings of `kind` texts (by the encoder of that
/// side, [`Embedder::side`]).
pub fn embedding_settings_hash(embedder: &Embedder, kind: TextKind) -> Result<String, EngineError> {
    let side = embedder.side(kind);
    Ok(crate::store::hash_settings(&EmbeddingKey {
        model: &tower_fingerprint(side)?,
        max_seq_length: side.max_seq_length(),
        prefix: side.prefix(kind),
        kind: match kind {
            TextKind::Query => "query",
            TextKind::Passage => "passage",
        },
        arithmetic: distillery_operators::cpu_bert::ARITHMETIC_REVISION,
    })?)
}
