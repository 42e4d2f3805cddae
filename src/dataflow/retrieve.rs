//! The retrieval stage: every query's exact top-k over a passage embedding stage, kept in
//! the store, and repaired rather than recomputed when the passages change.
//!
//! Two stages hold a retrieval: its passage list (`<stage>-passages`: each passage's id
//! and identity, in the order the lists' positions count) and its lists (`<stage>`: per
//! query, its vector's identity and its top-k as positions and scores). A rerun whose
//! passages and queries are unchanged reads both back and scores nothing. A rerun over a
//! changed passage stage repairs the last version's lists ([`crate::retrieval::repair`]):
//!
//! 1. One pass over the new passage stage hashes every passage's identity, tells which
//!    were added and which removed, and keeps the added passages' vectors.
//! 2. The added passages are scored against every query (a few thousand queries at a
//!    time) and merged into each query's old list; a list that held a removed passage,
//!    and a query the last version did not have, is retrieved again over every passage
//!    (a second pass, for those queries alone).
//!
//! Every query retrieved over every passage is retrieved in one pass, or query-major
//! ([`RetrievalRun`]: a chunk of queries per pass over the passage stage, read block by
//! block) when what is downstream starts on each chunk's lists as they become final.
//!
//! The lists are exactly a retrieval from scratch's, ties included, however they were
//! chunked. The last version is
//! used only when both of its stages are complete and its lists were made from its
//! passage list (the lists' key names the passage stage they came from), under the same
//! settings; otherwise, or when more than [`REPAIR_MAX_ADDED`] of the passages are new,
//! every query is retrieved over every passage.

use std::collections::HashMap;
use std::time::Instant;

use serde::Serialize;

use super::CHUNK_ROWS;
use crate::config::cluster::Sharing;
use crate::dataflow::shared_top_k::TopKOver;
use crate::error::EngineError;
use crate::progress::Progress;
use crate::retrieval::repair::{passage_identity, query_identity, ChangeTracker, Identity};
use crate::retrieval::{Hit, TopK};
use crate::schema::{
    passage_list_batch, passage_list_from_batch, passage_list_schema, retrieved_batch,
    retrieved_from_batch, retrieved_schema, EmbeddingMatrix,
};
use crate::store::{CompletedStage, StageKey, StageStore};

/// The settings hash of every passage-list stage: the list is a function of the passage
/// stage alone (its key's input hash is that stage's content hash).
const PASSAGE_LIST_SETTINGS: &str = "passage identities v1";

/// The largest fraction of a changed corpus that is repaired rather than retrieved again:
/// past it, the added passages' product costs about what a full retrieval does, and
/// their vectors would be held in memory.
pub const REPAIR_MAX_ADDED: f64 = 0.25;

/// Queries whose added passages are scored at once during a repair: their best added
/// passages are held (k hits each) until merged.
const REPAIR_QUERY_CHUNK: usize = 8192;

/// One retrieval: what it reads and under which settings.
#[derive(Debug, Clone)]
pub struct RetrievalStage<'a> {
    /// The lists' stage (`r<i>-retrieved`); the passage list is `<stage>-passages`.
    pub stage: String,
    /// Shown in progress lines.
    pub label: String,
    /// The passage embedding stage, complete.
    pub passages: &'a CompletedStage,
    /// The query vectors, in query order.
    pub queries: &'a EmbeddingMatrix,
    /// The query embedding stage's content hash.
    pub queries_hash: String,
    /// What else decides the lists: both sides' embedding settings and `k`.
    pub settings_hash: String,
    pub k: usize,
    pub threads: usize,
    /// How the product is shared among the cluster's processes.
    pub sharing: Sharing,
    pub quiet: bool,
}

