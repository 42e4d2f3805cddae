//! Hard-negative mining and teacher labelling: the pure logic between dense retrieval and
//! the `examples` table that training reads (RECIPE.md sections 3 and 4).
//!
//! Everything here is deterministic and free of I/O (except [`write_examples_jsonl`], which
//! writes to a caller's writer): the same inputs give the same outputs bit for bit,
//! whatever the thread count or the order in which another stage produced them.
//!
//! # The funnel
//!
//! 1. **Candidates** ([`select_candidates`], [`CandidateConfig`]). Per query, each
//!    retriever's top `retrieve_top` passages. A retriever's list counts only if one of the
//!    query's source passages is in its top `source_in_top`; the surviving lists are fused
//!    by reciprocal rank fusion ([`fuse`]); held-out passages are removed; the fused list
//!    is cut to `fused_top`; the query is kept only if a source passage is still in the
//!    list and the list has at least `min_candidates` passages. [`CandidateStats`] counts
//!    every drop by its reason.
//! 2. **Teacher labels** ([`label_queries`], [`TeacherConfig`]). Each kept (query,
//!    candidate) pair has a score from one or more cross-encoder teachers. Scores of
//!    several teachers are combined into one (see "Several teachers" below); a query is
//!    kept only if the combined order ranks a source passage first and its top score is
//!    not below the `min_top_score_percentile`-th percentile of the top scores; scores are
//!    normalised to `[0, 1]` with the `percentile_low`/`percentile_high` percentiles and
//!    clipped; the best `keep_top` passages remain, the first being the positive.
//!    [`TeacherStats`] counts the drops.
//! 3. **Split** ([`split_of`]). A query is `dev` iff a seeded hash of its id falls in the
//!    lowest `dev_fraction` of the hash range: a query's split never depends on which other
//!    queries exist, so adding queries leaves every earlier query where it was.
//! 4. **Examples** ([`Example`], [`examples_schema`]): one row per kept query.
//!
//! # Several teachers
//!
//! With one teacher the steps above run on its raw scores, exactly as the recipe says.
//! With several, each teacher's scores are first put on a common scale: an increasing
//! affine map fitted over all of that teacher's input scores, `(s - p_low) / (p_high -
//! p_low)` with the same percentiles as the final normalisation but without clipping. The
//! combined score of a pair is the weighted mean of these, `sum(w_t * z_t) / sum(w_t)`
//! (weights need not sum to 1; only their ratios matter). Filtering and the final
//! normalisation then run on the combined score as on a single teacher's.
//!
//! # The `examples` table
//!
//! One row per kept query; the Arrow schema ([`examples_schema`]) and the JSONL lines
//! ([`write_examples_jsonl`], one JSON object per line) use the same field names:
//!
//! | field | Arrow type | JSON | meaning |
//! |---|---|---|---|
//! | `query_id` | `utf8` | string | the query's id, unique in the table |
//! | `query_text` | `utf8` | string | the query as the student embeds it (no prefix) |
//! | `query_type` | `utf8` | string | how the query was made: a generation type (`question`, `claim`, `title`, `keywords`, `search`, `web`) or the name the user gave human queries |
//! | `source_ids` | `list<utf8>` | array of strings | the passages the query was written for (synthetic) or judged relevant (human); non-empty |
//! | `passage_ids` | `list<utf8>` | array of strings | at most `keep_top` passages in teacher order, best first; the first is the positive (one of `source_ids` when `require_source_first`) |
//! | `scores` | `list<f32>` | array of numbers | the normalised teacher score of each of `passage_ids`, in `[0, 1]`, non-increasing; same length as `passage_ids` |
//! | `split` | `utf8` | string | `train` or `dev` |
//!
//! No column is nullable and list items are never null.

pub mod bm25;
mod candidates;
mod combine;
mod examples;
mod held_out;
mod normalize;
mod rerank;
mod rrf;
mod split;
mod teacher_filter;

pub use candidates::{
    select_candidates, select_candidates_all, select_candidates_on_threads, CandidateConfig,
    CandidateDrop, CandidateList, CandidateStats, QueryRetrievals, DEFAULT_FUSED_TOP,
    DEFAULT_MIN_CANDIDATES, DEFAULT_RETRIEVE_TOP, DEFAULT_SOURCE_IN_TOP,
};
pub use combine::ScoredQuery;
pub use examples::{
    example_from_labelled, examples_from_batch, examples_schema, examples_to_batch,
    write_examples_jsonl, Example, COL_PASSAGE_IDS, COL_QUERY_ID, COL_QUERY_TEXT, COL_QUERY_TYPE,
    COL_SCORES, COL_SOURCE_IDS, COL_SPLIT,
};
pub use held_out::{held_out_passages, held_out_rank};
pub use normalize::{percentile, percentile_of_sorted, ScoreScale};
pub use rerank::rerank;
pub use rrf::{fuse, FusedHit, DEFAULT_RRF_K};
pub use split::{split_of, Split};
pub use teacher_filter::{
    label_queries, LabelledQuery, TeacherConfig, TeacherStats, DEFAULT_DEV_FRACTION,
    DEFAULT_KEEP_TOP, DEFAULT_MIN_TOP_SCORE_PERCENTILE, DEFAULT_PERCENTILE_HIGH,
    DEFAULT_PERCENTILE_LOW, DEFAULT_SPLIT_SEED,
};

/// A passage's position in the stage's passage table (the row of its embedding), as
/// retrieval returns it ([`crate::retrieval::Hit::passage`]). Ids become strings only in
/// the [`Example`]s.
pub type PassageIdx = u32;

/// What mining and labelling can fail with: settings out of range or inputs that do not
/// fit together. A query that is merely dropped is not an error; it is counted in
/// [`CandidateStats`] or [`TeacherStats`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MiningError {
    /// A setting is outside the range where it means something.
    #[error("setting `{field}`: {reason}")]
    InvalidConfig { field: &'static str, reason: String },
    /// The teacher weights are unusable (none, negative, non-finite or all zero).
    #[error("teacher weights: {0}")]
    InvalidWeights(String),
    /// A query has scores from a different number of teachers than there are weights.
    #[error("query `{query_id}`: scores from {found} teachers, {expected} weights")]
    TeacherCount {
        query_id: String,
        expected: usize,
        found: usize,
    },
    /// A teacher gave a query a different number of scores than it has candidates.
    #[error(
        "query `{query_id}`: teacher {teacher} gave {scores} scores for {candidates} candidates"
    )]
    ScoreCount {
        query_id: String,
        teacher: usize,
        candidates: usize,
        scores: usize,
    },
    /// A teacher score is NaN or infinite (a broken model or a numeric overflow).
    #[error("query `{query_id}`: teacher {teacher} scored passage {passage} as {score}")]
    NonFiniteScore {
        query_id: String,
        teacher: usize,
        passage: PassageIdx,
        score: f32,
    },
    /// A passage position outside the passage table.
    #[error("query `{query_id}`: passage {passage} is not in the table of {passages} passages")]
    UnknownPassage {
        query_id: String,
        passage: PassageIdx,
        passages: usize,
    },
}
