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
use crate::dataflow::retrieve::{
    run_retrieval_stage, streaming_chunk, RetrievalReport, RetrievalRun, RetrievalStage,
};
use crate::dataflow::{run_embed_stage, CHUNK_ROWS};
use crate::error::EngineError;
use crate::mining::{
    held_out_passages, select_candidates_all, select_candidates_on_threads, CandidateStats,
    PassageIdx, QueryRetrievals,
};
use crate::record::Query;
use crate::retrieval::Hit;
use crate::schema::{candidates_batch, candidates_schema, CandidateRow, EmbeddingMatrix};
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

/// Where the candidates stage hands its rows as they become final: in query order, a
/// chunk at a time, before the stage is written, for the stages that can start on part
/// of them (the teachers' scoring ahead, [`crate::dataflow::score_ahead`]).
pub type CandidateSink<'s> = &'s mut dyn FnMut(Vec<CandidateRow>) -> Result<(), EngineError>;

/// The candidates stage over the human queries and `generated`'s (see
/// [`mining_queries`]) and the retrievers' passage `indexes`; inputs not checked here
/// ([`Pipeline::preflight`]).
///
/// With a `sink`, every retrieval that must run over every passage runs query-major in
/// `[engine] stream_queries` queries per pass (by default [`streaming_chunk`]), all
/// retrievers on one chunk before the next,
/// and each chunk's kept rows go to the sink as soon as every retriever's lists of it
/// are final (lists read back or repaired are final at once). Without one, each
/// retriever retrieves every query in one pass, holding one query matrix at a time. The
/// stage's bytes are the same either way.
pub fn run_candidates_stage(
    pipeline: &Pipeline,
    generated: Option<&GenerateOutcome>,
    indexes: Vec<PassageIndex>,
    mut sink: Option<CandidateSink<'_>>,
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
    let nq = queries.len();

    // Every retriever embeds the queries.
    let mut upstream = ContentHasher::new();
    let mut embedded = Vec::new();
    let mut query_stages = Vec::new();
    for (i, index) in indexes.iter().enumerate() {
        let q_stage = retriever_stage(
            pipeline,
            i,
            &index.embedder,
            TextKind::Query,
            &queries_hash,
            Some(nq as u64),
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
        query_stages.push((q_report.completed, q_stage.key.settings_hash));
    }
    let retrieval_of = |i: usize, index: &PassageIndex, q_settings: &str| {
        Ok::<_, EngineError>((
            format!("r{i}-retrieved"),
            format!("retriever {i}: retrieval"),
            hash_settings(&(
                &index.settings_hash,
                q_settings,
                pipeline.candidates.retrieve_top,
            ))?,
        ))
    };

    // Every retriever's retrieval: all at once (one matrix held at a time), or
    // query-major for the sink (every matrix held, the chunks interleaved).
    let key = candidates_key(pipeline, upstream.field(&queries_hash).finish())?;
    let mut lists_per_retriever: Vec<Vec<Vec<Hit>>> = Vec::new();
    let mut retrievals = Vec::new();
    let mut streamed: Option<Streamed> = None;
    let passage_ids: Vec<String>;
    let state: CandidateState<'_>;
    if let Some(sink) = sink.as_mut() {
        let matrices: Vec<EmbeddingMatrix> = query_stages
            .iter()
            .map(|(done, _)| read_matrix(&store, &done.stage))
            .collect::<Result<_, _>>()?;
        let mut stages = Vec::with_capacity(indexes.len());
        for (i, ((index, (q_done, q_settings)), q)) in
            indexes.iter().zip(&query_stages).zip(&matrices).enumerate()
        {
            let (stage, label, settings_hash) = retrieval_of(i, index, q_settings)?;
            stages.push(RetrievalStage {
                stage,
                label,
                passages: &index.passages,
                queries: q,
                queries_hash: q_done.content_hash(),
                settings_hash,
                k: pipeline.candidates.retrieve_top,
                threads: pipeline.threads,
                sharing: pipeline.sharing(),
                quiet: pipeline.retrievers[i].quiet,
            });
        }
        let mut runs = Vec::with_capacity(stages.len());
        for (i, stage) in stages.iter().enumerate() {
            let chunk = pipeline
                .stream_queries
                .unwrap_or_else(|| streaming_chunk(nq));
            let run = RetrievalRun::open(&store, stage, chunk)?;
            if let Some(first) = runs.first() {
                same_passages(i, RetrievalRun::passage_ids(first), run.passage_ids())?;
            }
            runs.push(run);
        }
        passage_ids = runs
            .first()
            .map(|r| r.passage_ids().to_vec())
            .unwrap_or_default();
        state = candidate_state(pipeline, &queries, &passage_ids);
        // Nothing to stream when the stage is complete: its rows went downstream when
        // it was made.
        let complete = store.completed(CANDIDATES_STAGE, &key)?.is_some();
        let mut stream = Streamed {
            stats: CandidateStats::default(),
            kept: Vec::new(),
        };
        let mut sent = 0;
        loop {
            let frontier = runs
                .iter()
                .map(|r| r.final_lists().len())
                .min()
                .unwrap_or(nq);
            if frontier > sent && !complete {
                let per_query = (sent..frontier).map(|qi| QueryRetrievals {
                    query_id: queries[qi].query.id.clone(),
                    sources: state.sources(&queries[qi]),
                    lists: runs
                        .iter()
                        .map(|r| r.final_lists()[qi].iter().map(|h| h.passage).collect())
                        .collect(),
                });
                let (kept, stats) =
                    select_candidates_all(&pipeline.candidates, &state.held_out, per_query);
                stream.stats.merge(&stats);
                if !kept.is_empty() {
                    sink(kept.iter().map(|c| state.row_of(c)).collect())?;
                }
                stream.kept.extend(kept);
            }
            sent = frontier;
            if frontier >= nq {
                break;
            }
            for run in runs
                .iter_mut()
                .filter(|r| r.final_lists().len() == frontier)
            {
                run.advance()?;
            }
        }
        for run in runs {
            retrievals.push(run.finish()?.report);
        }
        streamed = (!complete).then_some(stream);
    } else {
        let mut first_ids: Option<Vec<String>> = None;
        for (i, (index, (q_done, q_settings))) in indexes.iter().zip(&query_stages).enumerate() {
            let q = read_matrix(&store, &q_done.stage)?;
            let (stage, label, settings_hash) = retrieval_of(i, index, q_settings)?;
            let retrieval = run_retrieval_stage(
                &store,
                &RetrievalStage {
                    stage,
                    label,
                    passages: &index.passages,
                    queries: &q,
                    queries_hash: q_done.content_hash(),
                    settings_hash,
                    k: pipeline.candidates.retrieve_top,
                    threads: pipeline.threads,
                    sharing: pipeline.sharing(),
                    quiet: pipeline.retrievers[i].quiet,
                },
            )?;
            match &first_ids {
                Some(first) => same_passages(i, first, &retrieval.passage_ids)?,
                None => first_ids = Some(retrieval.passage_ids),
            }
            retrievals.push(retrieval.report);
            lists_per_retriever.push(retrieval.lists);
        }
        passage_ids = first_ids.unwrap_or_default();
        state = candidate_state(pipeline, &queries, &passage_ids);
    }
    let stats_path = pipeline.run_dir.join("candidates-stats.json");
    let complete = store.completed(CANDIDATES_STAGE, &key)?;
    if let Some(candidates) = &complete {
        let candidates = candidates.clone();
        if let Ok(text) = std::fs::read_to_string(&stats_path) {
            if let Ok(stats) = serde_json::from_str::<CandidateStats>(&text) {
                return Ok(MineOutcome {
                    passages: passage_ids.len(),
                    queries: nq,
                    held_out: state.held_out.len(),
                    stats,
                    reused: true,
                    retrievals,
                    candidates,
                    embeddings: embedded,
                });
            }
        }
    }

    let (kept, stats) = match streamed {
        Some(s) => (s.kept, s.stats),
        None => {
            let query = |qi: usize| QueryRetrievals {
                query_id: queries[qi].query.id.clone(),
                sources: state.sources(&queries[qi]),
                lists: lists_per_retriever
                    .iter()
                    .map(|l| l[qi].iter().map(|h| h.passage).collect())
                    .collect(),
            };
            select_candidates_on_threads(
                &pipeline.candidates,
                &state.held_out,
                queries.len(),
                query,
                pipeline.threads,
            )
        }
    };
    drop(lists_per_retriever);
    if kept.is_empty() {
        // Nothing to label or train on: say so now, with the funnel, not after the
        // teachers have run over nothing.
        return Err(EngineError::Invalid(format!(
            "no query kept; {stats}. See [candidates] in {} (and whether the queries' \
             relevant passages are in the corpus)",
            pipeline.origin.display()
        )));
    }
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
            // A candidate row names every passage by id: built a chunk at a time as the
            // stage is written (all of them at once would hold every id string of every
            // list).
            writer.write_row_ranges(kept.len(), CHUNK_ROWS, |range| {
                let rows: Vec<CandidateRow> = kept[range].iter().map(|c| state.row_of(c)).collect();
                Ok::<_, EngineError>(candidates_batch(&rows)?)
            })?;
            crate::store::write_file_atomically(&stats_path, text.as_bytes())?;
            writer.finish()?
        }
    };
    Ok(MineOutcome {
        passages: passage_ids.len(),
        queries: nq,
        held_out: state.held_out.len(),
        stats,
        reused: false,
        retrievals,
        candidates,
        embeddings: embedded,
    })
}

