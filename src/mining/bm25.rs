//! Okapi BM25: a lexical relevance score of a query against a passage, with the
//! collection statistics (document frequencies, average length) of a whole corpus.
//!
//! Contract:
//! - **Tokens.** A text is split on every character that is not alphanumeric
//!   (`char::is_alphanumeric`, so Unicode letters and digits of any script are kept), and
//!   each piece is lower-cased with Unicode's full mapping (`str::to_lowercase`). No
//!   stemming and no stopwords: the scorer is language-neutral and has no word lists to
//!   keep; stopwords get an idf near zero anyway. (Anserini's defaults add Porter
//!   stemming and an English stopword list, so its scores differ.)
//! - **idf** is Lucene's: `ln(1 + (N - df + 0.5) / (df + 0.5))`, `N` the documents in
//!   the corpus and `df` those containing the term; always positive.
//! - **Score** of query `q` against passage `d` of `dl` tokens, summed over the tokens
//!   `t` of `q`: `idf(t) * tf(t, d) * (k1 + 1) / (tf(t, d) + k1 * (1 - b + b * dl /
//!   avgdl))`, with `avgdl` the corpus's mean length. A query token that occurs twice counts twice (as Anserini's
//!   bag-of-words query weights a term by its count). Lucene since 8.0 leaves out the
//!   constant factor `k1 + 1`, which scales every score alike and so changes neither a
//!   ranking nor a percentile calibration; it also rounds document lengths to one byte,
//!   which we do not.
//! - A query with no tokens, or whose tokens are not in the passage, scores 0.
//!
//! [`Bm25Stats`] is built by one pass over the corpus ([`Bm25Stats::add_document`] per
//! passage) and holds only a term -> document frequency map, never the passages.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

/// Term-frequency saturation; Anserini's default for BM25 (Lucene's is 1.2).
pub const DEFAULT_K1: f64 = 0.9;
/// Document-length normalisation (0: none, 1: full); Anserini's default (Lucene's 0.75).
pub const DEFAULT_B: f64 = 0.4;

/// BM25's two free parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Bm25Params {
    pub k1: f64,
    pub b: f64,
}

impl Default for Bm25Params {
    fn default() -> Self {
        Self {
            k1: DEFAULT_K1,
            b: DEFAULT_B,
        }
    }
}

impl Bm25Params {
    /// `k1` finite and non-negative, `b` in [0, 1]; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.k1.is_finite() && self.k1 >= 0.0) {
            return Err(format!("k1 must be finite and >= 0, found {}", self.k1));
        }
        if !(0.0..=1.0).contains(&self.b) {
            return Err(format!("b must be in [0, 1], found {}", self.b));
        }
        Ok(())
    }
}

/// The tokens of `text`, in order (see the module docs).
pub fn tokens(text: &str) -> impl Iterator<Item = String> + '_ {
    raw_tokens(text).map(str::to_lowercase)
}

/// The tokens of `text` before lowercasing, in order: what [`tokens`] lowercases.
pub fn raw_tokens(text: &str) -> impl Iterator<Item = &str> + '_ {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|t| !t.is_empty())
}

/// Collection statistics of a corpus: how many documents, their total length in tokens,
/// and each term's document frequency.
#[derive(Debug, Clone, Default)]
pub struct Bm25Stats {
    df: HashMap<String, u64>,
    documents: u64,
    total_tokens: u64,
}

impl Bm25Stats {
    /// Counts one document of the corpus.
    pub fn add_document(&mut self, text: &str) {
        let mut distinct = HashSet::new();
        for t in tokens(text) {
            self.total_tokens += 1;
            distinct.insert(t);
        }
        for t in distinct {
            *self.df.entry(t).or_insert(0) += 1;
        }
        self.documents += 1;
    }

    /// Documents counted.
    pub fn documents(&self) -> u64 {
        self.documents
    }

    /// Distinct terms of the corpus.
    pub fn vocabulary(&self) -> usize {
        self.df.len()
    }

    /// Mean document length in tokens (0 for an empty corpus).
    pub fn average_length(&self) -> f64 {
        if self.documents == 0 {
            0.0
        } else {
            self.total_tokens as f64 / self.documents as f64
        }
    }

    /// Documents containing `term` (a token, already lower-cased).
    pub fn document_frequency(&self, term: &str) -> u64 {
        self.df.get(term).copied().unwrap_or(0)
    }

    /// Lucene's idf of `term`.
    pub fn idf(&self, term: &str) -> f64 {
        let n = self.documents as f64;
        let df = self.document_frequency(term) as f64;
        (1.0 + (n - df + 0.5) / (df + 0.5)).ln()
    }

    /// BM25 of `query` against `passage`.
    pub fn score(&self, params: Bm25Params, query: &str, passage: &str) -> f64 {
        let query: Vec<String> = tokens(query).collect();
        self.score_terms(params, &query, &PassageTerms::of(passage))
    }

    /// BM25 of a query, as its tokens in order, against a passage's term counts: the
    /// same bits as [`Self::score`] of the texts, for a scorer that counts a passage's
    /// terms once for all the queries paired with it.
    pub fn score_terms(&self, params: Bm25Params, query: &[String], passage: &PassageTerms) -> f64 {
        let avgdl = self.average_length();
        // A passage of a corpus whose documents are all empty has no tokens either, so
        // the ratio never matters then; 1 keeps it finite.
        let relative_length = if avgdl > 0.0 {
            passage.length as f64 / avgdl
        } else {
            1.0
        };
        let saturation = params.k1 * (1.0 - params.b + params.b * relative_length);
        let mut score = 0.0;
        for t in query {
            let Some(&f) = passage.tf.get(t) else {
                continue;
            };
            let f = f64::from(f);
            score += self.idf(t) * f * (params.k1 + 1.0) / (f + saturation);
        }
        score
    }
}