/// What a retrieval stage did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RetrievalReport {
    pub stage: String,
    pub queries: usize,
    pub passages: usize,
    /// The lists were read back: passages and queries were unchanged.
    pub reused: bool,
    /// Lists of the last version kept and merged with the added passages.
    pub lists_repaired: usize,
    /// Lists retrieved over every passage.
    pub lists_retrieved: usize,
    /// Passages new to this version (added or edited), scored against every query when
    /// the lists were repaired.
    pub passages_added: usize,
    /// Passages of the last version that are gone (removed or edited).
    pub passages_removed: usize,
    pub seconds: f64,
}

/// A retrieval's result.
#[derive(Debug)]
pub struct Retrieval {
    /// The passages' ids: what the lists' positions count.
    pub passage_ids: Vec<String>,
    /// Each query's `k` best passages, best first.
    pub lists: Vec<Vec<Hit>>,
    pub report: RetrievalReport,
}

/// The last version of a retrieval, read back whole.
struct LastVersion {
    passages: Vec<Identity>,
    lists: HashMap<Identity, Vec<Hit>>,
}

/// The input hash of a lists stage: the passage stage and the query stage it came from.
fn lists_input(passages_hash: &str, queries_hash: &str) -> String {
    format!("passages {passages_hash} queries {queries_hash}")
}

/// Runs (or reuses, or repairs) the retrieval `s` describes, in one pass over the
/// passage stage when every query must be retrieved.
pub fn run_retrieval_stage(
    store: &StageStore,
    s: &RetrievalStage,
) -> Result<Retrieval, EngineError> {
    let mut run = RetrievalRun::open(store, s, s.queries.len())?;
    while run.advance()? {}
    run.finish()
}

/// Query vectors retrieved per pass when a retrieval streams: the number of passes over
/// the passage stage such a retrieval makes (each decodes the whole stage once more,
/// about 1 s a gigabyte, against the product's hours at that size), and so how many times
/// its lists become final along the way.
pub const STREAMING_PASSES: usize = 8;

/// The fewest queries a streaming pass retrieves: below it a pass's product is too small
/// to be worth a read of the passage stage.
pub const MIN_STREAMING_QUERIES: usize = 1024;

/// Queries per pass for a retrieval of `queries` that streams: [`STREAMING_PASSES`]
/// passes, none of fewer than [`MIN_STREAMING_QUERIES`] queries.
pub fn streaming_chunk(queries: usize) -> usize {
    queries
        .div_ceil(STREAMING_PASSES)
        .max(MIN_STREAMING_QUERIES)
        .min(queries.max(1))
}

/// A retrieval whose lists become final in query order, a chunk of queries at a time,
/// so what is downstream of them can start before the last list is done:
/// [`RetrievalRun::open`] decides (read back, repair, or retrieve) and makes the first
/// lists final; [`RetrievalRun::advance`] makes the next chunk final; and
/// [`RetrievalRun::finish`] keeps the lists in the store. A query's list is the same
/// bits whichever chunk it is retrieved in (every score is the same bits for any set of
/// queries: [`crate::retrieval::TopK`]).
pub struct RetrievalRun<'a> {
    store: &'a StageStore,
    s: &'a RetrievalStage<'a>,
    /// The lists' key, `None` when they were read back (nothing to write).
    key: Option<StageKey>,
    query_ids: Vec<Identity>,
    passage_ids: Vec<String>,
    /// Every final list: those of queries `0..lists.len()`.
    lists: Vec<Vec<Hit>>,
    /// Queries retrieved per pass over every passage.
    chunk: usize,
    report: RetrievalReport,
    start: Instant,
}

