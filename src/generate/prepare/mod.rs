//! Passage preparation (RECIPE.md section 1): truncate, drop short passages, drop near
//! duplicates, sample, mark the held-out passages.
//!
//! Contracts:
//! - **Order of the steps.** Each passage's text is truncated to
//!   [`PrepareOptions::max_chars`] characters (Unicode scalar values, never a split
//!   UTF-8 sequence); a passage whose truncated text, trimmed, has fewer than
//!   [`PrepareOptions::min_chars`] characters is dropped as too short; the near-duplicate
//!   rule runs over the passages left; the sample is drawn from the passages left after
//!   that. Output is in input order.
//! - **Near duplicates** (when [`PrepareOptions::dedup`] is on): each passage's truncated
//!   text is normalised by [`normalise`], and the rule of the `dedup` module runs on the
//!   strings: a passage is a duplicate when its string is a substring of one of the next
//!   [`PrepareOptions::dedup_window`] strings in sorted order, forward or reversed. The
//!   one dropped is the contained one (the shorter, or of equal strings every one but
//!   the first read); [`Duplicate::kept`] names the passage kept in its place. A passage
//!   whose normalised text is empty (digits and punctuation only) is contained in every
//!   passage; it is dropped and reported on its own, as
//!   [`PrepareReport::empty_normalised`], since there is no one passage it copies.
//! - **Sampling and held-out ids** use the seeded hash of the id of
//!   [`held_out_passages`]: the `held_out` passages with the smallest hash over *every id
//!   read* (the set `mine` holds out, given the same seed), and the sample is the
//!   `max_passages` passages with the smallest hash among those left after the filters.
//!   The held-out passages left are therefore always inside the sample (the options are
//!   checked so that `held_out <= max_passages`). Neither choice moves when other
//!   passages are added. A held-out passage dropped by a filter is named in
//!   [`PrepareReport::held_out_dropped`]: `mine` still keeps it out of the candidates, and
//!   it simply has no synthetic queries.
//! - **Nothing is dropped silently**: every passage read is counted once in the report,
//!   as kept, too short, empty after normalisation, a duplicate or sampled out.
//!
//! Memory: preparation must see every passage before it can say which are near
//! duplicates or sampled, but it keeps only the ids and a few bytes per passage in
//! memory; titles, texts and the normalised strings in both sort orders go to files
//! in a spill directory once their buffers fill ([`Preparer::spill_to`]; the `spill`
//! module), and come back sorted (a k-way merge of sorted runs) or in order. The
//! verdicts are the same as [`near_duplicates`] over all strings in memory.

mod dedup;
mod options;
mod spill;

use std::collections::HashMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use dedup::{near_duplicates, normalise, DedupOrder};
pub use options::{
    PrepareError, PrepareOptions, DEFAULT_DEDUP_WINDOW, DEFAULT_HELD_OUT, DEFAULT_MAX_CHARS,
    DEFAULT_MAX_PASSAGES, DEFAULT_MIN_CHARS, DEFAULT_SEED,
};
pub use spill::SPILL_BUFFER_BYTES;

use super::PreparedPassage;
use crate::mining::held_out_passages;
use crate::record::Passage;
use crate::store::ContentHasher;
use dedup::{mark_in_order, Verdict};
use spill::{ExternalSorter, SpillDir, TextSpill};

/// A prepared passage and whether it belongs to the held-out synthetic test set (its
/// queries are generated, but it never becomes a training candidate).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SampledPassage {
    pub passage: PreparedPassage,
    pub held_out: bool,
}

/// One passage dropped as a near duplicate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Duplicate {
    /// The passage dropped.
    pub id: String,
    /// The passage whose normalised text contains it (within the window).
    pub duplicate_of: String,
    /// The passage kept in its place: `duplicate_of`, or where that one is itself a
    /// duplicate, the end of the chain (containment is transitive, so it contains `id`).
    pub kept: String,
    pub order: DedupOrder,
}

/// What preparation did with every passage read.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrepareReport {
    /// Passages read.
    pub read: usize,
    /// Passages kept (the output's length).
    pub kept: usize,
    /// Ids dropped as too short, in input order.
    pub too_short: Vec<String>,
    /// Ids whose normalised text is empty (digits, punctuation and symbols only).
    pub empty_normalised: Vec<String>,
    /// Near duplicates dropped, in input order.
    pub duplicates: Vec<Duplicate>,
    /// Passages left after the filters but outside the sample.
    pub sampled_out: usize,
    /// The held-out ids that are kept (they get queries), in input order.
    pub held_out: Vec<String>,
    /// The held-out ids a filter dropped (no queries for them), in input order.
    pub held_out_dropped: Vec<String>,
}

