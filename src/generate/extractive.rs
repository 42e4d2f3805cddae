//! The `extractive` generator: queries cut from the passage itself, no LLM.
//!
//! A baseline, and the way to run the whole pipeline on real data where no LLM is at
//! hand. Its queries share words with their passage far more than an LLM's do, so a
//! model trained on them learns an easier, more lexical task; compare against it, do not
//! ship it. Per query type:
//! - `title`: the passage's title, trimmed; a passage without one gets a
//!   [`Generated::Failed`] saying so.
//! - `claim`: one sentence of the passage's text, the inverse cloze task (Lee et al.,
//!   2019) without removing the sentence from the passage. The sentence is chosen by the
//!   request seed among the sentences of at least [`MIN_CLAIM_WORDS`] words (among all
//!   sentences when none is that long): index `floor(seed * n / 2^64)`. Sentences are
//!   split after a run of `.`, `!`, `?` or `…`, with any closing quotes and brackets,
//!   followed by whitespace or the end of the text (so `3.5` stays whole but an
//!   abbreviation such as `e.g. this` ends a sentence), and after the full-width `。`,
//!   `！` and `？` whatever follows. A long sentence is kept whole.
//! - `keywords`: the [`MAX_KEYWORDS`] terms of highest TF-IDF, comma-separated, highest
//!   first; ties go to the term that occurs first in the passage.
//! - `search` and `web`: the same terms joined by spaces, a keyword query.
//! - `question` and user-defined types: [`Generated::Failed`]; extraction has no honest
//!   way to write a question. [`ExtractiveGenerator::supports`] lets a config reject them
//!   before the run.
//!
//! TF-IDF: a passage's document is its title and text. Tokens are maximal runs of
//! alphanumeric characters, lowercased; a term is a token of at least [`MIN_TERM_CHARS`]
//! characters, with at least one letter, not in [`STOPWORDS`]. `tf` is the term's count in
//! the document, `idf = ln((1 + N) / (1 + df)) + 1` with `N` documents of which `df`
//! contain the term (the smoothed form, so a term of a passage outside the table still
//! has a finite weight), and the score `tf * idf`.
//!
//! The document frequencies come from the prepared corpus at construction. A keyword
//! query depends on the corpus only through `N` and the frequencies of its own passage's
//! terms, and a title or a claim not at all, so that is what each request's cache key
//! holds ([`QueryGenerator::request_inputs`]: `N` and the passage's terms with their
//! frequencies, for the keyword types): a changed corpus generates again its new and
//! edited passages' queries and the keyword queries whose terms' frequencies moved (all
//! of them when `N` moved), and a rerun ends equal to a run from scratch.

use std::collections::HashMap;

use super::postprocess::outcome;
use super::{Generated, GenerationRequest, PreparedPassage, QueryGenerator};
use crate::error::EngineError;
use crate::store::memo::BuildPrehashedHasher;

/// Part of [`ExtractiveGenerator::id`]; bumped whenever a rule of this file changes what
/// it writes, so that cached queries of the old rules are not reused.
pub const EXTRACTIVE_VERSION: &str = "2";
/// Terms in a keyword query (the recipe's "up to 5 key phrases").
pub const MAX_KEYWORDS: usize = 5;
/// Shorter tokens are not terms (drops stray letters such as the `s` of `it's`).
pub const MIN_TERM_CHARS: usize = 2;
/// A claim is preferably a sentence of at least this many words; shorter ones are
/// mostly headings and fragments.
pub const MIN_CLAIM_WORDS: usize = 4;
/// The query types this generator writes.
pub const SUPPORTED_TYPES: [&str; 5] = ["title", "claim", "keywords", "search", "web"];

/// English function words that are never keywords: articles, pronouns, auxiliaries,
/// prepositions, conjunctions and a few very common adverbs. Sorted (looked up by binary
/// search; a test keeps it sorted).
pub const STOPWORDS: [&str; 120] = [
    "a", "about", "above", "after", "again", "against", "all", "also", "am", "an", "and", "any",
    "are", "as", "at", "be", "because", "been", "before", "being", "below", "between", "both",
    "but", "by", "can", "could", "did", "do", "does", "doing", "down", "during", "each", "few",
    "for", "from", "further", "had", "has", "have", "having", "he", "her", "here", "hers", "him",
    "his", "how", "if", "in", "into", "is", "it", "its", "just", "may", "me", "might", "more",
    "most", "must", "my", "no", "nor", "not", "now", "of", "off", "on", "once", "only", "or",
    "other", "our", "ours", "out", "over", "own", "same", "shall", "she", "should", "so", "some",
    "such", "than", "that", "the", "their", "them", "then", "there", "these", "they", "this",
    "those", "through", "to", "too", "under", "until", "up", "very", "was", "we", "were", "what",
    "when", "where", "which", "while", "who", "whom", "why", "will", "with", "would", "you",
    "your",
];