impl<'a> RetrievalRun<'a> {
    /// Starts the retrieval `s` describes: lists read back or repaired are final at
    /// once; lists retrieved over every passage are retrieved `chunk` queries per pass
    /// over the passage stage, the first chunk during the pass that reads the passage
    /// list.
    pub fn open(
        store: &'a StageStore,
        s: &'a RetrievalStage<'a>,
        chunk: usize,
    ) -> Result<Self, EngineError> {
        let start = Instant::now();
        let chunk = chunk.max(1);
        let list_stage = format!("{}-passages", s.stage);
        let passages_hash = s.passages.content_hash();
        let list_key = StageKey {
            settings_hash: PASSAGE_LIST_SETTINGS.to_string(),
            input_hash: passages_hash.clone(),
        };
        let key = StageKey {
            settings_hash: s.settings_hash.clone(),
            input_hash: lists_input(&passages_hash, &s.queries_hash),
        };
        let mut report = RetrievalReport {
            stage: s.stage.clone(),
            queries: s.queries.len(),
            passages: s.passages.rows() as usize,
            ..RetrievalReport::default()
        };
        let nq = s.queries.len();
        let mut run = Self {
            store,
            s,
            key: None,
            query_ids: Vec::new(),
            passage_ids: Vec::new(),
            lists: Vec::new(),
            chunk,
            report: RetrievalReport::default(),
            start,
        };

        // Unchanged: read back.
        if store.completed(&list_stage, &list_key)?.is_some() {
            if let Some(done) = store.completed(&s.stage, &key)? {
                let (passage_ids, _) = read_passage_list(store, &list_stage)?;
                let mut lists = Vec::with_capacity(nq);
                for batch in store.read(&done.stage)? {
                    lists.extend(retrieved_from_batch(&batch?)?.into_iter().map(|(_, l)| l));
                }
                if lists.len() == nq && passage_ids.len() == report.passages {
                    report.reused = true;
                    run.passage_ids = passage_ids;
                    run.lists = lists;
                    run.report = report;
                    return Ok(run);
                }
            }
        }

        let query_ids: Vec<Identity> = (0..nq).map(|i| query_identity(s.queries.row(i))).collect();
        let last = last_version(store, s, &list_stage)?;
        // Pass 1: the new passage list, against the last version's when there is one.
        let np = report.passages;
        let max_added = (np as f64 * REPAIR_MAX_ADDED) as usize;
        let mut tracker = last.as_ref().map(|l| ChangeTracker::new(&l.passages));
        let mut added_vectors = Vec::new();
        let first = chunk.min(nq);
        let mut full = match last {
            None => Some(TopKOver::open(
                &s.sharing,
                &s.queries.values[..first * s.queries.dim],
                (s.queries.dim, s.k),
                np,
                s.threads,
            )?),
            Some(_) => None,
        };
        let mut passage_ids = Vec::with_capacity(np);
        let mut identities = Vec::with_capacity(np);
        let progress = Progress::new(&s.label, Some(np as u64), s.quiet);
        for batch in store.read(&s.passages.stage)? {
            let part = passage_part(&s.passages.stage, &batch?, s.queries)?;
            for i in 0..part.len() {
                let identity = passage_identity(&part.ids[i], part.row(i));
                identities.push(identity);
                if let Some(t) = tracker.as_mut() {
                    if t.push(identity) {
                        if t.added() > max_added {
                            tracker = None;
                            added_vectors = Vec::new();
                        } else {
                            added_vectors.extend_from_slice(part.row(i));
                        }
                    }
                }
            }
            if let Some(top) = full.as_mut() {
                top.push(&part.values)?;
            }
            progress.inc(part.len() as u64);
            passage_ids.extend(part.ids);
        }
        progress.finish();
        if store.completed(&list_stage, &list_key)?.is_none() {
            let mut writer = store.begin(&list_stage, list_key, passage_list_schema())?;
            writer.write_row_ranges(np, CHUNK_ROWS, |r| {
                Ok::<_, EngineError>(passage_list_batch(&passage_ids[r.clone()], &identities[r])?)
            })?;
            writer.finish()?;
        }
        drop(identities);
        run.query_ids = query_ids;
        run.passage_ids = passage_ids;
        run.key = Some(key);

        let change = tracker.and_then(ChangeTracker::finish);
        match (full, last, change) {
            (Some(top), _, _) => {
                report.lists_retrieved = first;
                run.lists = top.finish()?;
            }
            (None, Some(last), Some(change)) => {
                report.passages_added = change.added().len();
                report.passages_removed = change.removed();
                let mut lists = repair(
                    s,
                    &run.query_ids,
                    last,
                    &change,
                    &added_vectors,
                    &mut report,
                )?;
                // Pass 2: the queries that must be retrieved over every passage.
                let again: Vec<usize> = (0..nq).filter(|&q| lists[q].is_none()).collect();
                if !again.is_empty() {
                    let vectors: Vec<f32> = again
                        .iter()
                        .flat_map(|&q| s.queries.row(q).iter().copied())
                        .collect();
                    let found = retrieve_all(store, s, &vectors, &format!("{} (again)", s.label))?;
                    for (q, list) in again.iter().zip(found) {
                        lists[*q] = Some(list);
                    }
                }
                report.lists_retrieved = again.len();
                run.lists = lists.into_iter().map(Option::unwrap_or_default).collect();
            }
            // Every list retrieved again, a chunk per pass from the first: see
            // `advance`.
            _ => {}
        }
        run.report = report;
        Ok(run)
    }

