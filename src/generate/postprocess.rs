//! Post-processing of a generator's raw output into one query (RECIPE.md section 2).
//!
//! The steps, in order:
//! 1. Keep the first line that is not blank (lines end at `\n`, `\r\n` or `\r`), trimmed.
//! 2. Strip one leading label the model may echo from the prompt: one of
//!    [`STRIPPED_LABELS`], in any case, followed by a colon (`Query: ...`,
//!    `search query: ...`). Only these exact words count, so `Title IX: rules` stays whole.
//! 3. Strip surrounding quotes, as many pairs as there are (`"'x'"` -> `x`), trimming
//!    after each: straight double and single quotes, curly double (“ ”) and single (‘ ’),
//!    guillemets (« »), German quotes („ “) and backticks. A pair is stripped only when
//!    the text inside does not use that pair's quote characters as quotes again: a text
//!    inside double quotes may hold no double quote (so `"a" or "b"` stays whole), and a
//!    text inside single quotes may hold the closing character only as an apostrophe
//!    between two letters (`'what's new'` -> `what's new`).
//!
//! Nothing left is a failure with its reason ([`EmptyQuery`]), recorded by the caller as
//! [`Generated::Failed`], never as a query.

use super::Generated;

/// Leading labels stripped in step 2: the words our prompts use for the answer, and
/// the names of the built-in query types a model is likely to echo.
pub const STRIPPED_LABELS: [&str; 7] = [
    "query",
    "search query",
    "question",
    "claim",
    "title",
    "keywords",
    "key phrases",
];

/// Quote pairs stripped in step 3: (opening, closing, closing may be an apostrophe).
const QUOTE_PAIRS: [(char, char, bool); 8] = [
    ('"', '"', false),
    ('\'', '\'', true),
    ('\u{201C}', '\u{201D}', false),
    ('\u{2018}', '\u{2019}', true),
    ('\u{00AB}', '\u{00BB}', false),
    ('\u{201E}', '\u{201C}', false),
    ('\u{00BB}', '\u{00AB}', false),
    ('`', '`', false),
];

/// Why a raw output gave no query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EmptyQuery {
    /// The output was empty or whitespace only.
    #[error("the generator returned no text")]
    NoText,
    /// Only a label, quotes or both were left.
    #[error("the generator's first line held only quotes or a label")]
    NothingLeft,
}

/// The query in `raw` (see the module docs).
pub fn postprocess(raw: &str) -> Result<String, EmptyQuery> {
    let line = raw
        .split(['\n', '\r'])
        .map(str::trim)
        .find(|l| !l.is_empty())
        .ok_or(EmptyQuery::NoText)?;
    let mut text = strip_label(line).trim();
    while let Some(inner) = strip_quote_pair(text) {
        text = inner.trim();
    }
    if text.is_empty() {
        return Err(EmptyQuery::NothingLeft);
    }
    Ok(text.to_owned())
}

/// The outcome of one request from its raw output: a [`Generated::Query`], or a
/// [`Generated::Failed`] whose reason names the passage and shows the raw output.
pub fn outcome(passage_id: &str, raw: String, tokens: usize) -> Generated {
    match postprocess(&raw) {
        Ok(text) => Generated::Query { text, raw, tokens },
        Err(why) => Generated::Failed {
            reason: format!("passage `{passage_id}`: {why} (raw output {raw:?})"),
        },
    }
}

fn strip_label(line: &str) -> &str {
    let Some((head, rest)) = line.split_once(':') else {
        return line;
    };
    let head = head.trim();
    if STRIPPED_LABELS
        .iter()
        .any(|label| head.eq_ignore_ascii_case(label))
    {
        rest
    } else {
        line
    }
}

