//! The near-duplicate rule of RECIPE.md section 1, on normalised strings.
//!
//! [`normalise`] maps a passage's text to the string compared. [`near_duplicates`] sorts
//! the strings and calls a string a duplicate when it is a substring of one of the next
//! `window` strings in that order, once with the strings sorted as written and once sorted
//! as if reversed. A string contained in another sorts right before it when it is a prefix
//! of it, and in reversed order when it is a suffix; reversal keeps the substring
//! relation, so the same `contains` test serves both orders. Both passes look at the full
//! sorted list: a verdict never depends on another passage having been dropped. Equal
//! strings sort by position, the later first, so that of several equal strings only the
//! first is kept. An empty string (a text of digits and punctuation only) is contained in
//! every string and gets its own verdict, [`Verdict::Empty`].

use serde::{Deserialize, Serialize};
use unicode_normalization::char::is_combining_mark;
use unicode_normalization::UnicodeNormalization;

/// Which sorted order found a duplicate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DedupOrder {
    /// Strings sorted as written (the duplicate is a prefix or an inner part).
    Forward,
    /// Strings sorted as if reversed (the duplicate is a suffix).
    Reversed,
}

/// The normalised form the near-duplicate rule compares: NFKC; lowercase; NFD with the
/// combining marks dropped (accents stripped; lowercasing first so that marks it
/// introduces, as in `İ` -> `i̇`, go too); then only letters and whitespace are kept
/// (digits, punctuation, symbols and control characters are dropped: "drop digits and
/// punctuation" of the recipe, read as "keep the letters"); finally runs of whitespace
/// become one space and the ends are trimmed, so that passages differing only in spacing
/// or in where a dropped digit stood compare equal.
pub fn normalise(text: &str) -> String {
    if text.is_ascii() {
        normalise_ascii(text)
    } else {
        normalise_unicode(text)
    }
}

/// [`normalise`] through the Unicode passes, for any text.
fn normalise_unicode(text: &str) -> String {
    let lowered = text.nfkc().collect::<String>().to_lowercase();
    let mut out = String::with_capacity(lowered.len());
    let mut pending_space = false;
    for c in lowered.nfd() {
        if is_combining_mark(c) {
            continue;
        }
        if c.is_whitespace() {
            pending_space = !out.is_empty();
        } else if c.is_alphabetic() {
            if pending_space {
                out.push(' ');
                pending_space = false;
            }
            out.push(c);
        }
    }
    out
}

/// Bytes of a string's start [`has_prefix_somewhere`] looks for.
const PREFILTER_BYTES: usize = 8;

/// Whether the first [`PREFILTER_BYTES`] of `needle` occur somewhere in `haystack`: a
/// necessary condition for `needle` to occur, checked at each place of its first byte.
fn has_prefix_somewhere(haystack: &[u8], needle: &[u8]) -> bool {
    let prefix = &needle[..needle.len().min(PREFILTER_BYTES)];
    let Some((&first, _)) = prefix.split_first() else {
        return true;
    };
    let last_start = haystack.len().saturating_sub(needle.len());
    memchr::memchr_iter(first, &haystack[..haystack.len().min(last_start + 1)])
        .any(|at| haystack[at..].starts_with(prefix))
}

/// [`normalise`] of an ASCII text, without the Unicode passes: NFKC and NFD leave ASCII
/// as it is, it has no combining marks, and its lowercase is ASCII's (most corpora are
/// mostly ASCII, and the Unicode passes were most of preparation's time).
fn normalise_ascii(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut pending_space = false;
    for c in text.chars() {
        if c.is_whitespace() {
            pending_space = !out.is_empty();
        } else if c.is_ascii_alphabetic() {
            if pending_space {
                out.push(' ');
                pending_space = false;
            }
            out.push(c.to_ascii_lowercase());
        }
    }
    out
}

/// What the near-duplicate rule says of one string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Unique,
    /// The string is empty.
    Empty,
    /// Contained in string `of` (an index), found in `order`.
    Duplicate {
        of: usize,
        order: DedupOrder,
    },
}

