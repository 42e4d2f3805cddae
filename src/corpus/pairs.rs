//! (query, passage) pairs to score, one pair per line: JSON lines or TSV.
//!
//! - **JSON lines**: `{"id": ..., "query": "...", "passage": "..."}`. `query` and
//!   `passage` are required strings (empty ones are allowed). `id` is optional: a
//!   non-empty string or a JSON integer (read as its decimal string); missing or null,
//!   the pair's id is its line number. Any other key is ignored, whatever its type.
//! - **TSV**, no quoting or escaping: `query<TAB>passage` or `id<TAB>query<TAB>passage`.
//!   The first non-blank line is a header, and skipped, when its column names are exactly
//!   a layout's (`query passage` or `id query passage`, `_id` accepted for `id`, any
//!   case). The header, or else the first row with 2 or 3 columns, fixes the layout of the
//!   file; a row with another number of columns is a bad record. An id column must be
//!   non-empty; without one, the pair's id is its line number.
//!
//! A line number is 1-based and counts every line of the file (header and blank lines
//! included), so a default id always points at its line. Ids are unique within a file: a
//! repeated one (an explicit id equal to another pair's line number included) is a bad
//! record naming the line where it was first seen. Everything else is as for the other
//! readers (see [`crate::corpus`]): bad records name the file, line and field, invalid
//! UTF-8 is reported on its own line, blank lines are passed over, and the
//! [`BadRecordPolicy`](super::BadRecordPolicy) of [`ReadOptions`] decides between
//! stopping and quarantining.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::jsonl::{describe, json_error, utf8};
use super::lines::{is_blank, ByteLines, Line, MAX_LINE_BYTES};
use super::{
    bad_record, format_of, CorpusError, Driver, Format, Item, ReadOptions, SeenIds, Source,
};
use crate::bad_record::BadRecord;

/// One (query, passage) pair to score.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    pub id: String,
    pub query: String,
    pub passage: String,
}

/// Keys of a JSON-lines pair, and the column names of a TSV header.
const ID: &str = "id";
const QUERY: &str = "query";
const PASSAGE: &str = "passage";

/// A TSV file's layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    /// `id<TAB>query<TAB>passage`.
    WithId,
    /// `query<TAB>passage`; the id is the line number.
    WithoutId,
}

impl Layout {
    const ALL: [Layout; 2] = [Layout::WithId, Layout::WithoutId];

    fn names(self) -> &'static [&'static str] {
        match self {
            Layout::WithId => &[ID, QUERY, PASSAGE],
            Layout::WithoutId => &[QUERY, PASSAGE],
        }
    }

    fn of_width(width: usize) -> Option<Layout> {
        Layout::ALL.into_iter().find(|l| l.names().len() == width)
    }

    /// The layout whose column names `columns` spell, if any.
    fn of_header(columns: &[&str]) -> Option<Layout> {
        Layout::ALL.into_iter().find(|l| {
            let names = l.names();
            names.len() == columns.len()
                && names.iter().zip(columns).all(|(name, column)| {
                    let column = column.trim().to_ascii_lowercase();
                    column == *name || (*name == ID && column == "_id")
                })
        })
    }

    /// "3 tab-separated columns (id, query, passage)".
    fn describe(self) -> String {
        let names = self.names();
        format!(
            "{} tab-separated columns ({})",
            names.len(),
            names.join(", ")
        )
    }
}

/// What the lines of the file are.
enum Syntax {
    Jsonl,
    Tsv {
        /// Fixed by the header or the first row with a valid number of columns.
        layout: Option<Layout>,
        /// Whether a non-blank line has been seen (only the first may be a header).
        started: bool,
    },
}

/// A pairs file read record by record.
pub(crate) struct PairSource {
    lines: ByteLines,
    seen: SeenIds,
    syntax: Syntax,
}

impl PairSource {
    fn open(path: &Path, format: Format) -> Result<Self, CorpusError> {
        let syntax = match format {
            Format::JsonLines => Syntax::Jsonl,
            Format::Tsv => Syntax::Tsv {
                layout: None,
                started: false,
            },
            Format::Parquet => {
                return Err(CorpusError::UnknownFormat {
                    path: path.to_path_buf(),
                    expected: EXPECTED_EXTENSIONS,
                })
            }
        };
        Ok(PairSource {
            lines: ByteLines::open(path)?,
            seen: SeenIds::default(),
            syntax,
        })
    }

