//! Tab-separated passages and queries: one record per line, no quoting or escaping, so a
//! field cannot hold a tab or a newline.
//!
//! Passages are `id<TAB>title<TAB>text` or `id<TAB>text`; queries are `id<TAB>text`.
//! The first non-blank line is a header, and skipped, when its column names are exactly a
//! layout's (`id title text` or `id text`, `_id` accepted for `id`, any case). The
//! header, or else the first row with a valid number of columns, fixes the layout of the
//! file; a row with another number of columns is a bad record. The id must be non-empty;
//! title and text may be empty.

use std::path::Path;

use super::jsonl::utf8;
use super::lines::{is_blank, ByteLines, Line, MAX_LINE_BYTES};
use super::{bad_record, CorpusError, Item, SeenIds, Source};
use crate::bad_record::BadRecord;
use crate::record::{Passage, Query};

/// A record type read from TSV columns.
pub(crate) trait FromColumns: Sized {
    /// The accepted layouts, as column names; the first column is always the id.
    const LAYOUTS: &'static [&'static [&'static str]];
    /// Builds the record from columns laid out as `LAYOUTS[layout]`.
    fn from_columns(layout: usize, columns: &[&str]) -> Self;
}

impl FromColumns for Passage {
    const LAYOUTS: &'static [&'static [&'static str]] =
        &[&["id", "title", "text"], &["id", "text"]];

    fn from_columns(layout: usize, columns: &[&str]) -> Self {
        let get = |i: usize| columns.get(i).copied().unwrap_or_default().to_string();
        if layout == 0 {
            Passage {
                id: get(0),
                title: get(1),
                text: get(2),
            }
        } else {
            Passage {
                id: get(0),
                title: String::new(),
                text: get(1),
            }
        }
    }
}

impl FromColumns for Query {
    const LAYOUTS: &'static [&'static [&'static str]] = &[&["id", "text"]];

    fn from_columns(_layout: usize, columns: &[&str]) -> Self {
        let get = |i: usize| columns.get(i).copied().unwrap_or_default().to_string();
        Query {
            id: get(0),
            text: get(1),
        }
    }
}

/// A TSV file read as records of type `T`.
pub(crate) struct TsvSource<T> {
    lines: ByteLines,
    seen: SeenIds,
    /// Index into `T::LAYOUTS`, once the header or first valid row has fixed it.
    layout: Option<usize>,
    /// Whether a non-blank line has been seen (only the first may be a header).
    started: bool,
    _record: std::marker::PhantomData<fn() -> T>,
}

impl<T: FromColumns> TsvSource<T> {
    pub(crate) fn open(path: &Path) -> Result<Self, CorpusError> {
        Ok(TsvSource {
            lines: ByteLines::open(path)?,
            seen: SeenIds::default(),
            layout: None,
            started: false,
            _record: std::marker::PhantomData,
        })
    }

    /// Parses one non-blank line; `Ok(None)` for a header.
    fn parse(&mut self, bytes: &[u8], line: u64) -> Result<Option<T>, BadRecord> {
        let file = self.lines.path();
        let text = utf8(bytes, file, line)?;
        let columns: Vec<&str> = text.split('\t').collect();
        let first = !self.started;
        self.started = true;
        if first {
            if let Some(layout) = header_layout(T::LAYOUTS, &columns) {
                self.layout = Some(layout);
                return Ok(None);
            }
        }
        let layout = match self.layout {
            Some(layout) if T::LAYOUTS[layout].len() == columns.len() => layout,
            Some(layout) => {
                let reason = format!(
                    "expected {}, found {} columns",
                    describe_layouts(&T::LAYOUTS[layout..=layout]),
                    columns.len()
                );
                return Err(bad_record(file, line, None, reason));
            }
            None => match T::LAYOUTS.iter().position(|l| l.len() == columns.len()) {
                Some(layout) => {
                    self.layout = Some(layout);
                    layout
                }
                None => {
                    let reason = format!(
                        "expected {}, found {} columns",
                        describe_layouts(T::LAYOUTS),
                        columns.len()
                    );
                    return Err(bad_record(file, line, None, reason));
                }
            },
        };
        if columns[0].is_empty() {
            let reason = "expected a non-empty id, found an empty column";
            return Err(bad_record(file, line, Some("id"), reason));
        }
        self.seen.check(columns[0], file, line, "id")?;
        Ok(Some(T::from_columns(layout, &columns)))
    }
}

impl<T: FromColumns> Source for TsvSource<T> {
    type Record = T;