/// The verdict on each of `normalised` (in input order; see the module docs), all in
/// memory: the rule's definition, which preparation runs through `mark_in_order` over
/// sorted runs on disk.
pub fn near_duplicates(normalised: &[&str], window: usize) -> Vec<Verdict> {
    let mut verdicts = vec![Verdict::Unique; normalised.len()];
    let mut forward: Vec<(u32, String)> = Vec::with_capacity(normalised.len());
    let mut reversed: Vec<(u32, String)> = Vec::with_capacity(normalised.len());
    for (i, s) in normalised.iter().enumerate() {
        if s.is_empty() {
            verdicts[i] = Verdict::Empty;
        } else {
            forward.push((i as u32, s.to_string()));
            reversed.push((i as u32, reverse(s)));
        }
    }
    for (order, mut sorted) in [
        (DedupOrder::Forward, forward),
        (DedupOrder::Reversed, reversed),
    ] {
        sorted.sort_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)));
        let items = sorted.into_iter().map(Ok::<_, std::convert::Infallible>);
        let Ok(()) = mark_in_order(items, window, order, &mut verdicts);
    }
    verdicts
}

/// `s` with its characters in reverse order. Sorting reversed strings is sorting by
/// their reversals (UTF-8 byte order is code point order), and reversal keeps the
/// substring relation, so the reversed pass compares reversed strings as written.
pub fn reverse(s: &str) -> String {
    s.chars().rev().collect()
}