fn strip_quote_pair(text: &str) -> Option<&str> {
    let mut chars = text.chars();
    let first = chars.next()?;
    let last = chars.next_back()?;
    let &(open, close, apostrophe) = QUOTE_PAIRS
        .iter()
        .find(|(open, close, _)| *open == first && *close == last)?;
    let inner = &text[first.len_utf8()..text.len() - last.len_utf8()];
    let chars: Vec<char> = inner.chars().collect();
    let quoting = chars.iter().enumerate().any(|(i, &c)| {
        if c == open && c != close {
            return true;
        }
        if c != close {
            return false;
        }
        let between_letters = i > 0
            && i + 1 < chars.len()
            && chars[i - 1].is_alphabetic()
            && chars[i + 1].is_alphabetic();
        !(apostrophe && between_letters)
    });
    (!quoting).then_some(inner)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is its job
mod tests {
    use super::*;

    #[test]
    fn first_non_empty_line_trimmed() {
        assert_eq!(
            postprocess("\n  \r\n  what causes tides  \nsecond line").unwrap(),
            "what causes tides"
        );
        assert_eq!(postprocess("one\rtwo").unwrap(), "one");
    }

    #[test]
    fn surrounding_quotes_of_every_kind_are_stripped_repeatedly() {
        assert_eq!(
            postprocess("\"how do vaccines work\"").unwrap(),
            "how do vaccines work"
        );
        assert_eq!(
            postprocess("'tax on dividends'").unwrap(),
            "tax on dividends"
        );
        assert_eq!(
            postprocess("“best sourdough starter”").unwrap(),
            "best sourdough starter"
        );
        assert_eq!(
            postprocess("‘rust borrow checker’").unwrap(),
            "rust borrow checker"
        );
        assert_eq!(postprocess("«marathon pacing»").unwrap(), "marathon pacing");
        assert_eq!(postprocess("„Wahlrecht“").unwrap(), "Wahlrecht");
        assert_eq!(postprocess("` ls -la `").unwrap(), "ls -la");
        assert_eq!(postprocess(" \" ' “nested” ' \" ").unwrap(), "nested");
    }

    #[test]
    fn quotes_that_are_part_of_the_query_stay() {
        assert_eq!(postprocess("\"a\" or \"b\"").unwrap(), "\"a\" or \"b\"");
        assert_eq!(
            postprocess("'what's new in 3.12'").unwrap(),
            "what's new in 3.12"
        );
        assert_eq!(postprocess("'a' and 'b'").unwrap(), "'a' and 'b'");
        assert_eq!(postprocess("rock 'n' roll").unwrap(), "rock 'n' roll");
        assert_eq!(postprocess("\"unclosed quote").unwrap(), "\"unclosed quote");
        assert_eq!(postprocess("'").unwrap(), "'");
    }

    #[test]
    fn leading_labels_are_stripped_only_when_they_are_ours() {
        assert_eq!(
            postprocess("Query: \"capital of peru\"").unwrap(),
            "capital of peru"
        );
        assert_eq!(
            postprocess("SEARCH QUERY:   cheap flights").unwrap(),
            "cheap flights"
        );
        assert_eq!(postprocess("Keywords: a, b, c").unwrap(), "a, b, c");
        assert_eq!(
            postprocess("Title IX: what it covers").unwrap(),
            "Title IX: what it covers"
        );
        assert_eq!(
            postprocess("ratio 3:2 explained").unwrap(),
            "ratio 3:2 explained"
        );
    }

    #[test]
    fn empty_results_are_failures_with_a_reason() {
        assert_eq!(postprocess(""), Err(EmptyQuery::NoText));
        assert_eq!(postprocess(" \n\t\r\n"), Err(EmptyQuery::NoText));
        assert_eq!(postprocess("\"\""), Err(EmptyQuery::NothingLeft));
        assert_eq!(postprocess("“ ”\nlater line"), Err(EmptyQuery::NothingLeft));
        assert_eq!(postprocess("Query:"), Err(EmptyQuery::NothingLeft));
        match outcome("doc7", "  \n".into(), 3) {
            Generated::Failed { reason } => {
                assert_eq!(
                    reason,
                    "passage `doc7`: the generator returned no text (raw output \"  \\n\")"
                )
            }
            other => panic!("expected a failure, got {other:?}"),
        }
        assert_eq!(
            outcome("doc7", "\"q\"\n".into(), 4),
            Generated::Query {
                text: "q".into(),
                raw: "\"q\"\n".into(),
                tokens: 4
            }
        );
    }
}