    /// Parses one non-blank line; `Ok(None)` for a TSV header.
    fn parse(&mut self, bytes: &[u8], line: u64) -> Result<Option<Pair>, BadRecord> {
        let file = self.lines.path();
        let (pair, explicit_id) = match &mut self.syntax {
            Syntax::Jsonl => parse_json(bytes, file, line)?,
            Syntax::Tsv { layout, started } => {
                let first = !*started;
                *started = true;
                match parse_tsv(bytes, file, line, layout, first)? {
                    Some(parsed) => parsed,
                    None => return Ok(None),
                }
            }
        };
        // A TSV file without an id column numbers its pairs by line: unique by
        // construction, so their ids need not be remembered.
        if explicit_id || matches!(self.syntax, Syntax::Jsonl) {
            self.seen.check(&pair.id, file, line, ID)?;
        }
        Ok(Some(pair))
    }
}

impl Source for PairSource {
    type Record = Pair;

    fn next_item(&mut self) -> Result<Option<Item<Pair>>, CorpusError> {
        loop {
            let (number, bytes) = match self.lines.next_line()? {
                None => return Ok(None),
                Some(Line::TooLong { number, prefix }) => {
                    if let Syntax::Tsv { started, .. } = &mut self.syntax {
                        *started = true;
                    }
                    let reason = format!(
                        "expected a line of at most {MAX_LINE_BYTES} bytes, found a longer one"
                    );
                    let error = bad_record(self.lines.path(), number, None, reason);
                    return Ok(Some(Item::Bad { error, raw: prefix }));
                }
                Some(Line::Text { number, bytes }) => (number, bytes),
            };
            if is_blank(&bytes) {
                continue;
            }
            match self.parse(&bytes, number) {
                Ok(None) => continue,
                Ok(Some(pair)) => return Ok(Some(Item::Good(pair))),
                Err(error) => return Ok(Some(Item::Bad { error, raw: bytes })),
            }
        }
    }
}

/// One JSON line as a pair, and whether its id was given.
fn parse_json(bytes: &[u8], file: &Path, line: u64) -> Result<(Pair, bool), BadRecord> {
    let text = utf8(bytes, file, line)?;
    let value: Value = serde_json::from_str(text).map_err(|e| {
        let reason = format!(
            "expected a JSON object, found malformed JSON ({})",
            json_error(&e)
        );
        bad_record(file, line, None, reason)
    })?;
    let mut object = match value {
        Value::Object(object) => object,
        other => {
            let reason = format!("expected a JSON object, found {}", describe(&other));
            return Err(bad_record(file, line, None, reason));
        }
    };
    let bad_id = |found: String| {
        let reason = format!("expected a non-empty string or an integer, found {found}");
        bad_record(file, line, Some(ID), reason)
    };
    let (id, explicit) = match object.remove(ID) {
        None | Some(Value::Null) => (line.to_string(), false),
        Some(Value::String(s)) if s.is_empty() => return Err(bad_id("an empty string".into())),
        Some(Value::String(s)) => (s, true),
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => (n.to_string(), true),
        Some(other) => return Err(bad_id(describe(&other))),
    };
    let mut text_field = |field: &str| match object.remove(field) {
        Some(Value::String(s)) => Ok(s),
        found => {
            let found = found.map_or_else(|| "no such field".to_string(), |v| describe(&v));
            let reason = format!("expected a string, found {found}");
            Err(bad_record(file, line, Some(field), reason))
        }
    };
    let query = text_field(QUERY)?;
    let passage = text_field(PASSAGE)?;
    Ok((Pair { id, query, passage }, explicit))
}