/// Characters that end a sentence.
const SENTENCE_ENDS: [char; 7] = ['.', '!', '?', '…', '。', '！', '？'];
/// Full-width ends: scripts written without spaces end a sentence on these alone.
const FULL_WIDTH_ENDS: [char; 3] = ['。', '！', '？'];
/// Characters that may follow a sentence end before the whitespace.
const CLOSERS: [char; 8] = ['"', '\'', ')', ']', '}', '”', '’', '»'];

/// Document frequencies of the terms of a corpus, by each term's 64-bit hash
/// (FNV-1a, mixed; two of a corpus's terms share one with probability ~n^2 / 2^65).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DocumentFrequencies {
    documents: u64,
    df: HashMap<u64, u64, BuildPrehashedHasher>,
}

impl DocumentFrequencies {
    /// The table of `passages` (each one document: title and text).
    pub fn from_passages<'a>(passages: impl IntoIterator<Item = &'a PreparedPassage>) -> Self {
        let mut table = Self::default();
        let mut terms = PassageTerms::default();
        for passage in passages {
            table.documents += 1;
            for &term in terms.distinct(passage) {
                *table.df.entry(term).or_insert(0) += 1;
            }
        }
        table
    }

    /// [`Self::from_passages`] of `items`' passages, counted on `threads` threads over
    /// contiguous ranges and summed: the same table.
    pub fn from_passages_on_threads<T: Sync>(
        items: &[T],
        passage: impl Fn(&T) -> &PreparedPassage + Sync,
        threads: usize,
    ) -> Self {
        let per_thread = items.len().div_ceil(threads.max(1)).max(1);
        let passage = &passage;
        let parts: Vec<Self> = std::thread::scope(|scope| {
            let handles: Vec<_> = items
                .chunks(per_thread)
                .map(|chunk| scope.spawn(move || Self::from_passages(chunk.iter().map(passage))))
                .collect();
            handles
                .into_iter()
                // A count that panicked is a bug; its panic goes on here.
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
                })
                .collect()
        });
        let mut parts = parts.into_iter();
        let mut table = parts.next().unwrap_or_default();
        for part in parts {
            table.documents += part.documents;
            for (term, df) in part.df {
                *table.df.entry(term).or_insert(0) += df;
            }
        }
        table
    }

    /// Documents counted.
    pub fn documents(&self) -> u64 {
        self.documents
    }

    /// What `passage`'s keyword query depends on in the table: `N` and each distinct
    /// term of the passage with its frequency, hashed.
    pub fn inputs_of(&self, passage: &PreparedPassage) -> String {
        let mut terms = PassageTerms::default();
        // The bytes hashed, gathered first: one hasher update per term cost more than
        // the hashing.
        let distinct = terms.distinct(passage);
        let mut bytes = Vec::with_capacity(8 + 16 * distinct.len());
        bytes.extend_from_slice(&self.documents.to_le_bytes());
        for &term in distinct {
            let df = self.df.get(&term).copied().unwrap_or(0);
            bytes.extend_from_slice(&term.to_le_bytes());
            bytes.extend_from_slice(&df.to_le_bytes());
        }
        blake3::hash(&bytes).to_hex().to_string()
    }

    /// Documents that contain `term` (0 for a term never seen).
    pub fn df(&self, term: &str) -> u64 {
        self.df.get(&term_hash(term)).copied().unwrap_or(0)
    }

    /// `ln((1 + N) / (1 + df)) + 1`.
    pub fn idf(&self, term: &str) -> f64 {
        self.idf_of_hash(term_hash(term))
    }

    /// `ln((1 + N) / (1 + df))` + 1 of the term whose [`term_hash`] is `hash`.
    fn idf_of_hash(&self, hash: u64) -> f64 {
        let df = self.df.get(&hash).copied().unwrap_or(0);
        ((1 + self.documents) as f64 / (1 + df) as f64).ln() + 1.0
    }

    /// Every term of `passage` with its TF-IDF score, highest first, ties by first
    /// occurrence.
    pub fn scores(&self, passage: &PreparedPassage) -> Vec<(String, f64)> {
        let counted = TermCounts::of(passage);
        self.ranked(&counted)
            .into_iter()
            .map(|(i, score)| (counted.text(i).to_string(), score))
            .collect()
    }

    /// The [`MAX_KEYWORDS`] best terms of `passage`.
    pub fn top_terms(&self, passage: &PreparedPassage) -> Vec<String> {
        let counted = TermCounts::of(passage);
        self.ranked(&counted)
            .into_iter()
            .take(MAX_KEYWORDS)
            .map(|(i, _)| counted.text(i).to_string())
            .collect()
    }

    /// The distinct terms of `counted` (by index) with their TF-IDF scores, highest
    /// first, ties by first occurrence.
    fn ranked(&self, counted: &TermCounts) -> Vec<(usize, f64)> {
        let mut scored: Vec<(usize, f64)> = counted
            .terms
            .iter()
            .enumerate()
            .map(|(i, t)| (i, t.count as f64 * self.idf_of_hash(t.hash)))
            .collect();
        // Terms are indexed in order of first occurrence.
        scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        scored
    }
}

