//! BEIR JSON lines: one object per line.
//!
//! Passages are `{"_id", "title", "text", "metadata"}` and queries `{"_id", "text",
//! "metadata"}`. `_id` and `text` are required; `_id` is a non-empty string or a JSON
//! integer (read as its decimal string). `title` may be missing, null or empty (all read
//! as ""). `metadata` and any other key are ignored, whatever their type.

use std::path::Path;

use serde_json::{Map, Value};

use super::lines::{is_blank, ByteLines, Line, MAX_LINE_BYTES};
use super::{bad_record, CorpusError, Item, SeenIds, Source};
use crate::bad_record::BadRecord;
use crate::record::{Passage, Query};

/// The id key of BEIR files.
const ID_FIELD: &str = "_id";

/// A record type that can be built from one JSON object.
pub(crate) trait FromJson: Sized {
    /// Builds the record from the object on `line` of `file`.
    fn from_json(object: Map<String, Value>, file: &Path, line: u64) -> Result<Self, BadRecord>;
    /// The record's id, for duplicate detection.
    fn id(&self) -> &str;
}

impl FromJson for Passage {
    fn from_json(
        mut object: Map<String, Value>,
        file: &Path,
        line: u64,
    ) -> Result<Self, BadRecord> {
        Ok(Passage {
            id: take_id(&mut object, file, line)?,
            title: take_string(&mut object, "title", false, file, line)?,
            text: take_string(&mut object, "text", true, file, line)?,
        })
    }

    fn id(&self) -> &str {
        &self.id
    }
}

impl FromJson for Query {
    fn from_json(
        mut object: Map<String, Value>,
        file: &Path,
        line: u64,
    ) -> Result<Self, BadRecord> {
        Ok(Query {
            id: take_id(&mut object, file, line)?,
            text: take_string(&mut object, "text", true, file, line)?,
        })
    }

    fn id(&self) -> &str {
        &self.id
    }
}

/// A JSON-lines file read as records of type `T`.
pub(crate) struct JsonlSource<T> {
    lines: ByteLines,
    seen: SeenIds,
    _record: std::marker::PhantomData<fn() -> T>,
}

impl<T: FromJson> JsonlSource<T> {
    pub(crate) fn open(path: &Path) -> Result<Self, CorpusError> {
        Ok(JsonlSource {
            lines: ByteLines::open(path)?,
            seen: SeenIds::default(),
            _record: std::marker::PhantomData,
        })
    }
}

impl<T: FromJson> Source for JsonlSource<T> {
    type Record = T;

    fn next_item(&mut self) -> Result<Option<Item<T>>, CorpusError> {
        loop {
            let (number, bytes) = match self.lines.next_line()? {
                None => return Ok(None),
                Some(Line::TooLong { number, prefix }) => {
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
            let file = self.lines.path();
            let parsed = parse_line::<T>(&bytes, file, number).and_then(|record| {
                self.seen.check(record.id(), file, number, ID_FIELD)?;
                Ok(record)
            });
            return Ok(Some(match parsed {
                Ok(record) => Item::Good(record),
                Err(error) => Item::Bad { error, raw: bytes },
            }));
        }
    }
}

/// Parses one non-blank line into a record.
fn parse_line<T: FromJson>(bytes: &[u8], file: &Path, line: u64) -> Result<T, BadRecord> {
    let text = utf8(bytes, file, line)?;
    let value: Value = serde_json::from_str(text).map_err(|e| {
        bad_record(
            file,
            line,
            None,
            format!(
                "expected a JSON object, found malformed JSON ({})",
                json_error(&e)
            ),
        )
    })?;
    match value {
        Value::Object(object) => T::from_json(object, file, line),
        other => Err(bad_record(
            file,
            line,
            None,
            format!("expected a JSON object, found {}", describe(&other)),
        )),
    }
}

/// Checks that a line is UTF-8, naming the first bad byte's 1-based column.
pub(crate) fn utf8<'a>(bytes: &'a [u8], file: &Path, line: u64) -> Result<&'a str, BadRecord> {
    std::str::from_utf8(bytes).map_err(|e| {
        let at = e.valid_up_to();
        let byte = bytes.get(at).copied().unwrap_or_default();
        bad_record(
            file,
            line,
            None,
            format!(
                "expected UTF-8 text, found invalid byte 0x{byte:02X} at byte {}",
                at + 1
            ),
        )
    })
}

/// serde_json's message, with its "line 1 column N" (always line 1 here) cut to the
/// column, since the line is already in the location.
pub(crate) fn json_error(e: &serde_json::Error) -> String {
    let message = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    match message.strip_suffix(&suffix) {
        Some(head) => format!("{head} at column {}", e.column()),
        None => message,
    }
}

/// A JSON value's type in words, with the value when it is short.
pub(crate) fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".to_string(),
        Value::Bool(b) => format!("a boolean ({b})"),
        Value::Number(n) => format!("a number ({n})"),
        Value::String(s) => format!("a string ({s:?})"),
        Value::Array(_) => "an array".to_string(),
        Value::Object(_) => "an object".to_string(),
    }
}

fn take_id(object: &mut Map<String, Value>, file: &Path, line: u64) -> Result<String, BadRecord> {
    let bad = |found: String| {
        bad_record(
            file,
            line,
            Some(ID_FIELD),
            format!("expected a non-empty string or an integer, found {found}"),
        )
    };
    match object.remove(ID_FIELD) {
        None => Err(bad("no such field".to_string())),
        Some(Value::String(s)) if s.is_empty() => Err(bad("an empty string".to_string())),
        Some(Value::String(s)) => Ok(s),
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => Ok(n.to_string()),
        Some(other) => Err(bad(describe(&other))),
    }
}