/// One TSV line as a pair and whether its id was given; `Ok(None)` for a header (only
/// the `first` non-blank line may be one). Fixes `layout` when it is not yet fixed.
fn parse_tsv(
    bytes: &[u8],
    file: &Path,
    line: u64,
    layout: &mut Option<Layout>,
    first: bool,
) -> Result<Option<(Pair, bool)>, BadRecord> {
    let text = utf8(bytes, file, line)?;
    let columns: Vec<&str> = text.split('\t').collect();
    if first {
        if let Some(header) = Layout::of_header(&columns) {
            *layout = Some(header);
            return Ok(None);
        }
    }
    let this = match *layout {
        Some(fixed) => fixed,
        None => match Layout::of_width(columns.len()) {
            Some(found) => {
                *layout = Some(found);
                found
            }
            None => {
                let short = Layout::WithoutId.names();
                let reason = format!(
                    "expected {} or {} ({}), found {} columns",
                    Layout::WithId.describe(),
                    short.len(),
                    short.join(", "),
                    columns.len()
                );
                return Err(bad_record(file, line, None, reason));
            }
        },
    };
    let pair = |id: String, query: &str, passage: &str| Pair {
        id,
        query: query.to_string(),
        passage: passage.to_string(),
    };
    match (this, columns.as_slice()) {
        (Layout::WithId, [id, query, passage]) => {
            if id.is_empty() {
                let reason = "expected a non-empty id, found an empty column";
                return Err(bad_record(file, line, Some(ID), reason));
            }
            Ok(Some((pair(id.to_string(), query, passage), true)))
        }
        (Layout::WithoutId, [query, passage]) => {
            Ok(Some((pair(line.to_string(), query, passage), false)))
        }
        _ => {
            let reason = format!(
                "expected {}, found {} columns",
                this.describe(),
                columns.len()
            );
            Err(bad_record(file, line, None, reason))
        }
    }
}

/// The extensions a pairs file may have.
const EXPECTED_EXTENSIONS: &str = ".jsonl, .json or .tsv";

/// Pairs of one file, in file order. See the module docs for the contract.
pub struct PairReader {
    driver: Driver<PairSource>,
    path: PathBuf,
}

impl PairReader {
    /// The file being read.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How many bad records this reader has quarantined so far.
    pub fn skipped(&self) -> u64 {
        self.driver.skipped
    }
}

impl std::fmt::Debug for PairReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PairReader")
            .field("path", &self.path)
            .field("skipped", &self.driver.skipped)
            .field("done", &self.driver.done)
            .finish()
    }
}

impl Iterator for PairReader {
    type Item = Result<Pair, CorpusError>;
    fn next(&mut self) -> Option<Self::Item> {
        self.driver.next_record()
    }
}