/// One distinct term of a passage, as [`TermCounts`] keeps it.
#[derive(Debug)]
struct TermCount {
    hash: u64,
    count: u64,
    /// Its text: `TermCounts::texts[start..end]`.
    start: usize,
    end: usize,
    /// The next distinct term of the same hash (two terms of one 64-bit hash are still
    /// counted apart).
    next_of_hash: Option<usize>,
}

/// A passage's distinct terms in order of first occurrence, each with its count, their
/// texts in one buffer: counted by hash, with no allocation per term.
#[derive(Debug, Default)]
struct TermCounts {
    terms: Vec<TermCount>,
    texts: String,
}

impl TermCounts {
    fn of(passage: &PreparedPassage) -> Self {
        Self::of_hashed_by(passage, term_hash)
    }

    /// [`Self::of`] with the terms hashed by `hash` (a test collides every term).
    fn of_hashed_by(passage: &PreparedPassage, hash: impl Fn(&str) -> u64) -> Self {
        let mut counted = Self::default();
        let mut first_of_hash: HashMap<u64, usize, BuildPrehashedHasher> = HashMap::default();
        for_each_term(passage, |term| {
            let hash = hash(term);
            let mut at = first_of_hash.get(&hash).copied();
            let mut last = None;
            while let Some(i) = at {
                if counted.text(i) == term {
                    counted.terms[i].count += 1;
                    return;
                }
                last = Some(i);
                at = counted.terms[i].next_of_hash;
            }
            let i = counted.terms.len();
            let start = counted.texts.len();
            counted.texts.push_str(term);
            counted.terms.push(TermCount {
                hash,
                count: 1,
                start,
                end: counted.texts.len(),
                next_of_hash: None,
            });
            match last {
                Some(previous) => counted.terms[previous].next_of_hash = Some(i),
                None => {
                    first_of_hash.insert(hash, i);
                }
            }
        });
        counted
    }

    fn text(&self, i: usize) -> &str {
        &self.texts[self.terms[i].start..self.terms[i].end]
    }
}

/// The baseline generator (see the module docs).
#[derive(Debug, Clone)]
pub struct ExtractiveGenerator {
    frequencies: DocumentFrequencies,
}

/// The query types whose queries are TF-IDF keywords.
const KEYWORD_TYPES: [&str; 3] = ["keywords", "search", "web"];

impl ExtractiveGenerator {
    /// A generator whose keyword scores use `frequencies`.
    pub fn new(frequencies: DocumentFrequencies) -> Self {
        Self { frequencies }
    }

