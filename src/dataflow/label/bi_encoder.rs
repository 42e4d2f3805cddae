//! The bi-encoder teacher: a sentence embedder embeds the query and the passage apart,
//! and the pair's score is the cosine of the two embeddings.
//!
//! The embedder is loaded as a retriever's is ([`EmbedSettings::load_embedder`]: a
//! directory or a hub id in the local cache, the model's prompts unless
//! `query_prefix`/`passage_prefix` override them). Each distinct text is embedded once,
//! not once per pair (a query has tens of candidates, a passage is a candidate of
//! several queries), by two embedding stages that resume when killed,
//! `<prefix>-queries` and `<prefix>-passages`, with the embedding stages' progress,
//! rate and ETA. Their ids are hashes of the texts. A text that a retriever with the
//! same embedding settings ([`crate::dataflow::embedding_key::embedding_settings_hash`]: the model's files,
//! maximum length, prefix and side) already embedded is taken from the retriever's stage
//! and not embedded again: a bi-encoder teacher with the retriever's own model embeds
//! nothing. Its own stages are keyed by that embedding key too, so they share the memo
//! table of every stage that embeds with the same model and settings: a text a retriever
//! or an evaluation embedded is read back even where no stage of the run lists it (the
//! teacher check's queries and passages). The embeddings of the texts being scored are then held while the cosines are
//! taken: `4 x dim` bytes a text (1.5 KB for MiniLM), about what the passage texts
//! themselves already take.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};

use distillery_operators::{Embedder, TextKind};
use serde::Serialize;

use crate::config::EmbedSettings;
use crate::config::TeacherKind;
use crate::corpus::ReadOptions;
use crate::dataflow::embedding_key::embedding_settings_hash;
use crate::dataflow::evaluate::read_matrix;
use crate::dataflow::{run_embed_stage, EmbedStage, TextSource, CHUNK_ROWS};
use crate::error::EngineError;
use crate::model::fingerprint;
use crate::schema::EmbeddingMatrix;
use crate::store::{hash_settings, ContentHasher, StageKey};

use super::teacher::{EmbeddingCounts, PairTeacher, PairToScore, ScoringContext};

/// A loaded sentence embedder and its fingerprint.
pub struct BiEncoderTeacher {
    embedder: Arc<Embedder>,
    fingerprint: String,
    counts: Mutex<EmbeddingCounts>,
}

/// The vectors of one side's distinct texts: each text's matrix and row.
struct SideVectors<'t> {
    matrices: Vec<EmbeddingMatrix>,
    at: HashMap<&'t str, (usize, usize)>,
}

