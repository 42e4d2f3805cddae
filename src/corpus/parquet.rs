//! Parquet passages, read one record batch at a time.
//!
//! Columns: `_id` (or `id` when there is no `_id`), `text`, and optionally `title`; other
//! columns are not read at all. Text columns are strings of any Arrow width (the embedded
//! Arrow schema is ignored, so dictionary-encoded and view strings read as plain ones);
//! a binary column is accepted and checked for UTF-8 row by row. The id column may also
//! be an integer column, read as decimal strings. A null id or text is a bad record; a
//! null title reads as "". Locations give the 1-based row in the file as the line.
//!
//! A missing required column, or one of another type, is a problem with the whole file:
//! it is reported at open time as a [`BadRecord`] with line 0, whatever the policy.

use std::fs::File;
use std::path::{Path, PathBuf};

use ::parquet::arrow::arrow_reader::{
    ArrowReaderOptions, ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder,
};
use ::parquet::arrow::ProjectionMask;
use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Int32Type, Int64Type, UInt32Type, UInt64Type};

use super::{bad_record, CorpusError, Item, SeenIds, Source};
use crate::bad_record::BadRecord;
use crate::record::Passage;

/// Rows per record batch. Passages are a few KB at most, so 1024 rows keep a batch in the
/// low megabytes while amortising the decoder's per-batch overhead.
const BATCH_ROWS: usize = 1024;

/// Column names, in order of preference for the id.
const ID_COLUMNS: [&str; 2] = ["_id", "id"];
const TITLE_COLUMN: &str = "title";
const TEXT_COLUMN: &str = "text";

/// A Parquet file read as passages.
pub(crate) struct ParquetSource {
    path: PathBuf,
    reader: ParquetRecordBatchReader,
    id_column: &'static str,
    batch: Option<RecordBatch>,
    /// The next row of `batch` to read.
    row: usize,
    /// Rows in the batches before `batch`.
    rows_before: u64,
    seen: SeenIds,
}