    /// A generator with the document frequencies of `passages` (the prepared corpus).
    pub fn from_passages<'a>(passages: impl IntoIterator<Item = &'a PreparedPassage>) -> Self {
        Self::new(DocumentFrequencies::from_passages(passages))
    }

    /// Whether this generator writes queries of `query_type`.
    pub fn supports(query_type: &str) -> bool {
        SUPPORTED_TYPES.contains(&query_type)
    }

    /// The outcome of one request.
    pub fn generate_one(&self, request: &GenerationRequest) -> Generated {
        let passage = &request.passage;
        let failed = |why: String| Generated::Failed {
            reason: format!("passage `{}`: {why}", passage.id),
        };
        match request.query_type.as_str() {
            "title" => {
                if passage.title.trim().is_empty() {
                    return failed(
                        "has no title, and extractive title queries are the title".into(),
                    );
                }
                outcome(&passage.id, passage.title.clone(), 0)
            }
            "claim" => match pick_sentence(&passage.text, request.seed) {
                Some(sentence) => outcome(&passage.id, sentence.to_owned(), 0),
                None => failed("has no sentence to use as a claim".into()),
            },
            "keywords" | "search" | "web" => {
                self.keywords_outcome(request, &self.frequencies.top_terms(passage))
            }
            other => failed(format!(
                "the extractive generator writes no `{other}` queries (only {})",
                SUPPORTED_TYPES.join(", ")
            )),
        }
    }
}

impl ExtractiveGenerator {
    /// The outcome of a keyword request whose passage's top terms are `top`.
    fn keywords_outcome(&self, request: &GenerationRequest, top: &[String]) -> Generated {
        if top.is_empty() {
            return Generated::Failed {
                reason: format!(
                    "passage `{}`: has no terms outside the stopwords to use as keywords",
                    request.passage.id
                ),
            };
        }
        let separator = if request.query_type == "keywords" {
            ", "
        } else {
            " "
        };
        outcome(&request.passage.id, top.join(separator), 0)
    }
}

impl QueryGenerator for ExtractiveGenerator {
    /// The version of the rules: the corpus is in each keyword request's inputs.
    fn id(&self) -> String {
        format!("extractive-v{EXTRACTIVE_VERSION}")
    }

    fn request_inputs(&self, passage: &PreparedPassage, query_type: &str) -> Option<String> {
        KEYWORD_TYPES
            .contains(&query_type)
            .then(|| self.frequencies.inputs_of(passage))
    }

    /// Its queries come from the passage alone.
    fn reads_prompts(&self) -> bool {
        false
    }

    /// Every keyword type's inputs are the passage's terms against the corpus: computed
    /// once for all of them.
    fn request_inputs_of_types(
        &self,
        passage: &PreparedPassage,
        query_types: &[&str],
    ) -> Vec<Option<String>> {
        let mut inputs: Option<String> = None;
        query_types
            .iter()
            .map(|t| {
                KEYWORD_TYPES.contains(t).then(|| {
                    inputs
                        .get_or_insert_with(|| self.frequencies.inputs_of(passage))
                        .clone()
                })
            })
            .collect()
    }

    /// A passage's keyword types share its top terms: computed once for the requests of
    /// one passage that follow each other.
    fn generate(&self, requests: &[GenerationRequest]) -> Result<Vec<Generated>, EngineError> {
        let mut last_top: Option<(&str, Vec<String>)> = None;
        Ok(requests
            .iter()
            .map(|r| {
                if !KEYWORD_TYPES.contains(&r.query_type.as_str()) {
                    return self.generate_one(r);
                }
                let hash = r.passage.hash.as_str();
                if last_top.as_ref().is_none_or(|(h, _)| *h != hash) {
                    last_top = Some((hash, self.frequencies.top_terms(&r.passage)));
                }
                let top = last_top.as_ref().map_or(&[][..], |(_, t)| t.as_slice());
                self.keywords_outcome(r, top)
            })
            .collect())
    }
}

/// Calls `f` with each term of `passage`'s document (its title, then its text: a
/// document for TF-IDF is both), in order; see the module docs for what a term is.
/// Each term is lowercased into one reused buffer: no allocation per token (ASCII
/// tokens; others go through `str::to_lowercase`, which knows the final sigma).
fn for_each_term(passage: &PreparedPassage, mut f: impl FnMut(&str)) {
    let mut buf = String::new();
    for text in [passage.title.as_str(), passage.text.as_str()] {
        for token in text.split(|c: char| !c.is_alphanumeric()) {
            if token.is_empty() {
                continue;
            }
            buf.clear();
            let term = if token.is_ascii() {
                buf.push_str(token);
                buf.make_ascii_lowercase();
                if buf.len() < MIN_TERM_CHARS || !buf.bytes().any(|b| b.is_ascii_alphabetic()) {
                    continue;
                }
                buf.as_str()
            } else {
                buf.push_str(&token.to_lowercase());
                if buf.chars().count() < MIN_TERM_CHARS || !buf.chars().any(char::is_alphabetic) {
                    continue;
                }
                buf.as_str()
            };
            if STOPWORDS.binary_search(&term).is_err() {
                f(term);
            }
        }
    }
}

