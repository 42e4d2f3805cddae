//! The passage index: every retriever's passage embedding stage (`r<i>-passages`),
//! embedded through its memo table or reused. It needs only the corpus, so the driver
//! builds it while the queries are generated.

use std::sync::Arc;

use distillery_operators::{Embedder, TextKind};

use crate::config::Pipeline;
use crate::corpus::count_records;
use crate::dataflow::embedding_key::embedding_settings_hash;
use crate::dataflow::{passage_texts, run_embed_stage, EmbedStage, CHUNK_ROWS};
use crate::error::EngineError;
use crate::model::fingerprint;
use crate::store::hash_file;
use crate::store::{CompletedStage, StageKey, StageStore};

/// A retriever's model and its passage embeddings, complete for the current corpus.
pub struct PassageIndex {
    pub embedder: Arc<Embedder>,
    /// The model's fingerprint.
    pub model: String,
    /// The passage stage's key settings: the vectors' identity.
    pub settings_hash: String,
    /// Where the passage vectors are (its own stage, or an equal one reused).
    pub passages: CompletedStage,
}

/// A retriever's model, loaded, and its fingerprint.
#[derive(Clone)]
pub struct Retriever {
    pub embedder: Arc<Embedder>,
    pub model: String,
}

/// Every retriever's model (a tiny one made from the corpus where the pipeline asks).
pub fn load_retrievers(pipeline: &Pipeline) -> Result<Vec<Retriever>, EngineError> {
    let read = pipeline.retrievers[0].read_options()?;
    let mut retrievers = Vec::new();
    for (i, settings) in pipeline.retrievers.iter().enumerate() {
        let (embedder, _) = settings.load_embedder(
            &pipeline.corpus,
            &read,
            &pipeline.run_dir.join(format!("r{i}-tiny-model")),
        )?;
        let model = fingerprint(embedder.dir())?;
        retrievers.push(Retriever { embedder, model });
    }
    Ok(retrievers)
}

/// Every retriever's passage embedding stage (`r<i>-passages`), run or reused.
pub fn embed_passages(
    pipeline: &Pipeline,
    retrievers: &[Retriever],
) -> Result<Vec<PassageIndex>, EngineError> {
    let store = StageStore::open(&pipeline.run_dir)?;
    let read = pipeline.retrievers[0].read_options()?;
    let corpus_hash = hash_file(&pipeline.corpus)?;
    let mut indexes = Vec::new();
    for (i, Retriever { embedder, model }) in retrievers.iter().enumerate() {
        let stage = retriever_stage(
            pipeline,
            i,
            embedder,
            TextKind::Passage,
            &corpus_hash,
            count_records(&pipeline.corpus),
        )?;
        let report = run_embed_stage(
            &store,
            embedder.clone(),
            passage_texts(&pipeline.corpus, &read)?,
            &stage,
        )?;
        indexes.push(PassageIndex {
            embedder: embedder.clone(),
            model: model.clone(),
            settings_hash: stage.key.settings_hash,
            passages: report.completed,
        });
    }
    Ok(indexes)
}

/// Retriever `i`'s embedding stage of `kind` texts: `r<i>-passages` or `r<i>-queries`.
pub fn retriever_stage(
    pipeline: &Pipeline,
    i: usize,
    embedder: &Embedder,
    kind: TextKind,
    input_hash: &str,
    total: Option<u64>,
) -> Result<EmbedStage, EngineError> {
    let name = match kind {
        TextKind::Passage => format!("r{i}-passages"),
        TextKind::Query => format!("r{i}-queries"),
    };
    let settings = &pipeline.retrievers[i];
    Ok(EmbedStage {
        label: format!("retriever {i}: {name}"),
        stage: name,
        key: StageKey {
            settings_hash: embedding_settings_hash(embedder, kind)?,
            input_hash: input_hash.to_string(),
        },
        kind,
        batcher: settings.batcher(),
        workers: pipeline.workers,
        cluster: pipeline.cluster.clone(),
        chunk_rows: CHUNK_ROWS,
        total,
        quiet: settings.quiet,
    })
}
