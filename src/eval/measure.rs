//! What an evaluation measures: a metric family ([`Metric`]) at a cutoff ([`Measure`]),
//! and the report keys they are written under (`ndcg_at_10`). A leaf: the metrics that
//! compute them and the report that holds them both read it.

use std::fmt;

/// A measure family; combined with a cutoff in [`Measure`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Metric {
    /// Normalised discounted cumulative gain (trec_eval `ndcg_cut`).
    Ndcg,
    /// Relevant passages in the top k over all relevant passages (trec_eval `recall`).
    Recall,
    /// Reciprocal rank of the first relevant passage within the top k.
    Mrr,
    /// Relevant passages in the top k over k (trec_eval `P`).
    Precision,
}

impl Metric {
    /// The prefix of this metric's report keys (`ndcg` in `ndcg_at_10`).
    pub fn name(self) -> &'static str {
        match self {
            Metric::Ndcg => "ndcg",
            Metric::Recall => "recall",
            Metric::Mrr => "mrr",
            Metric::Precision => "precision",
        }
    }
}

/// One metric at one cutoff, e.g. nDCG@10.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Measure {
    pub metric: Metric,
    /// The cutoff: only the top `k` ranks count. Always >= 1 in a report.
    pub k: usize,
}

impl Measure {
    /// The report key, e.g. `ndcg_at_10`.
    pub fn key(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Measure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}_at_{}", self.metric.name(), self.k)
    }
}
