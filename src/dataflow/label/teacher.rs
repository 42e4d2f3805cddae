//! What every teacher kind implements: score (query, passage) pairs, and say which
//! settings its scores depend on.
//!
//! A teacher's [`PairTeacher::fingerprint`] names its score cache: two teachers share a
//! cache exactly when their fingerprints are equal, so each kind hashes its kind's name
//! with every setting that can change a score (a cross-encoder hashes its files, its
//! maximum length and the CPU kernel's arithmetic revision). [`PairTeacher::score_pairs`]
//! scores only the pairs the cache lacks (every pair, for a teacher that is not cached:
//! [`PairTeacher::cached`]); it may keep resumable stages of its own in the
//! store, named after [`ScoringContext::stage_prefix`].

use std::collections::HashMap;

use distillery_operators::TokenBudgetBatcher;

use crate::error::EngineError;
use crate::store::StageStore;

/// One pair to score: its cache key and the two texts the teacher sees.
#[derive(Debug, Clone, Copy)]
pub struct PairToScore<'a> {
    pub key: &'a str,
    pub query: &'a str,
    pub passage: &'a str,
}

/// Where and how a teacher runs.
#[derive(Debug, Clone)]
pub struct ScoringContext<'a> {
    pub store: &'a StageStore,
    /// The start of the names of the teacher's own stages (`teacher-<16 hex digits>`).
    pub stage_prefix: String,
    /// Progress label (`teacher 0`).
    pub label: String,
    pub batcher: TokenBudgetBatcher,
    /// Timely workers of device stages.
    pub workers: usize,
    /// The processes its device stages run over.
    pub cluster: crate::config::cluster::Cluster,
    /// Threads for CPU-only scoring.
    pub threads: usize,
    pub quiet: bool,
    /// Embeddings the run already holds (the retrievers'): a teacher that embeds with
    /// the same settings takes them instead of embedding the texts again.
    pub known: Vec<KnownEmbeddings<'a>>,
}

/// An embedding stage of the run and how to find a text's row in it.
#[derive(Debug, Clone)]
pub struct KnownEmbeddings<'a> {
    pub stage: String,
    /// [`crate::dataflow::embedding_key::embedding_settings_hash`] of its vectors.
    pub settings_hash: String,
    /// The row id of each text the stage embedded.
    pub id_of_text: &'a HashMap<String, String>,
}

/// Texts a teacher embedded now and texts it took from [`ScoringContext::known`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct EmbeddingCounts {
    pub queries_embedded: u64,
    pub queries_reused: u64,
    pub passages_embedded: u64,
    pub passages_reused: u64,
}

/// A teacher: anything that gives a (query, passage) pair a relevance score. Shared by
/// the stages of a run that score (scoring ahead runs beside the candidates stage).
pub trait PairTeacher: Send + Sync {
    /// The hash of every setting the scores depend on (64 hex digits).
    fn fingerprint(&self) -> &str;

    /// One score per pair, in the order of `pairs`.
    fn score_pairs(
        &self,
        pairs: &[PairToScore<'_>],
        ctx: &ScoringContext<'_>,
    ) -> Result<Vec<f32>, EngineError>;

    /// Whether its scores are worth keeping in its pair cache. A teacher whose every
    /// score moves with the corpus (BM25: document frequencies, average length) says
    /// no: its fingerprint holds the corpus's hash, so its cache would serve only a rerun
    /// over the same corpus, which finds its examples complete anyway, and writing a
    /// score costs more than computing it again.
    fn cached(&self) -> bool {
        true
    }

    /// Whether its pairs are worth scoring ahead, a chunk of candidates at a time while
    /// the candidates stage retrieves the next ([`crate::dataflow::score_ahead`]): true
    /// for a cached teacher whose work is per pair (a cross-encoder reads each pair
    /// whole). A bi-encoder's work is per text (each text embedded once for all its
    /// pairs), and a chunk's pairs name most of the corpus's passages, which it would
    /// read or embed again for every chunk.
    fn scores_ahead(&self) -> bool {
        false
    }

    /// Starts, on a thread of its own, the work it can do before it sees its pairs
    /// (BM25: the corpus statistics), while labelling gathers them; `label` names its
    /// progress. [`Self::score_pairs`] takes that work over, or does it itself when it was
    /// not started. Nothing, by default.
    fn prepare(&self, _label: &str, _quiet: bool) {}

    /// Whether it runs a model on the run's device. A teacher that does not (BM25)
    /// scores on threads of its own while the others score, in labelling.
    fn uses_device(&self) -> bool {
        true
    }

    /// What the last [`Self::score_pairs`] embedded and reused (nothing, for teachers
    /// that embed no text on their own).
    fn embedding_counts(&self) -> EmbeddingCounts {
        EmbeddingCounts::default()
    }
}