/// Retriever `i`'s passages must be retriever 0's: the lists' positions count them.
fn same_passages(i: usize, first: &[String], ids: &[String]) -> Result<(), EngineError> {
    if first == ids {
        Ok(())
    } else {
        Err(EngineError::Invalid(format!(
            "retriever {i} embedded a different passage list than retriever 0; \
             the corpus changed during the run?"
        )))
    }
}

/// The funnel's output so far, when it ran chunk by chunk.
struct Streamed {
    stats: CandidateStats,
    kept: Vec<crate::mining::CandidateList>,
}

/// The candidates stage's key: the funnel's and the held-out set's settings, over its
/// `input` (every retriever's passage and query stages and the queries).
fn candidates_key(pipeline: &Pipeline, input: String) -> Result<StageKey, EngineError> {
    #[derive(Serialize)]
    struct CandidateKeySettings<'a> {
        candidates: &'a crate::mining::CandidateConfig,
        held_out: &'a crate::config::HeldOutFile,
    }
    Ok(StageKey {
        settings_hash: hash_settings(&CandidateKeySettings {
            candidates: &pipeline.candidates,
            held_out: &pipeline.held_out,
        })?,
        input_hash: input,
    })
}

/// What the funnel needs beside the lists: the passages by id, the held-out ones, and
/// the queries by id (for the rows).
struct CandidateState<'q> {
    passage_ids: &'q [String],
    index: HashMap<&'q str, PassageIdx>,
    held_out: HashSet<PassageIdx>,
    by_id: HashMap<&'q str, &'q MiningQuery>,
}