impl ParquetSource {
    pub(crate) fn open(path: &Path) -> Result<Self, CorpusError> {
        let parquet_error = |source| CorpusError::Parquet {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(|source| CorpusError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let options = ArrowReaderOptions::new().with_skip_arrow_metadata(true);
        let builder = ParquetRecordBatchReaderBuilder::try_new_with_options(file, options)
            .map_err(parquet_error)?;
        let schema = builder.schema().clone();
        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        let whole_file = |field: &str, reason: String| {
            CorpusError::Bad(bad_record(path, 0, Some(field), reason))
        };
        let id_column = ID_COLUMNS
            .into_iter()
            .find(|name| names.contains(name))
            .ok_or_else(|| {
                whole_file(
                    ID_COLUMNS[0],
                    format!("expected a column `_id` or `id`, found columns {names:?}"),
                )
            })?;
        let mut indices = Vec::new();
        for (name, required, accepts_ints) in [
            (id_column, true, true),
            (TEXT_COLUMN, true, false),
            (TITLE_COLUMN, false, false),
        ] {
            let Some(index) = names.iter().position(|n| *n == name) else {
                if required {
                    let reason = format!("expected a column `{name}`, found columns {names:?}");
                    return Err(whole_file(name, reason));
                }
                continue;
            };
            let data_type = schema.field(index).data_type();
            if !(is_text(data_type) || accepts_ints && is_integer(data_type)) {
                let wanted = if accepts_ints {
                    "strings or integers"
                } else {
                    "strings"
                };
                let reason = format!("expected a column of {wanted}, found {data_type}");
                return Err(whole_file(name, reason));
            }
            indices.push(index);
        }
        let mask = ProjectionMask::roots(builder.parquet_schema(), indices);
        let reader = builder
            .with_projection(mask)
            .with_batch_size(BATCH_ROWS)
            .build()
            .map_err(parquet_error)?;
        Ok(ParquetSource {
            path: path.to_path_buf(),
            reader,
            id_column,
            batch: None,
            row: 0,
            rows_before: 0,
            seen: SeenIds::default(),
        })
    }

    /// Reads row `row` of `batch`, whose 1-based row in the file is `line`.
    fn passage(&mut self, batch: &RecordBatch, row: usize, line: u64) -> Item<Passage> {
        let file = &self.path;
        let id = column_value(batch, self.id_column, row, file, line);
        let title = column_value(batch, TITLE_COLUMN, row, file, line);
        let text = column_value(batch, TEXT_COLUMN, row, file, line);
        let checked = (|| {
            let null =
                |field: &str| bad_record(file, line, Some(field), "expected a value, found null");
            let id = id.clone()?.ok_or_else(|| null(self.id_column))?;
            if id.is_empty() {
                let reason = "expected a non-empty id, found an empty string";
                return Err(bad_record(file, line, Some(self.id_column), reason));
            }
            let title = title.clone()?.unwrap_or_default();
            let text = text.clone()?.ok_or_else(|| null(TEXT_COLUMN))?;
            self.seen.check(&id, file, line, self.id_column)?;
            Ok(Passage { id, title, text })
        })();
        match checked {
            Ok(passage) => Item::Good(passage),
            Err(error) => {
                // The raw record is the row as a JSON object, with what could be decoded.
                let shown = |v: Result<Option<String>, BadRecord>| v.ok().flatten();
                let raw = serde_json::json!({
                    self.id_column: shown(id),
                    TITLE_COLUMN: shown(title),
                    TEXT_COLUMN: shown(text),
                });
                Item::Bad {
                    error,
                    raw: raw.to_string().into_bytes(),
                }
            }
        }
    }
}

impl Source for ParquetSource {
    type Record = Passage;

    fn next_item(&mut self) -> Result<Option<Item<Passage>>, CorpusError> {
        loop {
            if let Some(batch) = self.batch.take() {
                if self.row < batch.num_rows() {
                    let line = self.rows_before + self.row as u64 + 1;
                    let item = self.passage(&batch, self.row, line);
                    self.row += 1;
                    self.batch = Some(batch);
                    return Ok(Some(item));
                }
                self.rows_before += batch.num_rows() as u64;
                self.row = 0;
            }
            match self.reader.next() {
                None => return Ok(None),
                Some(Ok(batch)) => self.batch = Some(batch),
                Some(Err(e)) => {
                    return Err(CorpusError::Parquet {
                        path: self.path.clone(),
                        source: e.into(),
                    })
                }
            }
        }
    }
}

fn is_text(data_type: &DataType) -> bool {
    matches!(
        data_type,
        DataType::Utf8
            | DataType::LargeUtf8
            | DataType::Utf8View
            | DataType::Binary
            | DataType::LargeBinary
    )
}

fn is_integer(data_type: &DataType) -> bool {
    matches!(
        data_type,
        DataType::Int32 | DataType::Int64 | DataType::UInt32 | DataType::UInt64
    )
}

/// The value of column `name` at `row` as a string: `Ok(None)` when null or when the
/// column was not projected (an absent optional title), `Err` when binary data is not
/// UTF-8.
fn column_value(
    batch: &RecordBatch,
    name: &str,
    row: usize,
    file: &Path,
    line: u64,
) -> Result<Option<String>, BadRecord> {
    let Some(array) = batch.column_by_name(name) else {
        return Ok(None);
    };
    if array.is_null(row) {
        return Ok(None);
    }
    let bytes_to_string = |bytes: &[u8]| match std::str::from_utf8(bytes) {
        Ok(s) => Ok(Some(s.to_string())),
        Err(e) => {
            let at = e.valid_up_to();
            let byte = bytes.get(at).copied().unwrap_or_default();
            let reason = format!(
                "expected UTF-8 text, found invalid byte 0x{byte:02X} at byte {}",
                at + 1
            );
            Err(bad_record(file, line, Some(name), reason))
        }
    };
    let value = match array.data_type() {
        DataType::Utf8 => array
            .as_string_opt::<i32>()
            .map(|a| a.value(row).to_string()),
        DataType::LargeUtf8 => array
            .as_string_opt::<i64>()
            .map(|a| a.value(row).to_string()),
        DataType::Utf8View => array.as_string_view_opt().map(|a| a.value(row).to_string()),
        DataType::Binary => match array.as_binary_opt::<i32>() {
            Some(a) => return bytes_to_string(a.value(row)),
            None => None,
        },
        DataType::LargeBinary => match array.as_binary_opt::<i64>() {
            Some(a) => return bytes_to_string(a.value(row)),
            None => None,
        },
        DataType::Int32 => array
            .as_primitive_opt::<Int32Type>()
            .map(|a| a.value(row).to_string()),
        DataType::Int64 => array
            .as_primitive_opt::<Int64Type>()
            .map(|a| a.value(row).to_string()),
        DataType::UInt32 => array
            .as_primitive_opt::<UInt32Type>()
            .map(|a| a.value(row).to_string()),
        DataType::UInt64 => array
            .as_primitive_opt::<UInt64Type>()
            .map(|a| a.value(row).to_string()),
        _ => None,
    };
    // Column types were checked at open; a batch whose type differs from the schema's
    // is reported rather than trusted.
    value.map(Some).ok_or_else(|| {
        let reason = format!("expected a string column, found {}", array.data_type());
        bad_record(file, line, Some(name), reason)
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is its job
mod tests {
    use super::*;
    use std::sync::Arc;

    use ::parquet::arrow::ArrowWriter;
    use arrow::array::{ArrayRef, BinaryArray, Int64Array, LargeStringArray, StringArray};

    fn write(path: &Path, columns: Vec<(&str, ArrayRef)>) {
        let batch = RecordBatch::try_from_iter(columns).unwrap();
        let mut writer =
            ArrowWriter::try_new(File::create(path).unwrap(), batch.schema(), None).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
    }

    fn read_all(path: &Path) -> Vec<Result<Passage, BadRecord>> {
        let mut source = ParquetSource::open(path).unwrap();
        let mut out = Vec::new();
        while let Some(item) = source.next_item().unwrap() {
            out.push(match item {
                Item::Good(p) => Ok(p),
                Item::Bad { error, .. } => Err(error),
            });
        }
        out
    }

    fn strings(values: &[Option<&str>]) -> ArrayRef {
        Arc::new(StringArray::from(values.to_vec()))
    }

    #[test]
    fn reads_many_batches_with_rows_numbered_across_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.parquet");
        let n = BATCH_ROWS * 2 + 5;
        let ids: Vec<String> = (0..n).map(|i| format!("d{i}")).collect();
        let mut texts: Vec<Option<String>> = (0..n).map(|i| Some(format!("text {i}"))).collect();
        texts[BATCH_ROWS + 3] = None; // row BATCH_ROWS + 4, in the second batch
        write(
            &path,
            vec![
                ("_id", Arc::new(StringArray::from(ids)) as ArrayRef),
                ("text", Arc::new(LargeStringArray::from(texts)) as ArrayRef),
            ],
        );
        let got = read_all(&path);
        assert_eq!(got.len(), n);
        assert_eq!(got[n - 1].clone().unwrap().text, format!("text {}", n - 1));
        let bad = got[BATCH_ROWS + 3].clone().unwrap_err();
        assert_eq!(bad.location.line, BATCH_ROWS as u64 + 4);
        assert_eq!(bad.location.field.as_deref(), Some("text"));
        assert_eq!(bad.reason, "expected a value, found null");
    }

    #[test]
    fn id_column_and_integer_ids_and_null_titles() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.parquet");
        write(
            &path,
            vec![
                ("id", Arc::new(Int64Array::from(vec![7, 8])) as ArrayRef),
                ("title", strings(&[Some("T"), None])),
                ("text", strings(&[Some("a"), Some("b")])),
                ("ignored", strings(&[None, None])),
            ],
        );
        let got: Vec<Passage> = read_all(&path).into_iter().map(Result::unwrap).collect();
        assert_eq!(
            got[0],
            Passage {
                id: "7".into(),
                title: "T".into(),
                text: "a".into()
            }
        );
        assert_eq!(
            got[1],
            Passage {
                id: "8".into(),
                title: String::new(),
                text: "b".into()
            }
        );
    }

    #[test]
    fn binary_text_is_checked_for_utf8_and_duplicates_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.parquet");
        let texts: Vec<&[u8]> = vec![b"ok", b"bad \xff", b"ok"];
        write(
            &path,
            vec![
                ("_id", strings(&[Some("a"), Some("b"), Some("a")])),
                ("text", Arc::new(BinaryArray::from(texts)) as ArrayRef),
            ],
        );
        let got = read_all(&path);
        let utf8 = got[1].clone().unwrap_err();
        assert_eq!(
            (utf8.location.line, utf8.location.field.as_deref()),
            (2, Some("text"))
        );
        assert_eq!(
            utf8.reason,
            "expected UTF-8 text, found invalid byte 0xFF at byte 5"
        );
        let dup = got[2].clone().unwrap_err();
        assert_eq!(
            (dup.location.line, dup.location.field.as_deref()),
            (3, Some("_id"))
        );
        assert!(dup.reason.ends_with("(first seen on line 1)"));
    }

    #[test]
    fn layout_problems_are_whole_file_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.parquet");
        write(
            &path,
            vec![
                ("_id", strings(&[Some("a")])),
                ("body", strings(&[Some("x")])),
            ],
        );
        let err = ParquetSource::open(&path).err().unwrap();
        let CorpusError::Bad(bad) = err else {
            panic!("expected a bad record")
        };
        assert_eq!(
            (bad.location.line, bad.location.field.as_deref()),
            (0, Some("text"))
        );
        assert_eq!(
            bad.reason,
            "expected a column `text`, found columns [\"_id\", \"body\"]"
        );

        write(
            &path,
            vec![
                ("_id", strings(&[Some("a")])),
                ("text", Arc::new(Int64Array::from(vec![1])) as ArrayRef),
            ],
        );
        let err = ParquetSource::open(&path).err().unwrap();
        assert_eq!(
            err.to_string(),
            format!(
                "{} field `text`: expected a column of strings, found Int64",
                path.display()
            )
        );
    }

    #[test]
    fn a_file_that_is_not_parquet_is_a_parquet_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.parquet");
        std::fs::write(&path, "{\"_id\": \"a\"}\n").unwrap();
        let err = ParquetSource::open(&path).err().unwrap();
        assert!(matches!(err, CorpusError::Parquet { .. }), "{err}");
    }
}