/// A term's key in [`DocumentFrequencies`]: 64-bit FNV-1a of its bytes, mixed by
/// MurmurHash3's finaliser so that every bit depends on every byte.
fn term_hash(term: &str) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in term.as_bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(PRIME);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// A passage's distinct term hashes, sorted, in a buffer reused from passage to passage.
#[derive(Debug, Default)]
struct PassageTerms {
    hashes: Vec<u64>,
}

impl PassageTerms {
    fn distinct(&mut self, passage: &PreparedPassage) -> &[u64] {
        self.hashes.clear();
        for_each_term(passage, |term| self.hashes.push(term_hash(term)));
        self.hashes.sort_unstable();
        self.hashes.dedup();
        &self.hashes
    }
}

/// The sentences of `text`, trimmed, in order (see the module docs).
pub fn sentences(text: &str) -> Vec<&str> {
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let mut out = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < chars.len() {
        if !SENTENCE_ENDS.contains(&chars[i].1) {
            i += 1;
            continue;
        }
        let mut end = i + 1;
        while end < chars.len() && SENTENCE_ENDS.contains(&chars[end].1) {
            end += 1;
        }
        while end < chars.len() && CLOSERS.contains(&chars[end].1) {
            end += 1;
        }
        let full_width = chars[i..end]
            .iter()
            .any(|(_, c)| FULL_WIDTH_ENDS.contains(c));
        if full_width || end == chars.len() || chars[end].1.is_whitespace() {
            let byte_end = chars.get(end).map_or(text.len(), |&(b, _)| b);
            out.push(text[start..byte_end].trim());
            start = byte_end;
        }
        i = end;
    }
    out.push(text[start..].trim());
    out.retain(|s| !s.is_empty());
    out
}

