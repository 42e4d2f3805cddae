//! The teacher check: do the teachers rank better than the student they will train?
//!
//! The recipe distils the teachers' ranking into the student, so a teacher that ranks
//! worse than the student can only make it worse (the paper names the teacher as the
//! bottleneck). Before training, on every query set of the run (the synthetic held-out
//! queries, and `[eval] dataset`'s split), the base student retrieves each query's
//! top 100 and the teachers rerank them by their combined score, calibrated and weighted
//! as labelling combines them ([`crate::mining::rerank`]); both rankings are scored with
//! the set's judgements. The pairs go through each teacher's pair cache, and the base
//! student's retrieval stages are the ones the evaluation after training reads back.

use std::collections::{HashMap, HashSet};

use serde::Serialize;

use crate::config::Pipeline;
use crate::dataflow::evaluate::{
    query_sets, retrieve_set, student_models, Metrics, QuerySet, RetrievalScores,
};
use crate::dataflow::label::load::load_teacher;
use crate::dataflow::label::pair_cache::{pair_key_of, scores_through_cache};
use crate::dataflow::passage_texts_of;
use crate::error::EngineError;
use crate::eval::{evaluate, EvalOptions, Run};
use crate::generate::queries_table::GeneratedQuery;
use crate::mining::{rerank, PassageIdx, ScoredQuery, TeacherConfig};
use crate::store::memo::{MemoKey, MemoMap};
use crate::store::StageStore;

/// The base student and the teachers' reranking of its top 100 on one query set.
#[derive(Debug, Clone, Serialize)]
pub struct TeacherCheck {
    /// As [`crate::dataflow::evaluate::Evaluation::set`].
    pub set: String,
    pub label: String,
    pub queries: usize,
    pub student: Metrics,
    pub teachers: Metrics,
}

impl TeacherCheck {
    /// Whether the teachers' nDCG@10 is above the student's (what training can move it
    /// towards).
    pub fn teachers_better(&self) -> bool {
        matches!(
            (self.teachers.ndcg_at_10, self.student.ndcg_at_10),
            (Some(t), Some(s)) if t > s
        )
    }
}

/// The teacher check on every query set of the run (see the module docs); `base` is the
/// student's model directory.
pub fn check_teachers(
    pipeline: &Pipeline,
    generated: Option<&[GeneratedQuery]>,
    base: &std::path::Path,
) -> Result<Vec<TeacherCheck>, EngineError> {
    let sets = query_sets(pipeline, generated)?;
    if sets.is_empty() || pipeline.teachers.is_empty() {
        return Ok(Vec::new());
    }
    let store = StageStore::open(&pipeline.run_dir)?;
    let models = student_models(pipeline, base, None)?;
    let mut checks = Vec::new();
    for (index, set) in sets.iter().enumerate() {
        let retrieved = retrieve_set(pipeline, &store, set, index, &models[0])?;
        checks.push(check_set(pipeline, &store, set, &retrieved)?);
    }
    Ok(checks)
}