/// Marks, in `verdicts`, every string of `sorted` (items `(index, string)` in the rule's
/// order: by string, equal strings the larger index first) still [`Verdict::Unique`]
/// that is contained in one of the next `window` strings: one pass of the rule, reading
/// `sorted` once and holding `window + 1` strings.
pub fn mark_in_order<E>(
    sorted: impl Iterator<Item = Result<(u32, String), E>>,
    window: usize,
    order: DedupOrder,
    verdicts: &mut [Verdict],
) -> Result<(), E> {
    let mut ahead: std::collections::VecDeque<(u32, String)> =
        std::collections::VecDeque::with_capacity(window + 1);
    let mut judge_first = |ahead: &std::collections::VecDeque<(u32, String)>| {
        let (i, s) = &ahead[0];
        if verdicts[*i as usize] != Verdict::Unique {
            return;
        }
        // A byte match of a whole UTF-8 string inside another is a match of characters:
        // UTF-8 never matches across a boundary. Most strings are in no neighbour, and a
        // neighbour without the string's first bytes cannot hold it: that is checked
        // first, and the full searcher (whose construction costs about a search) is built
        // once, only for a string some neighbour might hold.
        let needle = s.as_bytes();
        let mut searcher = None;
        if let Some((of, _)) = ahead.iter().skip(1).take(window).find(|(_, t)| {
            let t = t.as_bytes();
            t.len() >= needle.len()
                && has_prefix_somewhere(t, needle)
                && searcher
                    .get_or_insert_with(|| memchr::memmem::Finder::new(needle))
                    .find(t)
                    .is_some()
        }) {
            verdicts[*i as usize] = Verdict::Duplicate {
                of: *of as usize,
                order,
            };
        }
    };
    for item in sorted {
        ahead.push_back(item?);
        if ahead.len() > window {
            judge_first(&ahead);
            ahead.pop_front();
        }
    }
    while !ahead.is_empty() {
        judge_first(&ahead);
        ahead.pop_front();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use Verdict::{Duplicate, Empty, Unique};

    #[test]
    fn the_prefilter_never_rejects_a_string_that_occurs() {
        // Random strings over a small alphabet (so that substrings are common), every
        // pair: whenever one contains the other, the prefilter lets it through.
        let mut x = 3u64;
        let mut next = |m: u64| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 33) % m
        };
        let strings: Vec<String> = (0..200)
            .map(|_| {
                let len = 1 + next(24) as usize;
                (0..len)
                    .map(|_| ['a', 'b', ' ', 'é'][next(4) as usize])
                    .collect()
            })
            .collect();
        let mut found = 0;
        for t in &strings {
            for s in &strings {
                let (tb, sb) = (t.as_bytes(), s.as_bytes());
                let filtered = tb.len() >= sb.len() && has_prefix_somewhere(tb, sb);
                if t.contains(s.as_str()) {
                    found += 1;
                    assert!(filtered, "{s:?} in {t:?}");
                }
            }
        }
        assert!(found > 1000, "{found}");
        assert!(!has_prefix_somewhere(b"xxabcdefgh", b"abcdefgz"));
        assert!(has_prefix_somewhere(b"xxabcdefghijkl", b"abcdefghXYZ"));
        // A start too late for the whole string to fit is no start.
        assert!(!has_prefix_somewhere(b"xxabcdefghij", b"abcdefghXYZ"));
    }

    #[test]
    fn the_ascii_path_equals_the_unicode_passes() {
        // Every ASCII character, alone, between letters and in runs, through the ASCII
        // path and through the Unicode passes.
        let mut texts: Vec<String> = (0u8..128)
            .map(|b| format!("Ab{}cD {} e", b as char, b as char))
            .collect();
        let all: String = (0u8..128).map(|b| b as char).collect();
        texts.push(all.clone());
        texts.push(all.chars().rev().collect());
        texts.push("  Mixed\tCASE\x0bwith\x0cfeeds\r\n and  1,234 digits.  ".into());
        for t in &texts {
            assert!(t.is_ascii());
            assert_eq!(normalise_ascii(t), normalise_unicode(t), "{t:?}");
        }
    }

    #[test]
    fn normalise_strips_accents_digits_punctuation_and_collapses_spaces() {
        assert_eq!(normalise("Café Crème, brûlée!"), "cafe creme brulee");
        assert_eq!(
            normalise("  In 2019,\tthe  team won 3 titles. "),
            "in the team won titles"
        );
        // NFKC folds the ligature and the full-width letters; İ lowercases to i + a mark.
        assert_eq!(normalise("ﬁne ＡＢ İstanbul"), "fine ab istanbul");
        assert_eq!(normalise("well-known e-mail"), "wellknown email");
        assert_eq!(normalise("1234 -- 5678 %"), "");
    }

    #[test]
    fn a_suffix_is_caught_only_in_reversed_order() {
        // Forward, "beta gamma delta" sorts after "alpha beta gamma delta", so nothing
        // after it contains it; reversed, it is a prefix of the other and sorts before it.
        let verdicts = near_duplicates(&["alpha beta gamma delta", "beta gamma delta"], 9);
        let order = DedupOrder::Reversed;
        assert_eq!(verdicts, [Unique, Duplicate { of: 0, order }]);
    }

    #[test]
    fn a_prefix_is_caught_in_forward_order() {
        let verdicts = near_duplicates(&["alpha beta gamma", "alpha beta gamma delta"], 9);
        let order = DedupOrder::Forward;
        assert_eq!(verdicts, [Duplicate { of: 1, order }, Unique]);
    }

    #[test]
    fn of_equal_strings_the_first_is_kept() {
        let verdicts = near_duplicates(&["same text", "other text", "same text", "same text"], 9);
        let order = DedupOrder::Forward;
        assert_eq!(
            verdicts,
            [
                Unique,
                Unique,
                Duplicate { of: 0, order },
                Duplicate { of: 2, order }
            ]
        );
    }

    #[test]
    fn chains_point_one_step_and_empty_strings_have_their_own_verdict() {
        // "cc dd ee" ends "bb cc dd ee" (reversed), which sits inside "aa bb cc dd ee ff"
        // (also found reversed: "ee dd cc bb" < "ff ee dd cc bb aa").
        let verdicts = near_duplicates(&["bb cc dd ee", "aa bb cc dd ee ff", "cc dd ee", ""], 9);
        let order = DedupOrder::Reversed;
        assert_eq!(
            verdicts,
            [
                Duplicate { of: 1, order },
                Unique,
                Duplicate { of: 0, order },
                Empty
            ]
        );
    }

    /// "kiwi" is inside "a kiwi z", which sorts before it forward (so forward never
    /// catches it) and, reversed ("iwik" vs "z iwik a"), after the fillers, whose
    /// reversals start with j, k, l, ...
    fn window_strings(fillers: usize) -> Vec<String> {
        let mut strings = vec!["a kiwi z".to_owned(), "kiwi".to_owned()];
        for last in "jklmnopqrstuvwxy".chars().take(fillers) {
            strings.push(format!("filler text ending {last}"));
        }
        strings
    }

    #[test]
    fn the_window_reaches_the_ninth_neighbour_and_not_the_tenth() {
        let verdict_of_kiwi = |fillers: usize, window: usize| {
            let strings = window_strings(fillers);
            let refs: Vec<&str> = strings.iter().map(String::as_str).collect();
            near_duplicates(&refs, window)[1]
        };
        let caught = Duplicate {
            of: 0,
            order: DedupOrder::Reversed,
        };
        assert_eq!(verdict_of_kiwi(8, 9), caught);
        assert_eq!(verdict_of_kiwi(9, 9), Unique);
        assert_eq!(verdict_of_kiwi(9, 10), caught);
    }
}