/// The prepared passages, in input order, and the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedCorpus {
    pub passages: Vec<SampledPassage>,
    pub report: PrepareReport,
    /// Every passage read, in input order, by digest: the corpus version that
    /// generation records and the next run's change plan compares against.
    pub read: Vec<ReadPassage>,
}

/// A passage as read (before any filter), by digests of its title and its whole text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadPassage {
    pub id: String,
    pub title: u64,
    pub text: u64,
}

/// A 64-bit digest of `s` (the first 8 bytes of its blake3, little-endian): what a corpus
/// version keeps of a title, a text or a query. Two different strings share a digest
/// with probability 2^-64 per pair, far below a corpus's edits.
pub fn digest64(s: &str) -> u64 {
    let hash = blake3::hash(s.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash.as_bytes()[..8]);
    u64::from_le_bytes(first)
}

/// Prepares passages one at a time (so a reader's errors stay the caller's):
/// [`Preparer::push`] each passage, then [`Preparer::finish`].
///
/// Memory: with [`Preparer::spill_to`], what preparation keeps of every passage (its
/// title and text for the output, its normalised text in both sort orders for the
/// near-duplicate rule) stays within [`SPILL_BUFFER_BYTES`] per buffer, the rest in
/// sorted runs on disk; only the ids and a few bytes per passage stay in memory.
/// Without it everything stays in memory.
#[derive(Debug)]
pub struct Preparer {
    options: PrepareOptions,
    /// Every id read, in input order (the held-out choice is made over all of them).
    ids: Vec<String>,
    /// Every passage's title and text digests, in input order ([`ReadPassage`]).
    digests: Vec<(u64, u64)>,
    /// Record number (0-based) of each id by a hash of the id, to name both records of a
    /// duplicate id; ids whose hash another id already holds are in `seen_collided`.
    seen: HashMap<u64, u32>,
    seen_collided: HashMap<String, u32>,
    /// The record number of each passage that passed the length filter (an "entry").
    entries: Vec<u32>,
    /// Entries whose normalised text is empty.
    empty: Vec<u32>,
    /// The entries' titles and texts, in entry order.
    texts: TextSpill,
    /// The entries' normalised texts, sorted as written and as reversed.
    forward: ExternalSorter,
    reversed: ExternalSorter,
    spill: SpillDir,
    too_short: Vec<usize>,
}

impl Preparer {
    /// Checks the options. Everything stays in memory until [`Preparer::spill_to`].
    pub fn new(options: PrepareOptions) -> Result<Self, PrepareError> {
        options.check()?;
        Ok(Self {
            options,
            ids: Vec::new(),
            digests: Vec::new(),
            seen: HashMap::new(),
            seen_collided: HashMap::new(),
            entries: Vec::new(),
            empty: Vec::new(),
            texts: TextSpill::new(usize::MAX),
            forward: ExternalSorter::new("forward", usize::MAX),
            reversed: ExternalSorter::new("reversed", usize::MAX),
            spill: SpillDir::new(PathBuf::new()),
            too_short: Vec::new(),
        })
    }

    /// Keeps memory bounded: buffers of `buffer_bytes` ([`SPILL_BUFFER_BYTES`] for the
    /// engine) are written to files in `dir` (created when first needed, removed when
    /// the preparer is done). Call before the first push.
    pub fn spill_to(mut self, dir: PathBuf, buffer_bytes: usize) -> Self {
        self.spill = SpillDir::new(dir);
        self.texts = TextSpill::new(buffer_bytes);
        self.forward = ExternalSorter::new("forward", buffer_bytes);
        self.reversed = ExternalSorter::new("reversed", buffer_bytes);
        self
    }

    /// The first record with `id`, if any.
    fn first_record(&self, id: &str) -> Option<u32> {
        match self.seen.get(&id_hash(id)) {
            Some(&record) if self.ids[record as usize] == id => Some(record),
            Some(_) => self.seen_collided.get(id).copied(),
            None => None,
        }
    }