    fn next_item(&mut self) -> Result<Option<Item<T>>, CorpusError> {
        loop {
            let (number, bytes) = match self.lines.next_line()? {
                None => return Ok(None),
                Some(Line::TooLong { number, prefix }) => {
                    self.started = true;
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
                Ok(Some(record)) => return Ok(Some(Item::Good(record))),
                Err(error) => return Ok(Some(Item::Bad { error, raw: bytes })),
            }
        }
    }
}

/// The layout whose column names `columns` spell, if any.
fn header_layout(layouts: &[&[&str]], columns: &[&str]) -> Option<usize> {
    layouts.iter().position(|names| {
        names.len() == columns.len()
            && names.iter().zip(columns).all(|(name, column)| {
                let column = column.trim().to_ascii_lowercase();
                column == *name || (*name == "id" && column == "_id")
            })
    })
}

/// "3 tab-separated columns (id, title, text) or 2 (id, text)".
fn describe_layouts(layouts: &[&[&str]]) -> String {
    let parts: Vec<String> = layouts
        .iter()
        .enumerate()
        .map(|(i, names)| {
            let what = if i == 0 { " tab-separated columns" } else { "" };
            format!("{}{what} ({})", names.len(), names.join(", "))
        })
        .collect();
    parts.join(" or ")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is its job
mod tests {
    use super::*;

    fn read<T: FromColumns>(body: &str) -> Vec<Result<T, BadRecord>> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.tsv");
        std::fs::write(&path, body).unwrap();
        let mut source = TsvSource::<T>::open(&path).unwrap();
        let mut out = Vec::new();
        while let Some(item) = source.next_item().unwrap() {
            out.push(match item {
                Item::Good(record) => Ok(record),
                Item::Bad { error, .. } => Err(error),
            });
        }
        out
    }

    fn passage(id: &str, title: &str, text: &str) -> Passage {
        Passage {
            id: id.into(),
            title: title.into(),
            text: text.into(),
        }
    }

    #[test]
    fn three_columns_with_header() {
        let got = read::<Passage>("id\ttitle\ttext\n1\tT\tbody\n2\t\tno title\n");
        assert_eq!(
            got,
            vec![
                Ok(passage("1", "T", "body")),
                Ok(passage("2", "", "no title"))
            ]
        );
    }

    #[test]
    fn two_columns_without_header() {
        let got = read::<Passage>("1\tfirst\r\n\n2\tsecond\n");
        assert_eq!(
            got,
            vec![
                Ok(passage("1", "", "first")),
                Ok(passage("2", "", "second"))
            ]
        );
    }

    #[test]
    fn header_is_only_the_first_line() {
        // A later "id<TAB>text" row is data (an odd id, but a valid one).
        let got = read::<Passage>("_ID\tText\n1\tx\nid\ttext\n");
        assert_eq!(
            got,
            vec![Ok(passage("1", "", "x")), Ok(passage("id", "", "text"))]
        );
    }

    #[test]
    fn wrong_column_counts_are_bad_records() {
        let got = read::<Passage>("1\tonly-one-more\n2\ta\tb\nlonely\n3\tok\n");
        assert_eq!(got[0], Ok(passage("1", "", "only-one-more")));
        let bad = got[1].clone().unwrap_err();
        assert_eq!((bad.location.line, bad.location.field.clone()), (2, None));
        assert_eq!(
            bad.reason,
            "expected 2 tab-separated columns (id, text), found 3 columns"
        );
        let bad = got[2].clone().unwrap_err();
        assert_eq!(bad.location.line, 3);
        assert_eq!(got[3], Ok(passage("3", "", "ok")));
    }

    #[test]
    fn before_any_valid_row_every_layout_is_listed() {
        let got = read::<Passage>("a\tb\tc\td\n");
        let bad = got[0].clone().unwrap_err();
        assert_eq!(
            bad.reason,
            "expected 3 tab-separated columns (id, title, text) or 2 (id, text), found 4 columns"
        );
    }

    #[test]
    fn empty_and_duplicate_ids_are_bad_records() {
        let got = read::<Passage>("a\tx\n\ty\na\tz\n");
        let empty = got[1].clone().unwrap_err();
        assert_eq!(
            (empty.location.line, empty.location.field.as_deref()),
            (2, Some("id"))
        );
        let dup = got[2].clone().unwrap_err();
        assert_eq!(dup.location.line, 3);
        assert!(
            dup.reason.ends_with("(first seen on line 1)"),
            "{}",
            dup.reason
        );
    }

    #[test]
    fn queries_are_two_columns() {
        let got = read::<Query>("id\ttext\nq1\twhat?\n");
        assert_eq!(
            got,
            vec![Ok(Query {
                id: "q1".into(),
                text: "what?".into()
            })]
        );
        let got = read::<Query>("q1\tt\tx\n");
        assert_eq!(
            got[0].clone().unwrap_err().reason,
            "expected 2 tab-separated columns (id, text), found 3 columns"
        );
    }

    #[test]
    fn invalid_utf8_is_a_bad_record_on_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.tsv");
        std::fs::write(&path, b"1\tok\n2\t\xc3\x28\n").unwrap();
        let mut source = TsvSource::<Passage>::open(&path).unwrap();
        assert!(matches!(source.next_item().unwrap(), Some(Item::Good(_))));
        match source.next_item().unwrap() {
            Some(Item::Bad { error, raw }) => {
                assert_eq!(error.location.line, 2);
                assert_eq!(
                    error.reason,
                    "expected UTF-8 text, found invalid byte 0xC3 at byte 3"
                );
                assert_eq!(raw, b"2\t\xc3\x28");
            }
            _ => panic!("expected a bad record"),
        }
    }
}
