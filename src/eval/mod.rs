//! BEIR evaluation with trec_eval's semantics.
//!
//! [`metrics`] scores a [`Run`] (query id -> scored passages) against [`Qrels`] with
//! nDCG@k, Recall@k, MRR@k and P@k, ranking and averaging exactly as pytrec_eval does
//! (BEIR's evaluator), so numbers are comparable with published BEIR tables; the result
//! is a [`report::EvalReport`] of per-query values and means. [`trec`]
//! writes and reads runs in the TREC format (`qid Q0 docid rank score tag`) that
//! trec_eval itself reads, ranks following the same order.
//!
//! Agreement with pytrec_eval is checked by a fixture that
//! `tests/reference/eval_reference.py` generates (`tests/fixtures/eval_reference.json`).
//!
//! [`Qrels`]: crate::record::Qrels

pub mod measure;
pub mod metrics;
pub mod report;
pub mod trec;

pub use metrics::{
    evaluate, rank, trec_order, EvalError, EvalOptions, Measure, Metric, Run, DEFAULT_MRR_K,
    DEFAULT_NDCG_K, DEFAULT_RECALL_K, RELEVANT_GRADE,
};
pub use report::{EvalReport, ReportSummary};
pub use trec::{read_run, read_run_file, write_run, write_run_file, TrecError};
