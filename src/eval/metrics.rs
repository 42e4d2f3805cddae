//! nDCG@k, Recall@k, MRR@k and P@k with trec_eval's semantics (as pytrec_eval, and so
//! BEIR, computes them).
//!
//! Contracts, each checked against pytrec_eval 0.5 (`tests/reference/eval_reference.py`):
//! - **Ranking.** A query's results are ranked by score, highest first; equal scores are
//!   ordered by passage id in *decreasing* byte order (trec_eval's `comp_sim_docno`), so
//!   with equal scores `d9` ranks above `d10`. The order of the results in the [`Run`]
//!   does not matter. A NaN score ranks below every number.
//! - **Grades.** A passage missing from a query's judgements has grade 0. nDCG uses the
//!   grade itself as gain (linear gain) and grades <= 0 add nothing; the discount at
//!   1-based rank r is log2(r + 1); the ideal DCG@k takes the query's positive grades,
//!   sorted descending, cut at k. Recall, MRR and precision count a passage as relevant
//!   when its grade is >= [`RELEVANT_GRADE`] (trec_eval's default relevance level).
//! - **Which queries count.** A query is evaluated when it is a key of the run (even with
//!   no results left) and has at least one judgement in the qrels. Judged queries missing
//!   from the run, and run queries without judgements, are skipped, not scored 0; the
//!   report counts both so an id mismatch is visible. A judged query with no relevant
//!   passage scores 0 on every measure and is averaged in. Means are plain averages over
//!   the evaluated queries (0 when there are none).
//! - **MRR@k** is trec_eval's `recip_rank` restricted to the top k: 1/r for the first
//!   relevant rank r <= k, else 0. (BEIR's own MRR divides by the number of judged
//!   queries and breaks ties by run order; we keep trec_eval's rules throughout.)
//! - **Identical ids.** With `ignore_identical_ids`, results whose passage id equals the
//!   query id are dropped before ranking, as BEIR does for corpora that contain their
//!   queries (ArguAna, Quora).
//! - **Duplicates.** A passage listed twice for one evaluated query is an error, as it is
//!   in trec_eval.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

pub use super::measure::{Measure, Metric};
use super::report::EvalReport;
use crate::record::Qrels;

/// Retrieval results: query id -> (passage id, score), in any order.
pub type Run = BTreeMap<String, Vec<(String, f32)>>;

/// Lowest grade that counts as relevant for recall, MRR and precision: trec_eval's
/// default `relevance_level`, which pytrec_eval and BEIR keep.
pub const RELEVANT_GRADE: i32 = 1;
/// nDCG@10 is BEIR's headline measure.
pub const DEFAULT_NDCG_K: usize = 10;
/// BEIR reports Recall@100 next to nDCG@10: what a re-ranker could still recover.
pub const DEFAULT_RECALL_K: usize = 100;
/// MRR@10 is MS MARCO's official passage-ranking measure.
pub const DEFAULT_MRR_K: usize = 10;

/// Problems that stop an evaluation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EvalError {
    /// A cutoff of 0 was asked for; trec_eval's cutoffs are positive.
    #[error("{metric:?} cutoff must be at least 1, got 0")]
    ZeroCutoff { metric: Metric },
    /// One evaluated query lists the same passage twice; trec_eval refuses such a run.
    #[error("query `{query}` lists passage `{passage}` more than once")]
    DuplicatePassage { query: String, passage: String },
}

/// What to measure. Defaults: nDCG@10, Recall@100, MRR@10, identical ids ignored (BEIR's
/// default).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalOptions {
    /// Cutoffs for nDCG.
    pub ndcg_at: Vec<usize>,
    /// Cutoffs for recall.
    pub recall_at: Vec<usize>,
    /// Cutoffs for MRR.
    pub mrr_at: Vec<usize>,
    /// Cutoffs for precision (none by default).
    pub precision_at: Vec<usize>,
    /// Drop results whose passage id equals the query id before ranking.
    pub ignore_identical_ids: bool,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            ndcg_at: vec![DEFAULT_NDCG_K],
            recall_at: vec![DEFAULT_RECALL_K],
            mrr_at: vec![DEFAULT_MRR_K],
            precision_at: Vec::new(),
            ignore_identical_ids: true,
        }
    }
}