/// Opens a pairs file (JSON lines or TSV, see the module docs) for streaming.
pub fn open_pairs(path: &Path, opts: &ReadOptions) -> Result<PairReader, CorpusError> {
    let format = format_of(path, opts, EXPECTED_EXTENSIONS)?;
    let source = PairSource::open(path, format)?;
    Ok(PairReader {
        driver: Driver::new(source, path, opts.policy.clone()),
        path: path.to_path_buf(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is its job
mod tests {
    use super::*;
    use crate::corpus::{BadRecordPolicy, Quarantine};

    /// Every item of a pairs file named `name` holding `body`.
    fn read(name: &str, body: &[u8]) -> Vec<Result<Pair, BadRecord>> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        std::fs::write(&path, body).unwrap();
        let format = Format::from_extension(&path).unwrap();
        let mut source = PairSource::open(&path, format).unwrap();
        let mut out = Vec::new();
        while let Some(item) = source.next_item().unwrap() {
            out.push(match item {
                Item::Good(pair) => Ok(pair),
                Item::Bad { error, .. } => Err(error),
            });
        }
        out
    }

    fn pair(id: &str, query: &str, passage: &str) -> Pair {
        Pair {
            id: id.into(),
            query: query.into(),
            passage: passage.into(),
        }
    }

    /// The line, field and reason of a bad record.
    fn bad(item: &Result<Pair, BadRecord>) -> (u64, Option<&str>, &str) {
        let bad = item.as_ref().unwrap_err();
        (
            bad.location.line,
            bad.location.field.as_deref(),
            bad.reason.as_str(),
        )
    }

    #[test]
    fn json_ids_are_given_or_the_line_number() {
        let body = "{\"id\":\"q1-d7\",\"query\":\"q\",\"passage\":\"p\"}\n\
            \n\
            {\"query\":\"what?\",\"passage\":\"\",\"label\":[1]}\n\
            {\"id\":42,\"query\":\"a\",\"passage\":\"b\"}\n\
            {\"id\":null,\"query\":\"c\",\"passage\":\"d\"}\n";
        assert_eq!(
            read("p.jsonl", body.as_bytes()),
            vec![
                Ok(pair("q1-d7", "q", "p")),
                // Line 3: the blank line 2 counts.
                Ok(pair("3", "what?", "")),
                Ok(pair("42", "a", "b")),
                Ok(pair("5", "c", "d")),
            ]
        );
    }

    #[test]
    fn bad_json_records_name_line_and_field() {
        let body = "{\"query\":\"q\",\"passage\":\"p\"\n\
            [\"q\",\"p\"]\n\
            {\"passage\":\"p\"}\n\
            {\"query\":\"q\",\"passage\":7}\n\
            {\"id\":\"\",\"query\":\"q\",\"passage\":\"p\"}\n\
            {\"id\":1.5,\"query\":\"q\",\"passage\":\"p\"}\n\
            {\"query\":\"ok\",\"passage\":\"fine\"}\n";
        let got = read("p.jsonl", body.as_bytes());
        assert_eq!(
            bad(&got[0]),
            (
                1,
                None,
                "expected a JSON object, found malformed JSON (EOF while parsing an object at column 26)"
            )
        );
        assert_eq!(
            bad(&got[1]),
            (2, None, "expected a JSON object, found an array")
        );
        assert_eq!(
            bad(&got[2]),
            (3, Some("query"), "expected a string, found no such field")
        );
        assert_eq!(
            bad(&got[3]),
            (4, Some("passage"), "expected a string, found a number (7)")
        );
        assert_eq!(
            bad(&got[4]),
            (
                5,
                Some("id"),
                "expected a non-empty string or an integer, found an empty string"
            )
        );
        assert_eq!(
            bad(&got[5]),
            (
                6,
                Some("id"),
                "expected a non-empty string or an integer, found a number (1.5)"
            )
        );
        assert_eq!(got[6], Ok(pair("7", "ok", "fine")));
    }

    #[test]
    fn duplicate_ids_name_the_first_line_even_against_a_line_number() {
        let body = "{\"query\":\"a\",\"passage\":\"b\"}\n\
            {\"id\":\"x\",\"query\":\"a\",\"passage\":\"b\"}\n\
            {\"id\":\"1\",\"query\":\"a\",\"passage\":\"b\"}\n\
            {\"id\":\"x\",\"query\":\"a\",\"passage\":\"b\"}\n";
        let got = read("p.jsonl", body.as_bytes());
        assert_eq!(got[0], Ok(pair("1", "a", "b")));
        assert_eq!(got[1], Ok(pair("x", "a", "b")));
        assert_eq!(
            bad(&got[2]),
            (
                3,
                Some("id"),
                "expected a unique id, found `1` again (first seen on line 1)"
            )
        );
        assert_eq!(
            bad(&got[3]),
            (
                4,
                Some("id"),
                "expected a unique id, found `x` again (first seen on line 2)"
            )
        );
    }

    #[test]
    fn invalid_utf8_is_reported_on_its_line() {
        let got = read(
            "p.jsonl",
            b"{\"query\":\"a\",\"passage\":\"b\"}\n{\"query\":\"\xff\",\"passage\":\"b\"}\n",
        );
        assert_eq!(got[0], Ok(pair("1", "a", "b")));
        assert_eq!(
            bad(&got[1]),
            (
                2,
                None,
                "expected UTF-8 text, found invalid byte 0xFF at byte 11"
            )
        );
    }

    #[test]
    fn tsv_without_ids_numbers_pairs_by_line() {
        let got = read("p.tsv", b"what is dna\tDNA is...\r\n\nq2\tp2\n");
        assert_eq!(
            got,
            vec![
                Ok(pair("1", "what is dna", "DNA is...")),
                Ok(pair("3", "q2", "p2"))
            ]
        );
        // With a header, the first pair is on line 2.
        let got = read("p.tsv", b"Query\tPassage\nq\tp\n");
        assert_eq!(got, vec![Ok(pair("2", "q", "p"))]);
    }

    #[test]
    fn tsv_with_ids_and_a_header() {
        let got = read("p.tsv", b"_ID\tquery\tpassage\nd1\tq\tp\nd2\tq\t\n");
        assert_eq!(got, vec![Ok(pair("d1", "q", "p")), Ok(pair("d2", "q", ""))]);
        // Without a header the first row's width fixes the layout.
        let got = read("p.tsv", b"d1\tq\tp\n");
        assert_eq!(got, vec![Ok(pair("d1", "q", "p"))]);
    }

    #[test]
    fn tsv_bad_rows_are_named() {
        let got = read("p.tsv", b"lonely\nq\tp\na\tb\tc\n\ty\n");
        assert_eq!(
            bad(&got[0]),
            (
                1,
                None,
                "expected 3 tab-separated columns (id, query, passage) or 2 (query, passage), \
                 found 1 columns"
            )
        );
        assert_eq!(got[1], Ok(pair("2", "q", "p")));
        assert_eq!(
            bad(&got[2]),
            (
                3,
                None,
                "expected 2 tab-separated columns (query, passage), found 3 columns"
            )
        );
        // `\ty` has two columns: an empty query is allowed.
        assert_eq!(got[3], Ok(pair("4", "", "y")));

        let got = read("p.tsv", b"d1\tq\tp\n\tq\tp\nd1\tq\tp\n");
        assert_eq!(
            bad(&got[1]),
            (
                2,
                Some("id"),
                "expected a non-empty id, found an empty column"
            )
        );
        assert_eq!(
            bad(&got[2]),
            (
                3,
                Some("id"),
                "expected a unique id, found `d1` again (first seen on line 1)"
            )
        );
    }

    #[test]
    fn open_pairs_applies_the_policy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pairs.jsonl");
        let body = "{\"query\":\"a\",\"passage\":\"b\"}\n{\"query\":\"c\"}\n\
            {\"query\":\"e\",\"passage\":\"f\"}\n";
        std::fs::write(&path, body).unwrap();

        let mut reader = open_pairs(&path, &ReadOptions::default()).unwrap();
        assert_eq!(reader.next().unwrap().unwrap().id, "1");
        let err = reader.next().unwrap().unwrap_err().to_string();
        assert!(
            err.ends_with("pairs.jsonl:2 field `passage`: expected a string, found no such field"),
            "{err}"
        );
        assert!(reader.next().is_none());

        let quarantine = Quarantine::open(&dir.path().join("q.jsonl")).unwrap();
        let opts = ReadOptions {
            policy: BadRecordPolicy::Skip(quarantine.clone()),
            ..ReadOptions::default()
        };
        let mut reader = open_pairs(&path, &opts).unwrap();
        let ids: Vec<String> = reader.by_ref().map(|p| p.unwrap().id).collect();
        assert_eq!(ids, vec!["1", "3"]);
        assert_eq!(reader.skipped(), 1);
        assert_eq!(quarantine.finish().unwrap(), 1);
    }

    #[test]
    fn formats_by_extension_or_option() {
        let dir = tempfile::tempdir().unwrap();
        let err = open_pairs(&dir.path().join("p.parquet"), &ReadOptions::default()).unwrap_err();
        assert!(matches!(err, CorpusError::UnknownFormat { .. }), "{err}");
        let path = dir.path().join("pairs.txt");
        std::fs::write(&path, "q\tp\n").unwrap();
        let err = open_pairs(&path, &ReadOptions::default()).unwrap_err();
        assert!(matches!(err, CorpusError::UnknownFormat { .. }), "{err}");
        let opts = ReadOptions {
            format: Some(Format::Tsv),
            ..ReadOptions::default()
        };
        let got: Vec<Pair> = open_pairs(&path, &opts)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(got, vec![pair("1", "q", "p")]);
    }
}