fn candidate_state<'q>(
    pipeline: &Pipeline,
    queries: &'q [MiningQuery],
    passage_ids: &'q [String],
) -> CandidateState<'q> {
    CandidateState {
        passage_ids,
        index: passage_ids
            .iter()
            .enumerate()
            .map(|(i, id)| (id.as_str(), i as PassageIdx))
            .collect(),
        held_out: held_out_passages(passage_ids, pipeline.held_out.count, pipeline.held_out.seed),
        by_id: queries.iter().map(|q| (q.query.id.as_str(), q)).collect(),
    }
}

impl CandidateState<'_> {
    /// The query's sources in the corpus (a judged passage missing from it cannot be a
    /// source).
    fn sources(&self, q: &MiningQuery) -> Vec<PassageIdx> {
        q.sources
            .iter()
            .filter_map(|s| self.index.get(s.as_str()).copied())
            .collect()
    }

    /// A kept query's row: its query and every passage by id.
    fn row_of(&self, c: &crate::mining::CandidateList) -> CandidateRow {
        let query = self.by_id.get(c.query_id.as_str());
        CandidateRow {
            query_id: c.query_id.clone(),
            query_text: query.map(|q| q.query.text.clone()).unwrap_or_default(),
            query_type: query.map(|q| q.query_type.clone()).unwrap_or_default(),
            source_ids: c
                .sources
                .iter()
                .map(|&s| self.passage_ids[s as usize].clone())
                .collect(),
            candidate_ids: c
                .candidates
                .iter()
                .map(|&p| self.passage_ids[p as usize].clone())
                .collect(),
        }
    }
}