/// The claim sentence for `seed` (see the module docs).
fn pick_sentence(text: &str, seed: u64) -> Option<&str> {
    let all = sentences(text);
    let long: Vec<&str> = all
        .iter()
        .copied()
        .filter(|s| s.split_whitespace().count() >= MIN_CLAIM_WORDS)
        .collect();
    let pool = if long.is_empty() { all } else { long };
    if pool.is_empty() {
        return None;
    }
    let index = ((u128::from(seed) * pool.len() as u128) >> 64) as usize;
    Some(pool[index])
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is its job
mod tests {
    use super::*;

    #[test]
    fn terms_are_the_lowercased_alphanumeric_runs_of_title_and_text() {
        // The definition, with an allocation per token, against the reused buffer.
        let reference = |text: &str| -> Vec<String> {
            text.split(|c: char| !c.is_alphanumeric())
                .filter(|token| !token.is_empty())
                .map(str::to_lowercase)
                .filter(|token| {
                    token.chars().count() >= MIN_TERM_CHARS
                        && token.chars().any(char::is_alphabetic)
                        && !STOPWORDS.contains(&token.as_str())
                })
                .collect()
        };
        let p = passage(
            "x",
            "ΟΔΟΣ Café",
            "The 3D scan of X-ray data, 2024: Émile's ΣΟΦΟΣ and the b-cells; naïve ÅB a.",
        );
        let mut got = Vec::new();
        for_each_term(&p, |t| got.push(t.to_string()));
        let want = reference(&format!("{} {}", p.title, p.text));
        assert_eq!(got, want);
        assert!(got.contains(&"οδος".to_string()) || got.contains(&"οδοσ".to_string()));
        assert!(got.contains(&"3d".to_string()) && !got.contains(&"2024".to_string()));
        let frequencies = DocumentFrequencies::from_passages([&p]);
        assert_eq!(frequencies.df("café"), 1);
        assert_eq!(frequencies.df("the"), 0);
        assert_ne!(term_hash("ab"), term_hash("ba"));
    }

    #[test]
    fn stopwords_are_sorted_for_binary_search() {
        assert!(STOPWORDS.windows(2).all(|w| w[0] < w[1]));
    }

    fn passage(id: &str, title: &str, text: &str) -> PreparedPassage {
        PreparedPassage {
            id: id.into(),
            title: title.into(),
            text: text.into(),
            hash: format!("hash-{id}"),
        }
    }

    fn request(passage: PreparedPassage, query_type: &str, seed: u64) -> GenerationRequest {
        GenerationRequest {
            passage,
            query_type: query_type.into(),
            messages: Vec::new(),
            seed,
        }
    }

    fn text_of(outcome: Generated) -> String {
        match outcome {
            Generated::Query { text, tokens, .. } => {
                assert_eq!(tokens, 0);
                text
            }
            Generated::Failed { reason } => panic!("failed: {reason}"),
        }
    }

    /// N = 3; df: apple 1, banana 2, cherry 2, date 1. idf(apple) = ln(4/2) + 1 =
    /// 1.6931471805599454, idf(banana) = ln(4/3) + 1 = 1.2876820724517808.
    fn fruit() -> (Vec<PreparedPassage>, ExtractiveGenerator) {
        let corpus = vec![
            passage("d1", "", "Apple banana apple."),
            passage("d2", "", "Banana, cherry!"),
            passage("d3", "", "Cherry and the date."),
        ];
        let generator = ExtractiveGenerator::from_passages(&corpus);
        (corpus, generator)
    }

    #[test]
    fn tf_idf_equals_the_hand_computed_values() {
        let (corpus, generator) = fruit();
        let table = &generator.frequencies;
        assert_eq!(table.documents(), 3);
        assert_eq!(
            (table.df("apple"), table.df("banana"), table.df("and")),
            (1, 2, 0)
        );
        let scores = table.scores(&corpus[0]);
        assert_eq!(scores.len(), 2);
        assert_eq!(scores[0].0, "apple");
        assert!((scores[0].1 - 2.0 * 1.6931471805599454).abs() < 1e-12);
        assert_eq!(scores[1].0, "banana");
        assert!((scores[1].1 - 1.2876820724517808).abs() < 1e-12);
        // A term outside the table: idf = ln(4/1) + 1.
        assert!((table.idf("kiwi") - 2.386294361119891).abs() < 1e-12);
    }

    #[test]
    fn frequencies_counted_on_threads_are_the_same_table() {
        let (corpus, generator) = fruit();
        for threads in 1..=5 {
            let table = DocumentFrequencies::from_passages_on_threads(&corpus, |p| p, threads);
            assert_eq!(table, generator.frequencies, "{threads} threads");
        }
        assert_eq!(
            DocumentFrequencies::from_passages_on_threads(&[] as &[PreparedPassage], |p| p, 2),
            DocumentFrequencies::default()
        );
    }

    #[test]
    fn terms_of_one_hash_are_still_counted_apart() {
        let p = passage("t", "Apple pie", "apple banana Apple cherry banana apple");
        let counts = |c: &TermCounts| -> Vec<(String, u64)> {
            (0..c.terms.len())
                .map(|i| (c.text(i).to_string(), c.terms[i].count))
                .collect()
        };
        let want = vec![
            ("apple".to_string(), 4),
            ("pie".to_string(), 1),
            ("banana".to_string(), 2),
            ("cherry".to_string(), 1),
        ];
        assert_eq!(counts(&TermCounts::of(&p)), want);
        // Every term under one hash: the texts still tell them apart.
        assert_eq!(counts(&TermCounts::of_hashed_by(&p, |_| 7)), want);
    }

    #[test]
    fn keyword_ties_go_to_the_first_occurrence_and_stopwords_never_count() {
        let (corpus, generator) = fruit();
        // banana and cherry tie at 1.2877; banana comes first in d2.
        let out = generator.generate_one(&request(corpus[1].clone(), "keywords", 0));
        assert_eq!(text_of(out), "banana, cherry");
        // d3: "and", "the" are stopwords; date (idf 1.69) beats cherry (1.29).
        let out = generator.generate_one(&request(corpus[2].clone(), "keywords", 0));
        assert_eq!(text_of(out), "date, cherry");
        let out = generator.generate_one(&request(corpus[2].clone(), "search", 0));
        assert_eq!(text_of(out), "date cherry");
    }

    #[test]
    fn at_most_five_keywords_and_digit_tokens_are_not_terms() {
        let p = passage(
            "x",
            "Zeta",
            "alpha beta gamma delta epsilon 2024 b 3d alpha",
        );
        let generator = ExtractiveGenerator::from_passages([&p]);
        // One document: every idf is ln(2/2) + 1 = 1; alpha counts twice.
        let out = generator.generate_one(&request(p.clone(), "web", 0));
        assert_eq!(text_of(out), "alpha zeta beta gamma delta");
        assert_eq!(generator.frequencies.df("3d"), 1);
        assert_eq!(generator.frequencies.df("2024"), 0);
        let empty = passage("e", "", "it is what it is, 42.");
        let out = generator.generate_one(&request(empty, "keywords", 0));
        assert!(
            matches!(out, Generated::Failed { reason } if reason.starts_with("passage `e`: has no terms"))
        );
    }

    #[test]
    fn sentences_split_after_terminal_punctuation_and_spaces_only() {
        assert_eq!(
            sentences("It grew 3.5 percent. Why? \"Demand!\" said one (rightly.) Last one"),
            [
                "It grew 3.5 percent.",
                "Why?",
                "\"Demand!\"",
                "said one (rightly.)",
                "Last one"
            ]
        );
        assert_eq!(
            sentences("e.g. this splits... here"),
            ["e.g.", "this splits...", "here"]
        );
        assert_eq!(sentences("一つ。二つ！三つ"), ["一つ。", "二つ！", "三つ"]);
        assert!(sentences("   ").is_empty());
    }

    #[test]
    fn the_claim_is_the_sentence_the_seed_picks() {
        let p = passage(
            "c",
            "",
            "Short one. This sentence has five words. Another sentence here has six words! Is it a question?",
        );
        let generator = ExtractiveGenerator::from_passages([&p]);
        // Three sentences of at least four words; index = floor(seed * 3 / 2^64).
        let claim = |seed| text_of(generator.generate_one(&request(p.clone(), "claim", seed)));
        assert_eq!(claim(0), "This sentence has five words.");
        assert_eq!(claim(1 << 63), "Another sentence here has six words!");
        assert_eq!(claim(u64::MAX), "Is it a question?");
        // Only short sentences: any of them.
        let short = passage("s", "", "Yes. No.");
        let out = generator.generate_one(&request(short, "claim", u64::MAX));
        assert_eq!(text_of(out), "No.");
    }

    #[test]
    fn title_question_and_unknown_types() {
        let generator = ExtractiveGenerator::new(DocumentFrequencies::default());
        let with_title = passage("t", "  \"Tides\" ", "The Moon pulls the sea.");
        let out = generator.generate_one(&request(with_title.clone(), "title", 0));
        assert_eq!(text_of(out), "Tides");
        let untitled = passage("u", " ", "The Moon pulls the sea.");
        let out = generator.generate_one(&request(untitled, "title", 0));
        assert!(
            matches!(out, Generated::Failed { reason } if reason == "passage `u`: has no title, and extractive title queries are the title")
        );
        for kind in ["question", "faq"] {
            let out = generator.generate_one(&request(with_title.clone(), kind, 0));
            assert!(
                matches!(&out, Generated::Failed { reason } if reason.contains(&format!("no `{kind}` queries"))),
                "{out:?}"
            );
            assert!(!ExtractiveGenerator::supports(kind));
        }
        assert!(ExtractiveGenerator::supports("claim"));
        // The id names the version; the corpus is in the keyword requests' inputs (its
        // size and the frequencies of the passage's own terms), never in a title's or a
        // claim's.
        assert_eq!(generator.id(), "extractive-v2");
        let other_corpus = passage("x", "Other", "Another corpus entirely.");
        let other = ExtractiveGenerator::from_passages([&other_corpus]);
        assert_eq!(other.id(), generator.id());
        for kind in ["title", "claim"] {
            assert_eq!(generator.request_inputs(&with_title, kind), None);
        }
        for kind in KEYWORD_TYPES {
            let inputs = generator.request_inputs(&with_title, kind);
            assert!(inputs.is_some());
            assert_ne!(inputs, other.request_inputs(&with_title, kind));
        }
        let batch = [
            request(with_title.clone(), "title", 0),
            request(with_title, "question", 0),
        ];
        let outcomes = generator.generate(&batch).unwrap();
        assert_eq!(outcomes.len(), 2);
    }
}