    /// Takes one passage.
    pub fn push(&mut self, passage: Passage) -> Result<(), PrepareError> {
        let record = self.ids.len();
        if let Some(first) = self.first_record(&passage.id) {
            return Err(PrepareError::DuplicateId {
                id: passage.id,
                first: first as usize + 1,
                second: record + 1,
            });
        }
        let record32 = u32::try_from(record).map_err(|_| PrepareError::Options {
            field: "max_passages",
            reason: format!("a corpus of more than {} passages", u32::MAX),
        })?;
        match self.seen.entry(id_hash(&passage.id)) {
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(record32);
            }
            std::collections::hash_map::Entry::Occupied(_) => {
                self.seen_collided.insert(passage.id.clone(), record32);
            }
        }
        self.ids.push(passage.id);
        self.digests
            .push((digest64(&passage.title), digest64(&passage.text)));
        let text = truncate_chars(&passage.text, self.options.max_chars);
        if text.trim().chars().count() < self.options.min_chars {
            self.too_short.push(record);
            return Ok(());
        }
        let entry = self.entries.len() as u32;
        self.entries.push(record32);
        if self.options.dedup {
            let normalised = normalise(text);
            if normalised.is_empty() {
                self.empty.push(entry);
            } else {
                self.reversed
                    .push(entry, dedup::reverse(&normalised), &mut self.spill)?;
                self.forward.push(entry, normalised, &mut self.spill)?;
            }
        }
        let text = text.to_owned();
        self.texts.push(passage.title, text, &mut self.spill)?;
        Ok(())
    }

    /// Runs the near-duplicate rule and the sampling; returns the passages and the report.
    pub fn finish(self) -> Result<PreparedCorpus, PrepareError> {
        let Preparer {
            options,
            ids,
            digests,
            entries,
            empty,
            texts,
            forward,
            reversed,
            mut spill,
            too_short,
            ..
        } = self;
        let held_out_records = held_out_passages(&ids, options.held_out, options.seed);
        let is_held_out = |record: usize| held_out_records.contains(&(record as u32));
        let record_of = |e: usize| entries[e] as usize;

        let mut report = PrepareReport {
            read: ids.len(),
            too_short: too_short.iter().map(|&r| ids[r].clone()).collect(),
            ..PrepareReport::default()
        };
        let mut dropped_records: Vec<usize> = too_short;

        // Near duplicates, as indices into `entries`.
        let mut removed = vec![false; entries.len()];
        if options.dedup {
            let mut verdicts = vec![Verdict::Unique; entries.len()];
            for &e in &empty {
                verdicts[e as usize] = Verdict::Empty;
            }
            let window = options.dedup_window;
            let sorted = forward.into_sorted(&mut spill)?;
            mark_in_order(sorted, window, DedupOrder::Forward, &mut verdicts)?;
            let sorted = reversed.into_sorted(&mut spill)?;
            mark_in_order(sorted, window, DedupOrder::Reversed, &mut verdicts)?;
            for (e, verdict) in verdicts.iter().enumerate() {
                match verdict {
                    Verdict::Unique => {}
                    Verdict::Empty => {
                        removed[e] = true;
                        report.empty_normalised.push(ids[record_of(e)].clone());
                    }
                    Verdict::Duplicate { of, order } => {
                        removed[e] = true;
                        let mut kept = *of;
                        while let Verdict::Duplicate { of, .. } = verdicts[kept] {
                            kept = of;
                        }
                        report.duplicates.push(Duplicate {
                            id: ids[record_of(e)].clone(),
                            duplicate_of: ids[record_of(*of)].clone(),
                            kept: ids[record_of(kept)].clone(),
                            order: *order,
                        });
                    }
                }
            }
        }
        dropped_records.extend((0..entries.len()).filter(|&e| removed[e]).map(record_of));

        // The sample: the smallest id hashes among the passages left.
        let left: Vec<usize> = (0..entries.len()).filter(|&e| !removed[e]).collect();
        let mut in_sample = vec![false; entries.len()];
        match options.max_passages {
            Some(max) if max < left.len() => {
                let left_ids: Vec<String> =
                    left.iter().map(|&e| ids[record_of(e)].clone()).collect();
                for chosen in held_out_passages(&left_ids, max, options.seed) {
                    in_sample[left[chosen as usize]] = true;
                }
                report.sampled_out = left.len() - max;
                dropped_records.extend(
                    left.iter()
                        .filter(|&&e| !in_sample[e])
                        .map(|&e| record_of(e)),
                );
            }
            _ => left.iter().for_each(|&e| in_sample[e] = true),
        }

        let mut passages = Vec::new();
        for (e, title_text) in texts.read_back()?.enumerate() {
            let (title, text) = title_text?;
            if !in_sample[e] {
                continue;
            }
            let record = record_of(e);
            let id = ids[record].clone();
            let held_out = is_held_out(record);
            if held_out {
                report.held_out.push(id.clone());
            }
            passages.push(SampledPassage {
                passage: PreparedPassage {
                    hash: passage_hash(&title, &text),
                    id,
                    title,
                    text,
                },
                held_out,
            });
        }
        dropped_records.sort_unstable();
        report.held_out_dropped = dropped_records
            .into_iter()
            .filter(|&r| is_held_out(r))
            .map(|r| ids[r].clone())
            .collect();
        report.kept = passages.len();
        drop(spill);
        let read = ids
            .into_iter()
            .zip(digests)
            .map(|(id, (title, text))| ReadPassage { id, title, text })
            .collect();
        Ok(PreparedCorpus {
            passages,
            report,
            read,
        })
    }
}