impl EvalOptions {
    /// The requested measures, sorted (nDCG, recall, MRR, precision; k ascending) and
    /// without repeats.
    pub fn measures(&self) -> Result<Vec<Measure>, EvalError> {
        let families = [
            (Metric::Ndcg, &self.ndcg_at),
            (Metric::Recall, &self.recall_at),
            (Metric::Mrr, &self.mrr_at),
            (Metric::Precision, &self.precision_at),
        ];
        let mut measures = BTreeSet::new();
        for (metric, cutoffs) in families {
            for &k in cutoffs {
                if k == 0 {
                    return Err(EvalError::ZeroCutoff { metric });
                }
                measures.insert(Measure { metric, k });
            }
        }
        Ok(measures.into_iter().collect())
    }
}

/// trec_eval's result order: score descending, then passage id descending (bytes).
pub fn trec_order(a: (&str, f32), b: (&str, f32)) -> Ordering {
    let by_score = match (a.1.is_nan(), b.1.is_nan()) {
        (false, false) => b.1.partial_cmp(&a.1).unwrap_or(Ordering::Equal),
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        (true, true) => Ordering::Equal,
    };
    by_score.then_with(|| b.0.cmp(a.0))
}

/// One query's results in trec_eval's rank order (rank 1 first).
pub fn rank(results: &[(String, f32)]) -> Vec<(&str, f32)> {
    let mut ranked: Vec<(&str, f32)> = results.iter().map(|(p, s)| (p.as_str(), *s)).collect();
    ranked.sort_by(|a, b| trec_order(*a, *b));
    ranked
}

/// One query's ranking as the metrics see it.
struct RankedGrades {
    /// Grade of the passage at each rank (rank 1 first); 0 when unjudged.
    grades: Vec<i32>,
    /// The query's positive grades, descending: the ideal ranking's gains.
    ideal: Vec<i32>,
    /// Judged passages with grade >= RELEVANT_GRADE.
    relevant: usize,
}

impl RankedGrades {
    fn new(ranked: &[(&str, f32)], judged: &BTreeMap<String, i32>) -> Self {
        let grades = ranked
            .iter()
            .map(|(p, _)| judged.get(*p).copied().unwrap_or(0))
            .collect();
        let mut ideal: Vec<i32> = judged.values().copied().filter(|g| *g > 0).collect();
        ideal.sort_unstable_by(|a, b| b.cmp(a));
        let relevant = judged.values().filter(|g| **g >= RELEVANT_GRADE).count();
        RankedGrades {
            grades,
            ideal,
            relevant,
        }
    }

    fn value(&self, measure: Measure) -> f64 {
        let k = measure.k;
        match measure.metric {
            Metric::Ndcg => {
                let ideal = dcg(&self.ideal, k);
                if ideal > 0.0 {
                    dcg(&self.grades, k) / ideal
                } else {
                    0.0
                }
            }
            Metric::Recall if self.relevant == 0 => 0.0,
            Metric::Recall => self.relevant_in_top(k) as f64 / self.relevant as f64,
            Metric::Precision => self.relevant_in_top(k) as f64 / k as f64,
            Metric::Mrr => self
                .grades
                .iter()
                .take(k)
                .position(|g| *g >= RELEVANT_GRADE)
                .map_or(0.0, |i| 1.0 / (i + 1) as f64),
        }
    }

    fn relevant_in_top(&self, k: usize) -> usize {
        self.grades
            .iter()
            .take(k)
            .filter(|g| **g >= RELEVANT_GRADE)
            .count()
    }
}

/// DCG@k of gains listed rank 1 first: sum of gain / log2(rank + 1) over positive gains,
/// summed in rank order as trec_eval does.
fn dcg(gains: &[i32], k: usize) -> f64 {
    gains
        .iter()
        .take(k)
        .enumerate()
        .filter(|(_, g)| **g > 0)
        .map(|(i, g)| f64::from(*g) / ((i + 2) as f64).log2())
        .sum()
}