/// Takes a string field; a missing or null optional field reads as "".
fn take_string(
    object: &mut Map<String, Value>,
    field: &str,
    required: bool,
    file: &Path,
    line: u64,
) -> Result<String, BadRecord> {
    let bad = |found: String| {
        bad_record(
            file,
            line,
            Some(field),
            format!("expected a string, found {found}"),
        )
    };
    match (object.remove(field), required) {
        (Some(Value::String(s)), _) => Ok(s),
        (None | Some(Value::Null), false) => Ok(String::new()),
        (None, true) => Err(bad("no such field".to_string())),
        (Some(other), _) => Err(bad(describe(&other))),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is its job
mod tests {
    use super::*;

    fn passage(line: &str) -> Result<Passage, BadRecord> {
        parse_line(line.as_bytes(), Path::new("c.jsonl"), 7)
    }

    fn reason_and_field(result: Result<Passage, BadRecord>) -> (String, Option<String>) {
        let bad = result.unwrap_err();
        assert_eq!(bad.location.line, 7);
        (bad.reason, bad.location.field)
    }

    #[test]
    fn reads_a_beir_passage_ignoring_metadata() {
        let p = passage(r#"{"_id": "4983", "title": "T", "text": "body", "metadata": {"k": [1]}}"#)
            .unwrap();
        assert_eq!(
            p,
            Passage {
                id: "4983".into(),
                title: "T".into(),
                text: "body".into()
            }
        );
    }

    #[test]
    fn title_may_be_missing_null_or_empty() {
        for line in [
            r#"{"_id":"a","text":"x"}"#,
            r#"{"_id":"a","title":null,"text":"x"}"#,
            r#"{"_id":"a","title":"","text":"x"}"#,
        ] {
            assert_eq!(passage(line).unwrap().title, "", "{line}");
        }
    }

    #[test]
    fn integer_ids_read_as_decimal_strings() {
        assert_eq!(
            passage(r#"{"_id":31715818,"text":"x"}"#).unwrap().id,
            "31715818"
        );
        assert_eq!(passage(r#"{"_id":-3,"text":"x"}"#).unwrap().id, "-3");
    }

    #[test]
    fn bad_ids_are_named() {
        let (reason, field) = reason_and_field(passage(r#"{"text":"x"}"#));
        assert_eq!(field.as_deref(), Some("_id"));
        assert_eq!(
            reason,
            "expected a non-empty string or an integer, found no such field"
        );
        let (reason, _) = reason_and_field(passage(r#"{"_id":1.5,"text":"x"}"#));
        assert_eq!(
            reason,
            "expected a non-empty string or an integer, found a number (1.5)"
        );
        let (reason, _) = reason_and_field(passage(r#"{"_id":"","text":"x"}"#));
        assert_eq!(
            reason,
            "expected a non-empty string or an integer, found an empty string"
        );
    }

    #[test]
    fn bad_text_and_title_are_named() {
        let (reason, field) = reason_and_field(passage(r#"{"_id":"a"}"#));
        assert_eq!(
            (reason.as_str(), field.as_deref()),
            ("expected a string, found no such field", Some("text"))
        );
        let (reason, field) = reason_and_field(passage(r#"{"_id":"a","text":["x"]}"#));
        assert_eq!(
            (reason.as_str(), field.as_deref()),
            ("expected a string, found an array", Some("text"))
        );
        let (reason, field) = reason_and_field(passage(r#"{"_id":"a","text":null}"#));
        assert_eq!(
            (reason.as_str(), field.as_deref()),
            ("expected a string, found null", Some("text"))
        );
        let (reason, field) = reason_and_field(passage(r#"{"_id":"a","title":3,"text":"x"}"#));
        assert_eq!(
            (reason.as_str(), field.as_deref()),
            ("expected a string, found a number (3)", Some("title"))
        );
    }

    #[test]
    fn malformed_json_and_non_objects_are_named() {
        let (reason, field) = reason_and_field(passage(r#"{"_id":"a","text":"x""#));
        assert_eq!(field, None);
        assert_eq!(reason, "expected a JSON object, found malformed JSON (EOF while parsing an object at column 21)");
        let (reason, _) = reason_and_field(passage(r#"["a"]"#));
        assert_eq!(reason, "expected a JSON object, found an array");
    }

    #[test]
    fn invalid_utf8_names_the_byte() {
        let bad =
            parse_line::<Passage>(b"{\"_id\":\"a\xff\"}", Path::new("c.jsonl"), 2).unwrap_err();
        assert_eq!(bad.location.line, 2);
        assert_eq!(
            bad.reason,
            "expected UTF-8 text, found invalid byte 0xFF at byte 10"
        );
    }

    #[test]
    fn queries_need_id_and_text() {
        let q: Query = parse_line(
            br#"{"_id":"0","text":"q?","metadata":{}}"#,
            Path::new("q"),
            1,
        )
        .unwrap();
        assert_eq!(
            q,
            Query {
                id: "0".into(),
                text: "q?".into()
            }
        );
        let bad = parse_line::<Query>(br#"{"_id":"0"}"#, Path::new("q"), 1).unwrap_err();
        assert_eq!(bad.location.field.as_deref(), Some("text"));
    }
}