/// The hash the duplicate-id check files an id under (SipHash with fixed keys: the same
/// on every run; a collision only sends the id to the exact map).
fn id_hash(id: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    #[allow(deprecated)] // SipHasher's fixed keys are the point; DefaultHasher's may change
    let mut h = std::hash::SipHasher::new();
    id.hash(&mut h);
    h.finish()
}

/// Prepares passages that are already read (a convenience over [`Preparer`]).
pub fn prepare_passages(
    passages: impl IntoIterator<Item = Passage>,
    options: &PrepareOptions,
) -> Result<PreparedCorpus, PrepareError> {
    let mut preparer = Preparer::new(options.clone())?;
    for passage in passages {
        preparer.push(passage)?;
    }
    preparer.finish()
}

/// The cache key's passage part: [`ContentHasher`] over the title and the truncated text,
/// each as a length-prefixed field.
pub fn passage_hash(title: &str, text: &str) -> String {
    ContentHasher::new().field(title).field(text).finish()
}

/// The first `max_chars` characters of `text` (all of it when shorter).
pub fn truncate_chars(text: &str, max_chars: usize) -> &str {
    match text.char_indices().nth(max_chars) {
        Some((byte, _)) => &text[..byte],
        None => text,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is its job
mod tests {
    use super::*;

    fn p(id: &str, text: &str) -> Passage {
        Passage {
            id: id.into(),
            title: String::new(),
            text: text.into(),
        }
    }

    fn no_sampling() -> PrepareOptions {
        PrepareOptions {
            max_passages: None,
            held_out: 0,
            ..PrepareOptions::default()
        }
    }

    /// A text no other `distinct_text(j)` contains: a two-letter word unique to `i`.
    fn distinct_text(i: usize) -> String {
        let a = char::from(b'a' + (i / 26) as u8);
        let b = char::from(b'a' + (i % 26) as u8);
        format!("a passage about topic {a}{b} here")
    }

    fn kept_ids(corpus: &PreparedCorpus) -> Vec<&str> {
        corpus
            .passages
            .iter()
            .map(|s| s.passage.id.as_str())
            .collect()
    }

    /// Passages built from a few words so that prefixes, suffixes, inner parts and
    /// equal texts are common; some digits-only (empty normalised) and too short.
    fn overlapping_corpus(n: usize) -> Vec<Passage> {
        let words = [
            "kiwi", "apple", "pear", "fig", "plum", "lime", "date", "yuzu",
        ];
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        (0..n)
            .map(|i| {
                let len = 2 + (next() % 5) as usize;
                let text: Vec<&str> = (0..len).map(|_| words[(next() % 8) as usize]).collect();
                let text = match next() % 17 {
                    0 => "12345 678 90".to_string(),
                    1 => "tiny".to_string(),
                    _ => text.join(" "),
                };
                Passage {
                    id: format!("p{i}"),
                    title: format!("t{}", i % 3),
                    text,
                }
            })
            .collect()
    }

    #[test]
    fn spilled_preparation_equals_preparation_in_memory() {
        let corpus = overlapping_corpus(3000);
        for options in [
            no_sampling(),
            PrepareOptions {
                max_passages: Some(700),
                held_out: 40,
                dedup_window: 3,
                ..PrepareOptions::default()
            },
        ] {
            let in_memory = prepare_passages(corpus.clone(), &options).unwrap();
            assert!(in_memory.report.duplicates.len() > 100);
            assert!(!in_memory.report.empty_normalised.is_empty());
            let tmp = tempfile::tempdir().unwrap();
            let spill = tmp.path().join(".prepare.tmp");
            // 2 KB buffers: every buffer spills many times over.
            let mut preparer = Preparer::new(options.clone())
                .unwrap()
                .spill_to(spill.clone(), 2048);
            let mut spilled_runs = false;
            for passage in corpus.clone() {
                preparer.push(passage).unwrap();
                spilled_runs |= spill.join("forward-3.run").exists();
            }
            assert!(spilled_runs && spill.join("texts.bin").exists());
            let spilled = preparer.finish().unwrap();
            assert_eq!(spilled, in_memory);
            assert!(!spill.exists(), "the spill directory is removed");
        }
    }

    #[test]
    fn truncation_counts_characters_not_bytes() {
        assert_eq!(truncate_chars("héllo wörld", 7), "héllo w");
        assert_eq!(truncate_chars("日本語のテキスト", 3), "日本語");
        assert_eq!(truncate_chars("short", 10), "short");
        let options = PrepareOptions {
            max_chars: 12,
            min_chars: 1,
            ..no_sampling()
        };
        let out = prepare_passages([p("a", "ααααα ββββββ γγγγ")], &options).unwrap();
        assert_eq!(out.passages[0].passage.text, "ααααα ββββββ");
        assert_eq!(
            out.passages[0].passage.hash,
            ContentHasher::new()
                .field("")
                .field("ααααα ββββββ")
                .finish()
        );
    }

    #[test]
    fn short_passages_are_dropped_and_named() {
        let out = prepare_passages(
            [
                p("a", "   tiny    "),
                p("b", "exactly 10"),
                p("c", "123456789"),
            ],
            &no_sampling(),
        )
        .unwrap();
        assert_eq!(kept_ids(&out), ["b"]);
        assert_eq!(out.report.too_short, ["a", "c"]);
        assert_eq!(out.report.read, 3);
    }

    #[test]
    fn accents_and_digits_do_not_hide_a_duplicate_and_the_first_read_is_kept() {
        let out = prepare_passages(
            [
                p("first", "In 2019 the team won 3 titles."),
                p("other", "An unrelated passage about bread."),
                p("second", "In 2020, the team won 4 titles!"),
                p("accented", "Café crème brûlée recipe"),
                p("plain", "cafe creme brulee recipe"),
            ],
            &no_sampling(),
        )
        .unwrap();
        assert_eq!(kept_ids(&out), ["first", "other", "accented"]);
        let dups: Vec<(&str, &str)> = out
            .report
            .duplicates
            .iter()
            .map(|d| (d.id.as_str(), d.kept.as_str()))
            .collect();
        assert_eq!(dups, [("second", "first"), ("plain", "accented")]);
    }

    #[test]
    fn duplicate_chains_name_the_passage_kept() {
        // "cc dd ee" ends "bb cc dd ee" (caught reversed), which sits inside
        // "aa bb cc dd ee ff" (caught reversed too: "ee dd cc bb" < "ff ee dd cc bb aa").
        let out = prepare_passages(
            [
                p("mid", "bb cc dd ee"),
                p("big", "aa bb cc dd ee ff"),
                p("small", "cc dd ee"),
            ],
            &PrepareOptions {
                min_chars: 1,
                ..no_sampling()
            },
        )
        .unwrap();
        assert_eq!(kept_ids(&out), ["big"]);
        let small = out
            .report
            .duplicates
            .iter()
            .find(|d| d.id == "small")
            .unwrap();
        assert_eq!(
            (small.duplicate_of.as_str(), small.kept.as_str()),
            ("mid", "big")
        );
    }

    #[test]
    fn digits_only_passages_are_reported_as_empty_and_dedup_can_be_off() {
        let corpus = [
            p("nums", "12 345 6789 00"),
            p("a", "words here, twice"),
            p("b", "words here twice"),
        ];
        let out = prepare_passages(corpus.clone(), &no_sampling()).unwrap();
        assert_eq!(kept_ids(&out), ["a"]);
        assert_eq!(out.report.empty_normalised, ["nums"]);
        let off = PrepareOptions {
            dedup: false,
            ..no_sampling()
        };
        let out = prepare_passages(corpus, &off).unwrap();
        assert_eq!(kept_ids(&out), ["nums", "a", "b"]);
    }

    #[test]
    fn sampling_keeps_the_smallest_hashes_in_input_order_and_holds_out_inside_it() {
        let corpus: Vec<Passage> = (0..50)
            .map(|i| p(&format!("doc{i}"), &distinct_text(i)))
            .collect();
        let ids: Vec<String> = corpus.iter().map(|c| c.id.clone()).collect();
        let options = PrepareOptions {
            max_passages: Some(20),
            held_out: 5,
            seed: 7,
            ..PrepareOptions::default()
        };
        let out = prepare_passages(corpus.clone(), &options).unwrap();
        assert_eq!(out.passages.len(), 20);
        assert_eq!(out.report.sampled_out, 30);
        let chosen = held_out_passages(&ids, 20, 7);
        let expected: Vec<&str> = (0..50)
            .filter(|i| chosen.contains(&(*i as u32)))
            .map(|i| ids[i].as_str())
            .collect();
        assert_eq!(kept_ids(&out), expected);
        let held: Vec<&str> = out
            .passages
            .iter()
            .filter(|s| s.held_out)
            .map(|s| s.passage.id.as_str())
            .collect();
        let mine = held_out_passages(&ids, 5, 7);
        let mine_ids: Vec<&str> = (0..50)
            .filter(|i| mine.contains(&(*i as u32)))
            .map(|i| ids[i].as_str())
            .collect();
        assert_eq!(held, mine_ids);
        assert_eq!(out.report.held_out, mine_ids);

        // Adding passages only ever pushes others out; the held-out set stays.
        let mut grown = corpus;
        grown.extend((50..60).map(|i| p(&format!("doc{i}"), &distinct_text(i))));
        let again = prepare_passages(grown, &options).unwrap();
        let held_again: Vec<&str> = again
            .passages
            .iter()
            .filter(|s| s.held_out)
            .map(|s| s.passage.id.as_str())
            .collect();
        assert!(held_again.iter().all(|id| held.contains(id)));
    }

    #[test]
    fn a_held_out_passage_dropped_by_a_filter_is_reported() {
        let ids: Vec<String> = (0..30).map(|i| format!("p{i}")).collect();
        let held = held_out_passages(&ids, 1, 3);
        let victim = *held.iter().next().unwrap() as usize;
        let corpus: Vec<Passage> = (0..30)
            .map(|i| {
                let text = if i == victim {
                    "short".into()
                } else {
                    distinct_text(i)
                };
                p(&ids[i], &text)
            })
            .collect();
        let options = PrepareOptions {
            held_out: 1,
            seed: 3,
            ..PrepareOptions::default()
        };
        let out = prepare_passages(corpus, &options).unwrap();
        assert_eq!(out.report.held_out_dropped, [ids[victim].clone()]);
        assert_eq!(out.report.too_short, [ids[victim].clone()]);
        assert!(out.report.held_out.is_empty());
        assert!(out.passages.iter().all(|s| !s.held_out));
        let r = &out.report;
        assert_eq!(r.kept, 29);
        assert_eq!(
            r.read,
            r.kept
                + r.too_short.len()
                + r.empty_normalised.len()
                + r.duplicates.len()
                + r.sampled_out
        );
    }

    #[test]
    fn bad_options_and_duplicate_ids_are_errors_naming_the_field_or_id() {
        let err = Preparer::new(PrepareOptions {
            max_passages: Some(10),
            held_out: 11,
            ..PrepareOptions::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("`held_out`"), "{err}");
        let err = prepare_passages(
            [
                p("x", "some text here"),
                p("y", "other text here"),
                p("x", "third text here"),
            ],
            &no_sampling(),
        )
        .unwrap_err();
        assert_eq!(
            err,
            PrepareError::DuplicateId {
                id: "x".into(),
                first: 1,
                second: 3
            }
        );
    }
}