/// The teachers of `pipeline` reranking `retrieved` (a model's retrieval over `set`),
/// scored beside it; the pairs go through the teachers' caches in `store`.
pub(crate) fn check_set(
    pipeline: &Pipeline,
    store: &StageStore,
    set: &QuerySet,
    retrieved: &RetrievalScores,
) -> Result<TeacherCheck, EngineError> {
    let mut teachers = Vec::with_capacity(pipeline.teachers.len());
    for (t, settings) in pipeline.teachers.iter().enumerate() {
        teachers.push(load_teacher(pipeline, t, settings)?);
    }
    let weights: Vec<f32> = pipeline.teachers.iter().map(|t| t.weight).collect();
    let run = &retrieved.run;

    // The texts of every retrieved passage, streamed from the set's corpus.
    let wanted: HashSet<&str> = run
        .values()
        .flat_map(|list| list.iter().map(|(id, _)| id.as_str()))
        .collect();
    let read = pipeline.retrievers[0].read_options()?;
    let texts = passage_texts_of(&set.corpus, &read, &wanted)?;
    let query_text: HashMap<&str, &str> = set
        .queries
        .iter()
        .map(|q| (q.id.as_str(), q.text.as_str()))
        .collect();

    // Every (query, passage) pair of the lists, distinct, in key order.
    let mut ids: Vec<&str> = Vec::new();
    let mut place: HashMap<&str, PassageIdx> = HashMap::new();
    let mut pairs: Vec<(MemoKey, &str, &str)> = Vec::new();
    let mut lists: Vec<(&str, Vec<(PassageIdx, MemoKey)>)> = Vec::new();
    for (qid, list) in run {
        let Some(&query) = query_text.get(qid.as_str()) else {
            continue;
        };
        let query_key = MemoKey::of(query.as_bytes());
        let mut candidates = Vec::with_capacity(list.len());
        for (pid, _) in list {
            let Some(passage) = texts.get(pid) else {
                return Err(EngineError::Dataflow(format!(
                    "passage `{pid}` was retrieved but is not in {}; this is a bug",
                    set.corpus.display()
                )));
            };
            let key = pair_key_of(query_key, MemoKey::of(passage.as_bytes()));
            let next = ids.len() as PassageIdx;
            let p = *place.entry(pid.as_str()).or_insert_with(|| {
                ids.push(pid.as_str());
                next
            });
            pairs.push((key, query, passage.as_str()));
            candidates.push((p, key));
        }
        lists.push((qid.as_str(), candidates));
    }
    pairs.sort_unstable_by_key(|p| p.0);
    pairs.dedup_by_key(|p| p.0);
    let keys: Vec<MemoKey> = pairs.iter().map(|p| p.0).collect();
    let texts_of = |i: usize| (pairs[i].1, pairs[i].2);
    let mut per_teacher = Vec::with_capacity(teachers.len());
    for (t, teacher) in teachers.iter().enumerate() {
        let (scores, _) = scores_through_cache(
            store,
            pipeline,
            t,
            teacher.as_ref(),
            &keys,
            &texts_of,
            Vec::new(),
        )?;
        per_teacher.push(keys.iter().copied().zip(scores).collect::<MemoMap<f32>>());
    }

    let mut scored = Vec::with_capacity(lists.len());
    for (qid, candidates) in &lists {
        let mut scores = Vec::with_capacity(per_teacher.len());
        for cache in &per_teacher {
            let mut s = Vec::with_capacity(candidates.len());
            for (_, key) in candidates {
                s.push(*cache.get(key).ok_or_else(|| {
                    EngineError::Dataflow(format!(
                        "no teacher score for a pair of query {qid}; this is a bug"
                    ))
                })?);
            }
            scores.push(s);
        }
        scored.push(ScoredQuery {
            query_id: qid.to_string(),
            sources: Vec::new(),
            candidates: candidates.iter().map(|&(p, _)| p).collect(),
            scores,
        });
    }
    let teacher_run = teachers_run(&pipeline.teacher, &weights, &scored, &ids)?;
    let report = evaluate(&teacher_run, &set.qrels, &EvalOptions::default())
        .map_err(|e| EngineError::Invalid(e.to_string()))?;
    Ok(TeacherCheck {
        set: set.name.clone(),
        label: set.label.clone(),
        queries: set.queries.len(),
        student: Metrics::of(&retrieved.report),
        teachers: Metrics::of(&report),
    })
}

/// The run the teachers' order makes of `scored` (candidates as places in `ids`): each
/// query's candidates scored by rank, so that the evaluation, which orders by score,
/// keeps the teachers' order exactly (combined scores cast to f32 could tie).
fn teachers_run(
    config: &TeacherConfig,
    weights: &[f32],
    scored: &[ScoredQuery],
    ids: &[&str],
) -> Result<Run, EngineError> {
    let reranked =
        rerank(config, weights, scored).map_err(|e| EngineError::Invalid(e.to_string()))?;
    let mut run = Run::new();
    for (query, ranked) in scored.iter().zip(reranked) {
        let n = ranked.len();
        run.insert(
            query.query_id.clone(),
            ranked
                .into_iter()
                .enumerate()
                .map(|(rank, (p, _))| (ids[p as usize].to_string(), (n - rank) as f32))
                .collect(),
        );
    }
    Ok(run)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is its job
mod tests {
    use super::*;
    use crate::record::Qrels;

    #[test]
    fn the_teachers_order_is_what_the_metrics_score() {
        // Two queries, three candidates each in the retriever's order; one teacher.
        // q1: the relevant passage `b` is the retriever's second, the teacher's first:
        //     nDCG@10 = 1, MRR@10 = 1.
        // q2: the relevant passage `d` is the retriever's first, the teacher's third:
        //     nDCG@10 = 1 / log2(4) = 0.5, MRR@10 = 1/3.
        let ids = ["a", "b", "c", "d", "e"];
        let scored = [
            ScoredQuery {
                query_id: "q1".into(),
                sources: Vec::new(),
                candidates: vec![0, 1, 2],
                scores: vec![vec![0.2, 0.9, 0.1]],
            },
            ScoredQuery {
                query_id: "q2".into(),
                sources: Vec::new(),
                candidates: vec![3, 4, 0],
                scores: vec![vec![-1.0, 3.0, 2.0]],
            },
        ];
        let run = teachers_run(&TeacherConfig::default(), &[1.0], &scored, &ids).unwrap();
        let order = |q: &str| -> Vec<&str> { run[q].iter().map(|(p, _)| p.as_str()).collect() };
        assert_eq!(order("q1"), ["b", "a", "c"]);
        assert_eq!(order("q2"), ["e", "a", "d"]);
        let mut qrels = Qrels::new();
        qrels.entry("q1".into()).or_default().insert("b".into(), 1);
        qrels.entry("q2".into()).or_default().insert("d".into(), 1);
        let report = evaluate(&run, &qrels, &EvalOptions::default()).unwrap();
        let ndcg = report.ndcg_at(10).unwrap();
        assert!((ndcg - (1.0 + 0.5) / 2.0).abs() < 1e-12, "{ndcg}");
        let mrr = report.mrr_at(10).unwrap();
        assert!((mrr - (1.0 + 1.0 / 3.0) / 2.0).abs() < 1e-12, "{mrr}");
    }
}