impl SideVectors<'_> {
    fn get(&self, text: &str) -> &[f32] {
        let (m, row) = self.at[text];
        self.matrices[m].row(row)
    }
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
            counts: Mutex::new(EmbeddingCounts::default()),
        })
    }

    /// The vectors of the distinct texts of one side: taken from a known stage with the
    /// same embedding settings where it holds the text, embedded in the teacher's own
    /// stage otherwise. Returns them with (embedded now, reused).
    fn embed_side<'t>(
        &self,
        texts: impl Iterator<Item = &'t str>,
        kind: TextKind,
        ctx: &ScoringContext<'_>,
    ) -> Result<(SideVectors<'t>, u64, u64), EngineError> {
        let side = match kind {
            TextKind::Query => "queries",
            TextKind::Passage => "passages",
        };
        let mut distinct: Vec<&'t str> = Vec::new();
        let mut seen: HashSet<&'t str> = HashSet::new();
        for t in texts {
            if seen.insert(t) {
                distinct.push(t);
            }
        }
        let mut vectors = SideVectors {
            matrices: Vec::new(),
            at: HashMap::new(),
        };
        let settings = embedding_settings_hash(&self.embedder, kind)?;
        for known in ctx.known.iter().filter(|k| k.settings_hash == settings) {
            let wanted: HashMap<&str, &'t str> = distinct
                .iter()
                .filter(|t| !vectors.at.contains_key(*t))
                .filter_map(|&t| known.id_of_text.get(t).map(|id| (id.as_str(), t)))
                .collect();
            if wanted.is_empty() {
                continue;
            }
            let m = vectors.matrices.len();
            let mut taken = EmbeddingMatrix::default();
            for batch in ctx.store.read(&known.stage)? {
                let mut part = EmbeddingMatrix::default();
                part.extend_from_batch(&batch?)?;
                taken.dim = part.dim;
                for (row, id) in part.ids.iter().enumerate() {
                    if let Some(&text) = wanted.get(id.as_str()) {
                        if let std::collections::hash_map::Entry::Vacant(slot) =
                            vectors.at.entry(text)
                        {
                            slot.insert((m, taken.ids.len()));
                            taken.ids.push(id.clone());
                            taken.values.extend_from_slice(part.row(row));
                        }
                    }
                }
            }
            vectors.matrices.push(taken);
        }
        let reused = vectors.at.len() as u64;

        let mut items: Vec<(String, String)> = Vec::new();
        let mut missing: Vec<&'t str> = Vec::new();
        let mut input = ContentHasher::new();
        for &t in distinct.iter().filter(|t| !vectors.at.contains_key(*t)) {
            let id = ContentHasher::new().field(t).finish();
            input.field(&id);
            items.push((id, t.to_string()));
            missing.push(t);
        }
        if items.is_empty() {
            return Ok((vectors, 0, reused));
        }
        // Keyed by the one embedding key: the stage shares the memo table of every stage
        // that embeds with the same model and settings (a retriever's), so a text any of
        // them embedded is read back, not embedded again.
        let stage = EmbedStage {
            stage: format!("{}-{side}", ctx.stage_prefix),
            key: StageKey {
                settings_hash: settings,
                input_hash: input.finish(),
            },
            kind,
            batcher: ctx.batcher,
            workers: ctx.workers,
            cluster: ctx.cluster.clone(),
            chunk_rows: CHUNK_ROWS,
            total: Some(items.len() as u64),
            label: format!("{}: embed {side}", ctx.label),
            quiet: ctx.quiet,
        };
        let expected: Vec<String> = items.iter().map(|(id, _)| id.clone()).collect();
        let source: TextSource = Box::new(items.into_iter().map(Ok));
        let report = run_embed_stage(ctx.store, self.embedder.clone(), source, &stage)?;
        // What the memo served was embedded before (by this teacher or a retriever).
        let (embedded, reused) = if report.reused {
            (0, reused + expected.len() as u64)
        } else {
            (report.rows_embedded, reused + report.rows_memoised)
        };
        let matrix = read_matrix(ctx.store, &report.completed.stage)?;
        // The stage writes rows in input order; a mismatch would pair texts with other
        // texts' embeddings.
        if matrix.ids != expected {
            return Err(EngineError::Dataflow(format!(
                "stage {}: rows are not the texts in input order; this is a bug",
                stage.stage
            )));
        }
        let m = vectors.matrices.len();
        for (row, t) in missing.into_iter().enumerate() {
            vectors.at.insert(t, (m, row));
        }
        vectors.matrices.push(matrix);
        Ok((vectors, embedded, reused))
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
        let (queries, queries_embedded, queries_reused) =
            self.embed_side(pairs.iter().map(|p| p.query), TextKind::Query, ctx)?;
        let (passages, passages_embedded, passages_reused) =
            self.embed_side(pairs.iter().map(|p| p.passage), TextKind::Passage, ctx)?;
        *self
            .counts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = EmbeddingCounts {
            queries_embedded,
            queries_reused,
            passages_embedded,
            passages_reused,
        };
        Ok(pairs
            .iter()
            .map(|p| cosine(queries.get(p.query), passages.get(p.passage)))
            .collect())
    }

    fn embedding_counts(&self) -> EmbeddingCounts {
        *self
            .counts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