    /// The passages' ids: what the lists' positions count.
    pub fn passage_ids(&self) -> &[String] {
        &self.passage_ids
    }

    /// The lists final so far, those of the first `final_lists().len()` queries.
    pub fn final_lists(&self) -> &[Vec<Hit>] {
        &self.lists
    }

    /// Makes the next chunk of lists final (one pass over the passage stage); false when
    /// every list already was.
    pub fn advance(&mut self) -> Result<bool, EngineError> {
        let nq = self.s.queries.len();
        let q0 = self.lists.len();
        if q0 >= nq {
            return Ok(false);
        }
        let q1 = (q0 + self.chunk).min(nq);
        let dim = self.s.queries.dim;
        let label = format!("{} (queries {}-{q1} of {nq})", self.s.label, q0 + 1);
        let found = retrieve_all(
            self.store,
            self.s,
            &self.s.queries.values[q0 * dim..q1 * dim],
            &label,
        )?;
        self.lists.extend(found);
        self.report.lists_retrieved += q1 - q0;
        Ok(true)
    }

    /// Keeps the lists in the store (unless they were read back); every list must be
    /// final ([`Self::advance`] until false).
    pub fn finish(mut self) -> Result<Retrieval, EngineError> {
        let nq = self.s.queries.len();
        if self.lists.len() != nq {
            return Err(EngineError::Dataflow(format!(
                "retrieval {}: finished with {} of {nq} lists final; this is a bug",
                self.s.stage,
                self.lists.len()
            )));
        }
        if let Some(key) = self.key.take() {
            let mut writer = self.store.begin(&self.s.stage, key, retrieved_schema())?;
            let (ids, lists) = (&self.query_ids, &self.lists);
            writer.write_row_ranges(nq, CHUNK_ROWS, |r| {
                Ok::<_, EngineError>(retrieved_batch(&ids[r.clone()], &lists[r])?)
            })?;
            writer.finish()?;
        }
        self.report.seconds = self.start.elapsed().as_secs_f64();
        Ok(Retrieval {
            passage_ids: self.passage_ids,
            lists: self.lists,
            report: self.report,
        })
    }
}

/// The last version's passage list and lists, when both are complete, its lists came
/// from its passage list, and its settings are `s`'s.
fn last_version(
    store: &StageStore,
    s: &RetrievalStage,
    list_stage: &str,
) -> Result<Option<LastVersion>, EngineError> {
    let (Some(list), Some(lists)) = (
        store.last_completed(list_stage)?,
        store.last_completed(&s.stage)?,
    ) else {
        return Ok(None);
    };
    let made_from_list = lists
        .key
        .input_hash
        .starts_with(&format!("passages {} ", list.key.input_hash));
    if lists.key.settings_hash != s.settings_hash
        || list.key.settings_hash != PASSAGE_LIST_SETTINGS
        || !made_from_list
    {
        return Ok(None);
    }
    let (_, passages) = read_passage_list(store, list_stage)?;
    let mut by_query = HashMap::new();
    for batch in store.read(&lists.stage)? {
        for (query, list) in retrieved_from_batch(&batch?)? {
            if list.iter().any(|h| h.passage as usize >= passages.len()) {
                return Ok(None);
            }
            by_query.entry(query).or_insert(list);
        }
    }
    Ok(Some(LastVersion {
        passages,
        lists: by_query,
    }))
}

