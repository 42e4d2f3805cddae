//! A process other than 0 of the cluster (`dataflow/cluster.rs`): it serves process 0's
//! jobs until process 0's command is over: device stages (the share of the items timely
//! sends it), shared exact retrievals (`shared_top_k.rs`) and data-parallel training
//! (`train::data_parallel`).

use std::path::Path;
use std::sync::Arc;

use candle_core::Device;
use distillery_operators::student::{Student, StudentOptions};
use serde::Serialize;

use crate::config::cluster::Cluster;
use crate::dataflow::cluster::{next_job, FollowerJob};
use crate::dataflow::rounds::Rounds;
use crate::dataflow::shared_top_k::serve_top_k;
use crate::error::EngineError;
use crate::executor::{EmbedTexts, ModelSpec, ScorePairs};
use crate::train::data_parallel::{refuse_steps, serve_steps};

/// What a follower did for its leader.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Served {
    pub stages: usize,
    /// Items this process's device ran (texts embedded, pairs scored).
    pub items: u64,
    /// Training steps (and dev-loss batches) whose share this process embedded.
    pub train_batches: u64,
    /// Passage blocks of exact retrievals this process scored.
    pub retrieval_blocks: u64,
}

/// A follower's life: every stage the leader announces, run on `device` with `workers`
/// threads, until it announces the end.
pub fn serve(
    cluster: &Cluster,
    workers: usize,
    device: &Device,
    quiet: bool,
) -> Result<Served, EngineError> {
    if cluster.is_leader() {
        return Err(EngineError::Invalid(
            "process 0 leads; it does not serve".into(),
        ));
    }
    let mut served = Served::default();
    let mut embedders: Vec<(ModelSpec, Arc<EmbedTexts>)> = Vec::new();
    let mut scorers: Vec<(ModelSpec, Arc<ScorePairs>)> = Vec::new();
    loop {
        let (model, max_tokens, max_rows, label) = match next_job(cluster, workers)? {
            FollowerJob::Done => return Ok(served),
            FollowerJob::Retrieve => {
                let mut rounds = Rounds::open(cluster)?;
                served.retrieval_blocks += serve_top_k(&mut rounds, workers)?;
                served.stages += 1;
                continue;
            }
            FollowerJob::Train {
                model,
                query_max_length,
                passage_max_length,
                query_prefix,
                passage_prefix,
            } => {
                let options = StudentOptions {
                    query_max_length,
                    passage_max_length,
                    query_prefix,
                    passage_prefix,
                };
                // The rounds first: process 0 waits in them, and hears from them why
                // this process cannot train.
                let mut rounds = Rounds::open(cluster)?;
                let steps = match Student::load(Path::new(&model), &options, device) {
                    Ok(student) => serve_steps(&student, &mut rounds)?,
                    Err(e) => {
                        let e = EngineError::from(e);
                        refuse_steps(&mut rounds, &e)?;
                        return Err(e);
                    }
                };
                served.stages += 1;
                served.train_batches += steps.embedded;
                continue;
            }
            FollowerJob::Stage {
                model,
                max_tokens,
                max_rows,
                label,
            } => (model, max_tokens, max_rows, label),
        };
        let stage = super::EmbedStage {
            stage: String::new(),
            key: crate::store::StageKey {
                settings_hash: String::new(),
                input_hash: String::new(),
            },
            kind: distillery_operators::TextKind::Passage,
            batcher: distillery_operators::TokenBudgetBatcher {
                max_tokens,
                max_rows,
            },
            workers,
            cluster: cluster.clone(),
            chunk_rows: super::CHUNK_ROWS,
            total: None,
            label: format!("process {}: {label}", cluster.process),
            quiet,
        };
        let unwritten = super::unwritten_output;
        let items = if let Some(found) = embedders.iter().find(|(s, _)| *s == model) {
            super::follow_device_stage(found.1.clone(), &stage, unwritten())?
        } else if let Some(found) = scorers.iter().find(|(s, _)| *s == model) {
            super::follow_device_stage(found.1.clone(), &stage, unwritten())?
        } else if let Some(m) = model.load_embed(device)? {
            let m = Arc::new(m);
            embedders.push((model, m.clone()));
            super::follow_device_stage(m, &stage, unwritten())?
        } else if let Some(m) = model.load_score(device)? {
            let m = Arc::new(m);
            scorers.push((model, m.clone()));
            super::follow_device_stage(m, &stage, unwritten())?
        } else {
            return Err(EngineError::Dataflow(format!(
                "process 0 named a model this process cannot load: {model:?}"
            )));
        };
        served.stages += 1;
        served.items += items;
    }
}