/// A passage's length in tokens and the count of each of its terms.
#[derive(Debug, Clone, Default)]
pub struct PassageTerms {
    length: u64,
    tf: HashMap<String, u32>,
}

impl PassageTerms {
    pub fn of(passage: &str) -> Self {
        let mut terms = PassageTerms::default();
        for t in tokens(passage) {
            terms.length += 1;
            *terms.tf.entry(t).or_insert(0) += 1;
        }
        terms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three documents: "The cat sat." (3 tokens), "A dog; a cat, a CAT!" (6 tokens:
    /// a, dog, a, cat, a, cat) and "Dogs run" (2 tokens). N = 3, avgdl = 11/3;
    /// df(cat) = 2, df(dog) = 1 ("dogs" is another term: no stemming).
    fn corpus() -> Bm25Stats {
        let mut s = Bm25Stats::default();
        for d in ["The cat sat.", "A dog; a cat, a CAT!", "Dogs run"] {
            s.add_document(d);
        }
        s
    }

    #[test]
    fn tokens_are_lowercased_alphanumeric_runs() {
        let t: Vec<String> = tokens("Café-au-lait, 2024! ÉMILE's  x").collect();
        assert_eq!(t, ["café", "au", "lait", "2024", "émile", "s", "x"]);
    }

    #[test]
    fn statistics_of_a_three_document_corpus() {
        let s = corpus();
        assert_eq!(s.documents(), 3);
        assert_eq!(s.average_length(), 11.0 / 3.0);
        assert_eq!(s.document_frequency("cat"), 2);
        assert_eq!(s.document_frequency("dog"), 1);
        assert_eq!(s.document_frequency("a"), 1);
        // the, cat, sat, a, dog, dogs, run
        assert_eq!(s.vocabulary(), 7);
        // idf(cat) = ln(1 + (3 - 2 + 0.5) / (2 + 0.5)) = ln(1.6)
        assert!((s.idf("cat") - 1.6f64.ln()).abs() < 1e-15);
    }

    #[test]
    fn score_equals_the_hand_computed_value() {
        // Query "cat dog" against document 2 (dl = 6, tf(cat) = 2, tf(dog) = 1),
        // k1 = 0.9, b = 0.4:
        //   K = k1 * (1 - b + b * dl / avgdl) = 0.9 * (0.6 + 0.4 * 6 / (11/3))
        //     = 0.9 * 13.8 / 11 = 12.42 / 11
        //   cat: idf = ln(1 + 1.5 / 2.5) = ln(1.6);
        //        ln(1.6) * 2 * 1.9 / (2 + 12.42/11) = ln(1.6) * 41.8 / 34.42 = 0.570777...
        //   dog: idf = ln(1 + 2.5 / 1.5) = ln(8/3);
        //        ln(8/3) * 1 * 1.9 / (1 + 12.42/11) = ln(8/3) * 20.9 / 23.42 = 0.875291...
        //   total 1.446068904248763
        let s = corpus();
        let got = s.score(Bm25Params::default(), "cat dog", "A dog; a cat, a CAT!");
        let want = 1.6f64.ln() * 41.8 / 34.42 + (8.0f64 / 3.0).ln() * 20.9 / 23.42;
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        assert!((got - 1.446_068_904_248_763).abs() < 1e-12, "{got}");
        // b = 0 removes length normalisation: one occurrence scores idf * 1.9 / 1.9.
        let flat = Bm25Params { k1: 0.9, b: 0.0 };
        let got = s.score(flat, "cat", "The cat sat.");
        assert!((got - 1.6f64.ln()).abs() < 1e-15, "{got}");
        // A repeated query token counts twice.
        let once = s.score(Bm25Params::default(), "cat", "The cat sat.");
        let twice = s.score(Bm25Params::default(), "cat CAT", "The cat sat.");
        assert!((twice - 2.0 * once).abs() < 1e-15);
    }

    #[test]
    fn unknown_terms_and_empty_queries_score_zero() {
        let s = corpus();
        let p = Bm25Params::default();
        assert_eq!(s.score(p, "zebra", "The cat sat."), 0.0);
        assert_eq!(s.score(p, "dogs", "A dog; a cat, a CAT!"), 0.0);
        assert_eq!(s.score(p, "", "The cat sat."), 0.0);
        assert_eq!(s.score(p, "?! ...", "The cat sat."), 0.0);
        assert_eq!(s.score(p, "cat", ""), 0.0);
        // An empty corpus: N = 0, df = 0, idf = ln(1 + 0.5 / 0.5) = ln 2, and the length
        // ratio is taken as 1, so one occurrence scores ln 2 * 1.9 / (1 + 0.9).
        let empty = Bm25Stats::default().score(p, "cat", "cat");
        assert!((empty - 2.0f64.ln()).abs() < 1e-15, "{empty}");
    }

    #[test]
    fn parameters_outside_their_range_are_named() {
        let bad = Bm25Params { k1: -1.0, b: 0.4 };
        assert!(bad.validate().unwrap_err().contains("k1"));
        let bad = Bm25Params { k1: 0.9, b: 1.5 };
        assert!(bad.validate().unwrap_err().contains("b must be in [0, 1]"));
        assert!(Bm25Params::default().validate().is_ok());
    }
}