/// Merges the added passages into the last version's lists. A query gets `None` when
/// it must be retrieved again in full (a new query, or its list lost a passage); a
/// query repeated in the new order takes its first occurrence's list.
fn repair(
    s: &RetrievalStage,
    query_ids: &[Identity],
    mut last: LastVersion,
    change: &crate::retrieval::repair::PassageChange,
    added_vectors: &[f32],
    report: &mut RetrievalReport,
) -> Result<Vec<Option<Vec<Hit>>>, EngineError> {
    let dim = s.queries.dim;
    let nq = query_ids.len();
    let mut lists: Vec<Option<Vec<Hit>>> = Vec::with_capacity(nq);
    let mut first_of: HashMap<Identity, usize> = HashMap::with_capacity(nq);
    let progress = Progress::new(&format!("{} (repair)", s.label), Some(nq as u64), s.quiet);
    for q0 in (0..nq).step_by(REPAIR_QUERY_CHUNK) {
        let q1 = (q0 + REPAIR_QUERY_CHUNK).min(nq);
        let mut top = TopK::new(&s.queries.values[q0 * dim..q1 * dim], dim, s.k, s.threads);
        top.push(added_vectors)?;
        for (qi, best) in (q0..q1).zip(top.finish()?) {
            let identity = query_ids[qi];
            if let Some(&first) = first_of.get(&identity) {
                lists.push(lists[first].clone());
                report.lists_repaired += usize::from(lists[qi].is_some());
                continue;
            }
            first_of.insert(identity, qi);
            let repaired = last
                .lists
                .remove(&identity)
                .and_then(|mut list| change.repair(&mut list, &best, s.k).then_some(list));
            report.lists_repaired += usize::from(repaired.is_some());
            lists.push(repaired);
        }
        progress.inc((q1 - q0) as u64);
    }
    progress.finish();
    Ok(lists)
}

/// The top-k of `queries` (row-major, `s.queries.dim` wide) over every passage of the
/// passage stage, read a part at a time; `label` names its progress line.
fn retrieve_all(
    store: &StageStore,
    s: &RetrievalStage,
    queries: &[f32],
    label: &str,
) -> Result<Vec<Vec<Hit>>, EngineError> {
    let mut top = TopKOver::open(
        &s.sharing,
        queries,
        (s.queries.dim, s.k),
        s.passages.rows() as usize,
        s.threads,
    )?;
    let progress = Progress::new(label, Some(s.passages.rows()), s.quiet);
    for batch in store.read(&s.passages.stage)? {
        let part = passage_part(&s.passages.stage, &batch?, s.queries)?;
        top.push(&part.values)?;
        progress.inc(part.len() as u64);
    }
    progress.finish();
    top.finish()
}

/// A part of the passage stage, checked to have the queries' dimension.
fn passage_part(
    stage: &str,
    batch: &arrow::record_batch::RecordBatch,
    queries: &EmbeddingMatrix,
) -> Result<EmbeddingMatrix, EngineError> {
    let mut part = EmbeddingMatrix::default();
    part.extend_from_batch(batch)?;
    if !part.is_empty() && !queries.is_empty() && part.dim != queries.dim {
        return Err(EngineError::Invalid(format!(
            "stage {stage}: {}-dimensional passages against {}-dimensional queries",
            part.dim, queries.dim
        )));
    }
    Ok(part)
}

fn read_passage_list(
    store: &StageStore,
    stage: &str,
) -> Result<(Vec<String>, Vec<Identity>), EngineError> {
    let (mut ids, mut identities) = (Vec::new(), Vec::new());
    for batch in store.read(stage)? {
        passage_list_from_batch(&batch?, &mut ids, &mut identities)?;
    }
    Ok((ids, identities))
}
