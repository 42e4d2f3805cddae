//! The candidates stage: hard-negative candidates for every query (RECIPE.md section 3).
//!
//! Per retriever, over its passage index ([`super::passage_index`]): the `r<i>-queries`
//! embedding stage, then exact top-`retrieve_top` retrieval ([`super::retrieve`]). The
//! lists go through the mining funnel ([`crate::mining::select_candidates_all`]) and the
//! kept queries become the `candidates` stage (one row per query, see
//! [`crate::schema::candidates_schema`]), with the funnel's counts in
//! `run_dir/candidates-stats.json`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use distillery_operators::TextKind;
use serde::Serialize;

use crate::config::Pipeline;
use crate::corpus::{open_queries, read_qrels};
use crate::dataflow::evaluate::read_matrix;
use crate::dataflow::generate::GenerateOutcome;
use crate::dataflow::passage_index::{retriever_stage, PassageIndex};
use crate::dataflow::retrieve::{run_retrieval_stage, RetrievalReport, RetrievalStage};
use crate::dataflow::{run_embed_stage, CHUNK_ROWS};
use crate::error::EngineError;
use crate::mining::{
    held_out_passages, select_candidates_all, CandidateStats, PassageIdx, QueryRetrievals,
};
use crate::record::Query;
use crate::schema::{candidates_batch, candidates_schema, CandidateRow};
use crate::store::{hash_settings, CompletedStage, ContentHasher, StageKey, StageStore};

/// The candidates stage's name.
pub const CANDIDATES_STAGE: &str = "candidates";

/// What `mine` did.
#[derive(Debug, Clone, Serialize)]
pub struct MineOutcome {
    pub passages: usize,
    pub queries: usize,
    pub held_out: usize,
    pub stats: CandidateStats,
    pub reused: bool,
    /// What each retriever's retrieval did (read back, repaired or run).
    pub retrievals: Vec<RetrievalReport>,
    /// The candidates stage, for the stages downstream.
    #[serde(skip)]
    pub candidates: CompletedStage,
    /// Every retriever's passage and query embedding stages. Their row ids are the
    /// passage ids and the query ids.
    #[serde(skip)]
    pub embeddings: Vec<(EmbeddedStage, EmbeddedStage)>,
}

/// An embedding stage of the run, complete for the current inputs, and the settings
/// hash of its vectors ([`crate::dataflow::embedding_key::embedding_settings_hash`]): what a later stage
/// with the same embedder can take instead of embedding again.
#[derive(Debug, Clone)]
pub struct EmbeddedStage {
    pub stage: String,
    pub settings_hash: String,
}

/// A query to mine candidates for: its text, its source passages (by id) and how it
/// was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MiningQuery {
    pub query: Query,
    pub sources: Vec<String>,
    pub query_type: String,
}

/// Human queries with at least one relevant passage, and their sources (by id).
pub fn read_human_queries(
    queries_file: &crate::config::QueriesFile,
    read: &crate::corpus::ReadOptions,
) -> Result<Vec<MiningQuery>, EngineError> {
    let mut queries = Vec::new();
    for q in open_queries(&queries_file.path, read)? {
        queries.push(q?);
    }
    let known: HashSet<String> = queries.iter().map(|q| q.id.clone()).collect();
    let qrels = read_qrels(&queries_file.qrels, &known, None, read)?;
    Ok(queries
        .into_iter()
        .filter_map(|q| {
            let sources: Vec<String> = qrels
                .get(&q.id)?
                .iter()
                .filter(|(_, &g)| g > 0)
                .map(|(p, _)| p.clone())
                .collect();
            (!sources.is_empty()).then(|| MiningQuery {
                query: q,
                sources,
                query_type: queries_file.query_type.clone(),
            })
        })
        .collect())
}

/// Every query of the pipeline: the human ones (when `[queries]` is given), then the
/// generated ones of `generated` (the pipeline's `[generate]` outcome, when it has one).
/// Generated queries of held-out passages are left out: they are the synthetic test set,
/// never training examples.
pub fn mining_queries(
    pipeline: &Pipeline,
    read: &crate::corpus::ReadOptions,
    generated: Option<&GenerateOutcome>,
) -> Result<Vec<MiningQuery>, EngineError> {
    let mut queries = match &pipeline.queries {
        Some(q) => read_human_queries(q, read)?,
        None => Vec::new(),
    };
    if let Some(generated) = generated {
        queries.extend(
            generated
                .rows
                .iter()
                .filter(|g| !g.held_out)
                .map(|g| MiningQuery {
                    query: Query {
                        id: g.query_id.clone(),
                        text: g.query_text.clone(),
                    },
                    sources: vec![g.source_id.clone()],
                    query_type: g.query_type.clone(),
                }),
        );
    }
    Ok(queries)
}

