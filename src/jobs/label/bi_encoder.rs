//! The bi-encoder teacher: a sentence embedder embeds the query and the passage apart,
//! and the pair's score is the cosine of the two embeddings.
//!
//! The embedder is loaded as a retriever's is ([`EmbedSettings::load_embedder`]: a
//! directory or a hub id in the local cache, the model's prompts unless
//! `query_prefix`/`passage_prefix` override them). Each distinct text is embedded once,
//! not once per pair (a query has tens of candidates, a passage is a candidate of
//! several queries), by two embedding stages that resume when killed,
//! `<prefix>-queries` and `<prefix>-passages`, with the embedding stages' progress,
//! rate and ETA. Their ids are hashes of the texts. The embeddings of the texts being
//! scored are then held while the cosines are taken: `4 x dim` bytes a text (1.5 KB for
//! MiniLM), about what the passage texts themselves already take.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use distillery_operators::{Embedder, TextKind};
use serde::Serialize;

use crate::config::TeacherKind;
use crate::corpus::ReadOptions;
use crate::dataflow::{run_embed_stage, EmbedStage, TextSource, CHUNK_ROWS};
use crate::error::EngineError;
use crate::jobs::eval::read_matrix;
use crate::jobs::EmbedSettings;
use crate::model::fingerprint;
use crate::schema::EmbeddingMatrix;
use crate::store::{hash_settings, ContentHasher, StageKey};

use super::teacher::{PairTeacher, PairToScore, ScoringContext};

/// A loaded sentence embedder and its fingerprint.
pub struct BiEncoderTeacher {
    embedder: Arc<Embedder>,
    fingerprint: String,
}

/// Every setting a bi-encoder's scores depend on.
#[derive(Serialize)]
struct BiEncoderKey<'a> {
    kind: &'a str,
    model: &'a str,
    max_seq_length: usize,
    query_prefix: &'a str,
    passage_prefix: &'a str,
}

/// The key of one side's embedding stage.
#[derive(Serialize)]
struct SideKey<'a> {
    teacher: &'a str,
    side: &'a str,
}

impl BiEncoderTeacher {
    /// Loads the embedder `settings` names. A teacher always names its model, so the
    /// loader's fallback (a tiny model in `tiny_dir`, its tokenizer trained on
    /// `corpus`) is never taken.
    pub fn load(
        settings: &EmbedSettings,
        corpus: &Path,
        tiny_dir: &Path,
    ) -> Result<Self, EngineError> {
        let (embedder, _) = settings.load_embedder(corpus, &ReadOptions::default(), tiny_dir)?;
        Self::new(embedder)
    }

    /// A teacher of an embedder already loaded.
    pub fn new(embedder: Arc<Embedder>) -> Result<Self, EngineError> {
        let files = fingerprint(embedder.dir())?;
        let fingerprint = hash_settings(&BiEncoderKey {
            kind: TeacherKind::BI_ENCODER,
            model: &files,
            max_seq_length: embedder.max_seq_length(),
            query_prefix: embedder.prefix(TextKind::Query),
            passage_prefix: embedder.prefix(TextKind::Passage),
        })?;
        Ok(Self {
            embedder,
            fingerprint,
        })
    }

    /// Embeds the distinct texts of one side; returns each text's row in the matrix.
    fn embed_side<'t>(
        &self,
        texts: impl Iterator<Item = &'t str>,
        kind: TextKind,
        ctx: &ScoringContext<'_>,
    ) -> Result<(HashMap<&'t str, usize>, EmbeddingMatrix), EngineError> {
        let side = match kind {
            TextKind::Query => "queries",
            TextKind::Passage => "passages",
        };
        let mut row_of: HashMap<&str, usize> = HashMap::new();
        let mut items: Vec<(String, String)> = Vec::new();
        let mut input = ContentHasher::new();
        for t in texts {
            if row_of.contains_key(t) {
                continue;
            }
            row_of.insert(t, items.len());
            let id = ContentHasher::new().field(t).finish();
            input.field(&id);
            items.push((id, t.to_string()));
        }
        let stage = EmbedStage {
            stage: format!("{}-{side}", ctx.stage_prefix),
            key: StageKey {
                settings_hash: hash_settings(&SideKey {
                    teacher: &self.fingerprint,
                    side,
                })?,
                input_hash: input.finish(),
            },
            kind,
            batcher: ctx.batcher,
            workers: ctx.workers,
            chunk_rows: CHUNK_ROWS,
            total: Some(items.len() as u64),
            label: format!("{}: embed {side}", ctx.label),
            quiet: ctx.quiet,
        };
        let expected: Vec<String> = items.iter().map(|(id, _)| id.clone()).collect();
        let source: TextSource = Box::new(items.into_iter().map(Ok));
        run_embed_stage(ctx.store, self.embedder.clone(), source, &stage)?;
        let matrix = read_matrix(ctx.store, &stage.stage)?;
        // The stage writes rows in input order; a mismatch would pair texts with other
        // texts' embeddings.
        if matrix.ids != expected {
            return Err(EngineError::Dataflow(format!(
                "stage {}: rows are not the texts in input order; this is a bug",
                stage.stage
            )));
        }
        Ok((row_of, matrix))
    }
}

/// The cosine of `a` and `b`, accumulated in f64; 0 when either is the zero vector.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let (mut dot, mut aa, mut bb) = (0.0f64, 0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (f64::from(x), f64::from(y));
        dot += x * y;
        aa += x * x;
        bb += y * y;
    }
    if aa == 0.0 || bb == 0.0 {
        0.0
    } else {
        (dot / (aa.sqrt() * bb.sqrt())) as f32
    }
}

impl PairTeacher for BiEncoderTeacher {
    fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    fn score_pairs(
        &self,
        pairs: &[PairToScore<'_>],
        ctx: &ScoringContext<'_>,
    ) -> Result<Vec<f32>, EngineError> {
        let (query_row, queries) =
            self.embed_side(pairs.iter().map(|p| p.query), TextKind::Query, ctx)?;
        let (passage_row, passages) =
            self.embed_side(pairs.iter().map(|p| p.passage), TextKind::Passage, ctx)?;
        Ok(pairs
            .iter()
            .map(|p| {
                cosine(
                    queries.row(query_row[p.query]),
                    passages.row(passage_row[p.passage]),
                )
            })
            .collect())
    }
}
