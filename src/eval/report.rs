//! The result of an evaluation: per-query values and their means, with accessors by
//! measure and a JSON form.
//!
//! JSON (via serde): `{"ndcg_at_10": mean, .., "queries": n, "unjudged_queries": n,
//! "unanswered_queries": n, "per_query": {qid: {"ndcg_at_10": value, ..}}}`, measures in
//! report order (nDCG, recall, MRR, precision; k ascending). [`EvalReport::summary`]
//! gives the same without `per_query`, for a compact `--json` line.

use std::collections::BTreeMap;

use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};

use super::measure::{Measure, Metric};

/// Per-query values and means of a set of measures.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalReport {
    measures: Vec<Measure>,
    means: Vec<f64>,
    /// Query id -> one value per measure, in `measures` order.
    per_query: BTreeMap<String, Vec<f64>>,
    unjudged_queries: usize,
    unanswered_queries: usize,
}

impl EvalReport {
    /// The measures, in report order.
    pub fn measures(&self) -> &[Measure] {
        &self.measures
    }

    /// Mean of `measure` over the evaluated queries; `None` if it was not requested.
    pub fn mean(&self, measure: Measure) -> Option<f64> {
        let i = self.measures.iter().position(|m| *m == measure)?;
        self.means.get(i).copied()
    }

    /// Mean nDCG@k, if requested.
    pub fn ndcg_at(&self, k: usize) -> Option<f64> {
        self.mean(Measure {
            metric: Metric::Ndcg,
            k,
        })
    }

    /// Mean Recall@k, if requested.
    pub fn recall_at(&self, k: usize) -> Option<f64> {
        self.mean(Measure {
            metric: Metric::Recall,
            k,
        })
    }

    /// Mean MRR@k, if requested.
    pub fn mrr_at(&self, k: usize) -> Option<f64> {
        self.mean(Measure {
            metric: Metric::Mrr,
            k,
        })
    }

    /// Mean P@k, if requested.
    pub fn precision_at(&self, k: usize) -> Option<f64> {
        self.mean(Measure {
            metric: Metric::Precision,
            k,
        })
    }

    /// `measure` for one query; `None` if the query was not evaluated or the measure not
    /// requested.
    pub fn query_value(&self, query: &str, measure: Measure) -> Option<f64> {
        let i = self.measures.iter().position(|m| *m == measure)?;
        self.per_query.get(query)?.get(i).copied()
    }

    /// Ids of the evaluated queries, sorted.
    pub fn query_ids(&self) -> impl Iterator<Item = &str> {
        self.per_query.keys().map(String::as_str)
    }

    /// How many queries the means average over.
    pub fn query_count(&self) -> usize {
        self.per_query.len()
    }

    /// Run queries skipped because the qrels judge nothing for them.
    pub fn unjudged_queries(&self) -> usize {
        self.unjudged_queries
    }

    /// Judged queries skipped because the run has no entry for them.
    pub fn unanswered_queries(&self) -> usize {
        self.unanswered_queries
    }

    /// Builds a report from per-query values listed in `measures` order.
    pub(super) fn new(
        measures: Vec<Measure>,
        per_query: BTreeMap<String, Vec<f64>>,
        unjudged_queries: usize,
        unanswered_queries: usize,
    ) -> Self {
        let n = per_query.len();
        let means = (0..measures.len())
            .map(|i| {
                if n == 0 {
                    return 0.0;
                }
                let total: f64 = per_query.values().filter_map(|v| v.get(i)).sum();
                total / n as f64
            })
            .collect();
        EvalReport {
            measures,
            means,
            per_query,
            unjudged_queries,
            unanswered_queries,
        }
    }

    /// A view that serialises the means and counts only, without per-query values.
    pub fn summary(&self) -> ReportSummary<'_> {
        ReportSummary(self)
    }

    fn serialize_summary<M: SerializeMap>(&self, map: &mut M) -> Result<(), M::Error> {
        for (measure, mean) in self.measures.iter().zip(&self.means) {
            map.serialize_entry(&measure.key(), mean)?;
        }
        map.serialize_entry("queries", &self.query_count())?;
        map.serialize_entry("unjudged_queries", &self.unjudged_queries)?;
        map.serialize_entry("unanswered_queries", &self.unanswered_queries)
    }
}

/// Serialises as `{"ndcg_at_10": .., .., "queries": n, "unjudged_queries": n,
/// "unanswered_queries": n, "per_query": {qid: {"ndcg_at_10": .., ..}}}`.
impl Serialize for EvalReport {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        self.serialize_summary(&mut map)?;
        let per_query: BTreeMap<&str, QueryValues<'_>> = self
            .per_query
            .iter()
            .map(|(q, values)| (q.as_str(), QueryValues(&self.measures, values)))
            .collect();
        map.serialize_entry("per_query", &per_query)?;
        map.end()
    }
}

/// An [`EvalReport`] serialised without its per-query values (see [`EvalReport::summary`]).
#[derive(Debug, Clone, Copy)]
pub struct ReportSummary<'a>(&'a EvalReport);

impl Serialize for ReportSummary<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        self.0.serialize_summary(&mut map)?;
        map.end()
    }
}

/// One query's values keyed by measure.
struct QueryValues<'a>(&'a [Measure], &'a [f64]);

impl Serialize for QueryValues<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (measure, value) in self.0.iter().zip(self.1) {
            map.serialize_entry(&measure.key(), value)?;
        }
        map.end()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is its job
mod tests {
    use super::super::metrics::{evaluate, EvalOptions};
    use crate::record::Qrels;

    #[test]
    fn serialises_means_counts_and_per_query_values() {
        // a at rank 1, judged 1: every measure is 1 except P@2 = 1/2.
        let run = [("q".to_string(), vec![("a".to_string(), 1.0)])].into();
        let judged = [("a".to_string(), 1)].into();
        let qrels: Qrels = [("q".to_string(), judged)].into();
        let options = EvalOptions {
            ndcg_at: vec![10],
            recall_at: vec![],
            mrr_at: vec![10],
            precision_at: vec![2],
            ignore_identical_ids: false,
        };
        let report = evaluate(&run, &qrels, &options).unwrap();
        let summary = serde_json::to_string(&report.summary()).unwrap();
        assert_eq!(
            summary,
            r#"{"ndcg_at_10":1.0,"mrr_at_10":1.0,"precision_at_2":0.5,"queries":1,"unjudged_queries":0,"unanswered_queries":0}"#
        );
        let full = serde_json::to_value(&report).unwrap();
        assert_eq!(full["per_query"]["q"]["precision_at_2"], 0.5);
        assert_eq!(full["ndcg_at_10"], 1.0);
    }
}