/// The candidates stage over the human queries and `generated`'s (see
/// [`mining_queries`]) and the retrievers' passage `indexes`; inputs not checked here
/// ([`Pipeline::preflight`]).
pub fn run_candidates_stage(
    pipeline: &Pipeline,
    generated: Option<&GenerateOutcome>,
    indexes: Vec<PassageIndex>,
) -> Result<MineOutcome, EngineError> {
    let store = StageStore::open(&pipeline.run_dir)?;
    let first = &pipeline.retrievers[0];
    let read = first.read_options()?;
    let queries = mining_queries(pipeline, &read, generated)?;
    if queries.is_empty() {
        return Err(EngineError::Invalid(format!(
            "{}: no queries to mine candidates for: {}",
            pipeline.origin.display(),
            match (&pipeline.queries, &pipeline.generate) {
                (Some(q), _) => format!(
                    "no query of {} has a relevant passage in {}{}",
                    q.path.display(),
                    q.qrels.display(),
                    if pipeline.generate.is_some() {
                        ", and generation gave none outside the held-out passages"
                    } else {
                        ""
                    }
                ),
                (None, _) => "generation gave no query outside the held-out passages \
                              (see generate-failures.jsonl and generate-report.json)"
                    .to_string(),
            }
        )));
    }
    let mut qh = ContentHasher::new();
    for q in &queries {
        qh.field(&q.query.id)
            .field(&q.query.text)
            .field(&q.query_type);
        for s in &q.sources {
            qh.field(s);
        }
    }
    let queries_hash = qh.finish();

    // Every retriever: embed the queries, retrieve from its passage index.
    let mut lists_per_retriever: Vec<Vec<Vec<PassageIdx>>> = Vec::new();
    let mut passage_ids: Option<Vec<String>> = None;
    let mut upstream = ContentHasher::new();
    let mut embedded = Vec::new();
    let mut retrievals = Vec::new();
    for (i, index) in indexes.into_iter().enumerate() {
        let q_stage = retriever_stage(
            pipeline,
            i,
            &index.embedder,
            &index.model,
            TextKind::Query,
            &queries_hash,
            Some(queries.len() as u64),
        )?;
        let q_source: Vec<_> = queries
            .iter()
            .map(|q| Ok((q.query.id.clone(), q.query.text.clone())))
            .collect();
        let q_report = run_embed_stage(
            &store,
            Arc::clone(&index.embedder),
            Box::new(q_source.into_iter()),
            &q_stage,
        )?;
        upstream
            .field(index.passages.content_hash())
            .field(q_report.completed.content_hash());
        embedded.push((
            EmbeddedStage {
                stage: index.passages.stage.clone(),
                settings_hash: index.settings_hash.clone(),
            },
            EmbeddedStage {
                stage: q_report.completed.stage.clone(),
                settings_hash: q_stage.key.settings_hash.clone(),
            },
        ));
        let q = read_matrix(&store, &q_report.completed.stage)?;
        let retrieval = run_retrieval_stage(
            &store,
            &RetrievalStage {
                stage: format!("r{i}-retrieved"),
                label: format!("retriever {i}: retrieval"),
                passages: &index.passages,
                queries: &q,
                queries_hash: q_report.completed.content_hash(),
                settings_hash: hash_settings(&(
                    &index.settings_hash,
                    &q_stage.key.settings_hash,
                    pipeline.candidates.retrieve_top,
                ))?,
                k: pipeline.candidates.retrieve_top,
                threads: pipeline.threads,
                quiet: pipeline.retrievers[i].quiet,
            },
        )?;
        drop(q);
        let (ids, hits) = (retrieval.passage_ids, retrieval.lists);
        retrievals.push(retrieval.report);
        match &passage_ids {
            None => passage_ids = Some(ids),
            Some(known) if *known != ids => {
                return Err(EngineError::Invalid(format!(
                    "retriever {i} embedded a different passage list than retriever 0; \
                     the corpus changed during the run?"
                )))
            }
            Some(_) => {}
        }
        lists_per_retriever.push(
            hits.into_iter()
                .map(|h| h.into_iter().map(|x| x.passage).collect())
                .collect(),
        );
    }
    let passage_ids = passage_ids.unwrap_or_default();
    let index: HashMap<&str, PassageIdx> = passage_ids
        .iter()
        .enumerate()
        .map(|(i, id)| (id.as_str(), i as PassageIdx))
        .collect();
    let held_out = held_out_passages(
        &passage_ids,
        pipeline.held_out.count,
        pipeline.held_out.seed,
    );

    #[derive(Serialize)]
    struct CandidateKeySettings<'a> {
        candidates: &'a crate::mining::CandidateConfig,
        held_out: &'a crate::config::HeldOutFile,
    }
    let key = StageKey {
        settings_hash: hash_settings(&CandidateKeySettings {
            candidates: &pipeline.candidates,
            held_out: &pipeline.held_out,
        })?,
        input_hash: upstream.field(&queries_hash).finish(),
    };
    let stats_path = pipeline.run_dir.join("candidates-stats.json");
    let complete = store.completed(CANDIDATES_STAGE, &key)?;
    if let Some(candidates) = &complete {
        let candidates = candidates.clone();
        if let Ok(text) = std::fs::read_to_string(&stats_path) {
            if let Ok(stats) = serde_json::from_str::<CandidateStats>(&text) {
                return Ok(MineOutcome {
                    passages: passage_ids.len(),
                    queries: queries.len(),
                    held_out: held_out.len(),
                    stats,
                    reused: true,
                    retrievals,
                    candidates,
                    embeddings: embedded,
                });
            }
        }
    }

    let per_query = queries.iter().enumerate().map(|(qi, q)| QueryRetrievals {
        query_id: q.query.id.clone(),
        // A judged passage missing from the corpus cannot be a source.
        sources: q
            .sources
            .iter()
            .filter_map(|s| index.get(s.as_str()).copied())
            .collect(),
        lists: lists_per_retriever.iter().map(|l| l[qi].clone()).collect(),
    });
    let (kept, stats) = select_candidates_all(&pipeline.candidates, &held_out, per_query);
    if kept.is_empty() {
        // Nothing to label or train on: say so now, with the funnel, not after the
        // teachers have run over nothing.
        return Err(EngineError::Invalid(format!(
            "no query kept; {stats}. See [candidates] in {} (and whether the queries' \
             relevant passages are in the corpus)",
            pipeline.origin.display()
        )));
    }
    let by_id: HashMap<&str, &MiningQuery> =
        queries.iter().map(|q| (q.query.id.as_str(), q)).collect();
    // A candidate row names every passage by id: built a chunk at a time as the stage is
    // written (all of them at once would hold every id string of every list).
    let row_of = |c: &crate::mining::CandidateList| CandidateRow {
        query_id: c.query_id.clone(),
        query_text: by_id
            .get(c.query_id.as_str())
            .map(|q| q.query.text.clone())
            .unwrap_or_default(),
        query_type: by_id
            .get(c.query_id.as_str())
            .map(|q| q.query_type.clone())
            .unwrap_or_default(),
        source_ids: c
            .sources
            .iter()
            .map(|&s| passage_ids[s as usize].clone())
            .collect(),
        candidate_ids: c
            .candidates
            .iter()
            .map(|&p| passage_ids[p as usize].clone())
            .collect(),
    };
    // The stats are written before the stage is marked complete: a run killed in between
    // finds the stage unfinished and writes both again. (A complete stage whose stats are
    // missing, from a run killed before this order, gets its stats written now.)
    let text =
        serde_json::to_string_pretty(&stats).map_err(|e| EngineError::Invalid(e.to_string()))?;
    let candidates = match complete {
        Some(candidates) => {
            crate::store::write_file_atomically(&stats_path, text.as_bytes())?;
            candidates
        }
        None => {
            let mut writer = store.begin(CANDIDATES_STAGE, key, candidates_schema())?;
            writer.write_row_ranges(kept.len(), CHUNK_ROWS, |range| {
                let rows: Vec<CandidateRow> = kept[range].iter().map(row_of).collect();
                Ok::<_, EngineError>(candidates_batch(&rows)?)
            })?;
            crate::store::write_file_atomically(&stats_path, text.as_bytes())?;
            writer.finish()?
        }
    };
    Ok(MineOutcome {
        passages: passage_ids.len(),
        queries: queries.len(),
        held_out: held_out.len(),
        stats,
        reused: false,
        retrievals,
        candidates,
        embeddings: embedded,
    })
}