/// Scores `run` against `qrels` (see the module docs for the exact rules).
pub fn evaluate(run: &Run, qrels: &Qrels, opts: &EvalOptions) -> Result<EvalReport, EvalError> {
    let measures = opts.measures()?;
    let mut per_query = BTreeMap::new();
    let mut unjudged_queries = 0;
    for (query, results) in run {
        let judged = match qrels.get(query) {
            Some(judged) if !judged.is_empty() => judged,
            _ => {
                unjudged_queries += 1;
                continue;
            }
        };
        let mut kept: Vec<(&str, f32)> = results
            .iter()
            .filter(|(p, _)| !(opts.ignore_identical_ids && p == query))
            .map(|(p, s)| (p.as_str(), *s))
            .collect();
        let mut seen = BTreeSet::new();
        if let Some((dup, _)) = kept.iter().find(|(p, _)| !seen.insert(*p)) {
            return Err(EvalError::DuplicatePassage {
                query: query.clone(),
                passage: (*dup).to_owned(),
            });
        }
        kept.sort_by(|a, b| trec_order(*a, *b));
        let grades = RankedGrades::new(&kept, judged);
        let values = measures.iter().map(|m| grades.value(*m)).collect();
        per_query.insert(query.clone(), values);
    }
    let unanswered_queries = qrels
        .iter()
        .filter(|(q, judged)| !judged.is_empty() && !run.contains_key(*q))
        .count();
    Ok(EvalReport::new(
        measures,
        per_query,
        unjudged_queries,
        unanswered_queries,
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is its job
mod tests {
    use super::*;

    fn run(entries: &[(&str, &[(&str, f32)])]) -> Run {
        entries
            .iter()
            .map(|(q, rs)| {
                let rs = rs.iter().map(|(p, s)| (p.to_string(), *s)).collect();
                (q.to_string(), rs)
            })
            .collect()
    }

    fn qrels(entries: &[(&str, &[(&str, i32)])]) -> Qrels {
        entries
            .iter()
            .map(|(q, js)| {
                let js = js.iter().map(|(p, g)| (p.to_string(), *g)).collect();
                (q.to_string(), js)
            })
            .collect()
    }

    fn opts(ndcg: &[usize], recall: &[usize], mrr: &[usize], precision: &[usize]) -> EvalOptions {
        EvalOptions {
            ndcg_at: ndcg.to_vec(),
            recall_at: recall.to_vec(),
            mrr_at: mrr.to_vec(),
            precision_at: precision.to_vec(),
            ignore_identical_ids: false,
        }
    }

    fn close(got: Option<f64>, want: f64) {
        let got = got.unwrap();
        assert!((got - want).abs() < 1e-12, "got {got}, want {want}");
    }

    #[test]
    fn ties_break_by_passage_id_descending_bytes() {
        let results: Vec<(String, f32)> = [
            ("d10", 1.0),
            ("n", f32::NAN),
            ("d9", 1.0),
            ("D9", 1.0),
            ("é", 1.0),
            ("x", 2.0),
        ]
        .iter()
        .map(|(p, s)| (p.to_string(), *s))
        .collect();
        let order: Vec<&str> = rank(&results).into_iter().map(|(p, _)| p).collect();
        // Bytes: "é" (0xC3..) > "d9" > "d10" > "D9"; NaN ranks last.
        assert_eq!(order, ["x", "é", "d9", "d10", "D9", "n"]);
    }

    #[test]
    fn graded_relevance_with_ties_and_a_relevant_passage_past_the_cutoff() {
        // Ranking: b and c tie at 0.9, c first (c > b), so
        //   rank 1 c (grade 0), 2 b (1), 3 d (unjudged), 4 a (2), 5 e (1).
        let run = run(&[(
            "q",
            &[("a", 0.5), ("b", 0.9), ("c", 0.9), ("d", 0.7), ("e", 0.1)],
        )]);
        let qrels = qrels(&[("q", &[("a", 2), ("b", 1), ("c", 0), ("e", 1)])]);
        let report = evaluate(&run, &qrels, &opts(&[1, 3, 5], &[3, 5], &[1, 3], &[3, 10])).unwrap();
        let l3 = 3f64.log2();
        // Ideal gains 2, 1, 1: IDCG@3 = IDCG@5 = 2 + 1/log2(3) + 1/log2(4).
        let ideal = 2.0 + 1.0 / l3 + 0.5;
        // nDCG@1: rank 1 has grade 0.
        close(report.ndcg_at(1), 0.0);
        // nDCG@3: only b, 1/log2(3); a (grade 2) sits at rank 4, past the cutoff.
        close(report.ndcg_at(3), (1.0 / l3) / ideal);
        // nDCG@5: 1/log2(3) + 2/log2(5) + 1/log2(6).
        close(
            report.ndcg_at(5),
            (1.0 / l3 + 2.0 / 5f64.log2() + 1.0 / 6f64.log2()) / ideal,
        );
        // Relevant: a, b, e. Top 3 holds b only; top 5 holds all three.
        close(report.recall_at(3), 1.0 / 3.0);
        close(report.recall_at(5), 1.0);
        // First relevant at rank 2.
        close(report.mrr_at(1), 0.0);
        close(report.mrr_at(3), 0.5);
        // P@10 divides by 10 though only 5 were retrieved.
        close(report.precision_at(3), 1.0 / 3.0);
        close(report.precision_at(10), 3.0 / 10.0);
    }

    #[test]
    fn nothing_relevant_retrieved_scores_zero_and_is_averaged_in() {
        let run = run(&[
            ("miss", &[("x", 1.0), ("y", 0.5)]),
            ("nonrel", &[("x", 1.0)]),
            ("hit", &[("r", 1.0)]),
        ]);
        let qrels = qrels(&[
            ("miss", &[("r", 1)]),
            ("nonrel", &[("x", 0)]),
            ("hit", &[("r", 1)]),
        ]);
        let report = evaluate(&run, &qrels, &opts(&[10], &[10], &[10], &[])).unwrap();
        for q in ["miss", "nonrel"] {
            for m in report.measures() {
                assert_eq!(report.query_value(q, *m), Some(0.0), "{q} {m}");
            }
        }
        // (0 + 0 + 1) / 3 on every measure.
        assert_eq!(report.query_count(), 3);
        close(report.ndcg_at(10), 1.0 / 3.0);
        close(report.recall_at(10), 1.0 / 3.0);
        close(report.mrr_at(10), 1.0 / 3.0);
    }

    #[test]
    fn negative_grades_give_no_gain() {
        // n (grade -1) at rank 1 adds nothing; o at rank 2 gives 1/log2(3); ideal is 1.
        let run = run(&[("q", &[("n", 2.0), ("o", 1.0)])]);
        let qrels = qrels(&[("q", &[("n", -1), ("o", 1)])]);
        let report = evaluate(&run, &qrels, &opts(&[1, 2], &[], &[], &[])).unwrap();
        close(report.ndcg_at(1), 0.0);
        close(report.ndcg_at(2), 1.0 / 3f64.log2());
    }

    #[test]
    fn identical_ids_are_dropped_before_ranking_when_asked() {
        let run = run(&[("q1", &[("q1", 0.9), ("p", 0.8)])]);
        let qrels = qrels(&[("q1", &[("q1", 1), ("p", 1)])]);
        let mut options = opts(&[10], &[], &[1], &[]);
        // Kept: q1 at rank 1, p at rank 2 -- the ideal ranking.
        let kept = evaluate(&run, &qrels, &options).unwrap();
        close(kept.ndcg_at(10), 1.0);
        close(kept.mrr_at(1), 1.0);
        // Dropped: p moves to rank 1, DCG 1; the judgement of q1 still counts in the
        // ideal, 1 + 1/log2(3).
        options.ignore_identical_ids = true;
        let dropped = evaluate(&run, &qrels, &options).unwrap();
        close(dropped.ndcg_at(10), 1.0 / (1.0 + 1.0 / 3f64.log2()));
        close(dropped.mrr_at(1), 1.0);
    }

    #[test]
    fn which_queries_are_averaged() {
        let run = run(&[
            ("empty", &[]),
            ("hit", &[("r", 1.0)]),
            ("unjudged", &[("r", 1.0)]),
            ("no_judgements", &[("r", 1.0)]),
        ]);
        let qrels = qrels(&[
            ("empty", &[("r", 1)]),
            ("hit", &[("r", 1)]),
            ("unanswered", &[("r", 1)]),
            ("no_judgements", &[]),
        ]);
        let report = evaluate(&run, &qrels, &EvalOptions::default()).unwrap();
        // A run key with no results still counts (as zeros), as in pytrec_eval.
        assert_eq!(report.query_ids().collect::<Vec<_>>(), ["empty", "hit"]);
        assert_eq!(report.unjudged_queries(), 2);
        assert_eq!(report.unanswered_queries(), 1);
        close(report.ndcg_at(10), 0.5);
        close(report.recall_at(100), 0.5);
        close(report.mrr_at(10), 0.5);
    }

    #[test]
    fn empty_run_gives_zero_means_over_zero_queries() {
        let qrels = qrels(&[("q", &[("r", 1)])]);
        let report = evaluate(&Run::new(), &qrels, &EvalOptions::default()).unwrap();
        assert_eq!(report.query_count(), 0);
        assert_eq!(report.unanswered_queries(), 1);
        assert_eq!(report.ndcg_at(10), Some(0.0));
        assert_eq!(report.ndcg_at(5), None);
    }

    #[test]
    fn options_validate_and_order_measures() {
        let defaults = EvalOptions::default().measures().unwrap();
        let keys: Vec<String> = defaults.iter().map(Measure::key).collect();
        assert_eq!(keys, ["ndcg_at_10", "recall_at_100", "mrr_at_10"]);
        let repeated = opts(&[10, 1, 10], &[], &[], &[5]).measures().unwrap();
        let keys: Vec<String> = repeated.iter().map(Measure::key).collect();
        assert_eq!(keys, ["ndcg_at_1", "ndcg_at_10", "precision_at_5"]);
        let err = opts(&[], &[0], &[], &[]).measures().unwrap_err();
        assert_eq!(err.to_string(), "Recall cutoff must be at least 1, got 0");
        let parsed: EvalOptions = serde_json::from_str(r#"{"ndcg_at": [3]}"#).unwrap();
        assert_eq!(parsed.ndcg_at, [3]);
        assert_eq!(parsed.recall_at, [DEFAULT_RECALL_K]);
        assert!(parsed.ignore_identical_ids);
    }

    #[test]
    fn duplicate_passage_is_an_error() {
        let run = run(&[("q", &[("p", 1.0), ("r", 0.5), ("p", 0.2)])]);
        let qrels = qrels(&[("q", &[("p", 1)])]);
        let err = evaluate(&run, &qrels, &EvalOptions::default()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "query `q` lists passage `p` more than once"
        );
    }

    /// `tests/fixtures/eval_reference.json`, written by
    /// `tests/reference/eval_reference.py` from pytrec_eval's output.
    #[derive(Deserialize)]
    struct ReferenceFixture {
        cases: Vec<ReferenceCase>,
    }

    /// One run and qrels with pytrec_eval's values for them.
    #[derive(Deserialize)]
    struct ReferenceCase {
        name: String,
        options: EvalOptions,
        run: Run,
        qrels: Qrels,
        /// Query -> measure key -> value.
        expected: BTreeMap<String, BTreeMap<String, f64>>,
        /// Measure key -> mean over the evaluated queries.
        expected_mean: BTreeMap<String, f64>,
    }

    #[test]
    fn agrees_with_pytrec_eval() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/eval_reference.json"
        );
        let text = std::fs::read_to_string(path).unwrap();
        let fixture: ReferenceFixture = serde_json::from_str(&text).unwrap();
        assert!(fixture.cases.len() >= 3);
        for case in &fixture.cases {
            let report = evaluate(&case.run, &case.qrels, &case.options).unwrap();
            let queries: Vec<&str> = report.query_ids().collect();
            let expected: Vec<&str> = case.expected.keys().map(String::as_str).collect();
            assert_eq!(queries, expected, "{}", case.name);
            let measure = |key: &str| {
                let found = report.measures().iter().find(|m| m.key() == key);
                *found.unwrap_or_else(|| panic!("{}: no measure {key}", case.name))
            };
            for (query, values) in &case.expected {
                for (key, want) in values {
                    let got = report.query_value(query, measure(key)).unwrap();
                    assert!(
                        (got - want).abs() < 1e-9,
                        "{} {query} {key}: got {got}, pytrec_eval {want}",
                        case.name
                    );
                }
            }
            assert_eq!(case.expected_mean.len(), report.measures().len());
            for (key, want) in &case.expected_mean {
                let got = report.mean(measure(key)).unwrap();
                assert!((got - want).abs() < 1e-9, "{} mean {key}", case.name);
            }
        }
    }
}
