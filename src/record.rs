//! The records every stage agrees on: passages, queries and relevance judgements.

use std::collections::BTreeMap;

/// One passage of a corpus. `id` is opaque: it is never used to build a file path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Passage {
    pub id: String,
    pub title: String,
    pub text: String,
}

impl Passage {
    /// The text an embedder sees: BEIR's convention, `title + " " + text`, or the text
    /// alone when the title is empty.
    pub fn embedding_text(&self) -> String {
        if self.title.is_empty() {
            self.text.clone()
        } else {
            format!("{} {}", self.title, self.text)
        }
    }
}

/// One query (human or synthetic).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub id: String,
    pub text: String,
}

/// Graded relevance judgements: query id -> passage id -> grade. Grades <= 0 are
/// non-relevant, as in trec_eval. Ordered maps keep every iteration deterministic.
pub type Qrels = BTreeMap<String, BTreeMap<String, i32>>;
