//! The cross-encoder teacher: a sequence-classification model reads query and passage
//! together and gives the pair one logit. Pairs run as one device stage (tokenised and
//! batched on the workers, resumable when killed), `<prefix>-pending`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::Device;
use distillery_operators::cross_encoder::{CrossEncoder, CrossEncoderOptions};
use distillery_operators::TextKind;
use serde::Serialize;

use crate::dataflow::{run_device_stage, EmbedStage, StageOutput, CHUNK_ROWS};
use crate::error::EngineError;
use crate::executor::ScorePairs;
use crate::model::fingerprint;
use crate::store::{hash_settings, ContentHasher, StageKey};

use super::pair_cache::{read_scores, scores_batch, scores_schema};
use super::teacher::{PairTeacher, PairToScore, ScoringContext};
use crate::store::memo::{MemoKey, MemoMap};

/// A loaded cross-encoder and its fingerprint.
pub struct CrossEncoderTeacher {
    model: Arc<CrossEncoder>,
    fingerprint: String,
}

/// The settings a cross-encoder's scores depend on. Changing its serialised form orphans
/// every existing cache, which only a change of the scores themselves justifies (the
/// kernel's arithmetic revision).
#[derive(Serialize)]
struct CrossEncoderKey<'a> {
    model: &'a str,
    max_length: usize,
    /// [`distillery_operators::cpu_bert::ARITHMETIC_REVISION`]: scores of another revision
    /// of the kernel may differ in the last bits.
    arithmetic: u32,
}

impl CrossEncoderTeacher {
    /// Loads the model directory `dir` on `device`; `max_length` caps tokens per pair.
    pub fn load(
        dir: &Path,
        max_length: Option<usize>,
        device: &Device,
    ) -> Result<Self, EngineError> {
        let model = CrossEncoder::load(dir, &CrossEncoderOptions { max_length }, device)?;
        let files = fingerprint(dir)?;
        let fingerprint = hash_settings(&CrossEncoderKey {
            model: &files,
            max_length: model.max_length(),
            arithmetic: distillery_operators::cpu_bert::ARITHMETIC_REVISION,
        })?;
        Ok(Self {
            model: Arc::new(model),
            fingerprint,
        })
    }
}

/// Distinct texts, each once, by first appearance.
#[derive(Default)]
struct TextTable {
    texts: Vec<String>,
    index: HashMap<String, u32>,
}

impl TextTable {
    fn intern(&mut self, text: &str) -> u32 {
        if let Some(&i) = self.index.get(text) {
            return i;
        }
        let i = self.texts.len() as u32;
        self.texts.push(text.to_string());
        self.index.insert(text.to_string(), i);
        i
    }
}

impl PairTeacher for CrossEncoderTeacher {
    fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    fn scores_ahead(&self) -> bool {
        true
    }

    fn score_pairs(
        &self,
        pairs: &[PairToScore<'_>],
        ctx: &ScoringContext<'_>,
    ) -> Result<Vec<f32>, EngineError> {
        let mut input = ContentHasher::new();
        for p in pairs {
            input.field(p.key);
        }
        let stage = EmbedStage {
            stage: format!("{}-pending", ctx.stage_prefix),
            key: StageKey {
                settings_hash: self.fingerprint.clone(),
                input_hash: input.finish(),
            },
            // Pairs are tokenised as pairs; the kind only matters to embedders.
            kind: TextKind::Passage,
            batcher: ctx.batcher,
            workers: ctx.workers,
            cluster: ctx.cluster.clone(),
            chunk_rows: CHUNK_ROWS,
            total: Some(pairs.len() as u64),
            label: format!("{}: score pairs", ctx.label),
            quiet: ctx.quiet,
        };
        // Each distinct text is copied once and each pair is two indices: the pairs are
        // handed to the dataflow lazily, so only the chunks in flight hold pair copies
        // (a copy per pair up front was 2 GB for SciFact's 1.45M pairs).
        let (mut queries, mut passages) = (TextTable::default(), TextTable::default());
        let items: Vec<(String, u32, u32)> = pairs
            .iter()
            .map(|p| {
                (
                    p.key.to_string(),
                    queries.intern(p.query),
                    passages.intern(p.passage),
                )
            })
            .collect();
        let (queries, passages) = (Arc::new(queries.texts), Arc::new(passages.texts));
        let source = items.into_iter().map(move |(key, q, p)| {
            Ok((
                key,
                (queries[q as usize].clone(), passages[p as usize].clone()),
            ))
        });
        let output = StageOutput {
            schema: scores_schema(),
            to_batch: Arc::new(scores_batch),
        };
        let report = run_device_stage(
            ctx.store,
            Arc::new(ScorePairs {
                model: self.model.clone(),
            }),
            Box::new(source),
            &stage,
            output,
        )?;
        let mut scored = MemoMap::default();
        read_scores(ctx.store, &report.completed.stage, &mut scored)?;
        pairs
            .iter()
            .map(|p| {
                MemoKey::from_hex(p.key)
                    .and_then(|k| scored.get(&k).copied())
                    .ok_or_else(|| {
                        EngineError::Dataflow(format!(
                            "stage {}: no score for pair {}; this is a bug",
                            stage.stage, p.key
                        ))
                    })
            })
            .collect()
    }
}
