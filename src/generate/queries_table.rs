//! The generated queries, as the `queries` stage and the files `generate` writes.
//!
//! | column | Arrow | JSONL | meaning |
//! |---|---|---|---|
//! | `query_id` | `utf8` | string | `<passage id>#<query type>`: one query per passage and type |
//! | `query_text` | `utf8` | string | the query, post-processed |
//! | `query_type` | `utf8` | string | `question`, `claim`, `title`, `keywords`, `search`, `web` or a custom type |
//! | `source_id` | `utf8` | string | the passage it was generated from (its positive) |
//! | `held_out` | `bool` | bool | the source is one of the held-out passages: a synthetic test query, never a training example |
//!
//! Rows are in passage order (the prepared corpus), then in the configured type order.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, BooleanArray, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use serde::Serialize;

use crate::error::EngineError;

pub const COL_QUERY_ID: &str = "query_id";
pub const COL_QUERY_TEXT: &str = "query_text";
pub const COL_QUERY_TYPE: &str = "query_type";
pub const COL_SOURCE_ID: &str = "source_id";
pub const COL_HELD_OUT: &str = "held_out";

/// One generated query.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GeneratedQuery {
    pub query_id: String,
    pub query_text: String,
    pub query_type: String,
    pub source_id: String,
    pub held_out: bool,
}

/// The query id of a passage's query of a type.
pub fn query_id(passage_id: &str, query_type: &str) -> String {
    format!("{passage_id}#{query_type}")
}

pub fn queries_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(COL_QUERY_ID, DataType::Utf8, false),
        Field::new(COL_QUERY_TEXT, DataType::Utf8, false),
        Field::new(COL_QUERY_TYPE, DataType::Utf8, false),
        Field::new(COL_SOURCE_ID, DataType::Utf8, false),
        Field::new(COL_HELD_OUT, DataType::Boolean, false),
    ]))
}

pub fn queries_batch(rows: &[GeneratedQuery]) -> Result<RecordBatch, ArrowError> {
    let s = |f: fn(&GeneratedQuery) -> &str| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(rows.iter().map(f)))
    };
    RecordBatch::try_new(
        queries_schema(),
        vec![
            s(|r| &r.query_id),
            s(|r| &r.query_text),
            s(|r| &r.query_type),
            s(|r| &r.source_id),
            Arc::new(
                rows.iter()
                    .map(|r| Some(r.held_out))
                    .collect::<BooleanArray>(),
            ),
        ],
    )
}

pub fn queries_from_batch(batch: &RecordBatch) -> Result<Vec<GeneratedQuery>, EngineError> {
    let bad = |name: &str| {
        EngineError::Invalid(format!(
            "not a generated queries table: column `{name}` missing or mistyped"
        ))
    };
    let s = |name: &str| {
        batch
            .column_by_name(name)
            .and_then(|c| c.as_any().downcast_ref::<StringArray>())
            .ok_or_else(|| bad(name))
    };
    let (id, text, qtype, source) = (
        s(COL_QUERY_ID)?,
        s(COL_QUERY_TEXT)?,
        s(COL_QUERY_TYPE)?,
        s(COL_SOURCE_ID)?,
    );
    let held = batch
        .column_by_name(COL_HELD_OUT)
        .and_then(|c| c.as_any().downcast_ref::<BooleanArray>())
        .ok_or_else(|| bad(COL_HELD_OUT))?;
    Ok((0..batch.num_rows())
        .map(|i| GeneratedQuery {
            query_id: id.value(i).to_string(),
            query_text: text.value(i).to_string(),
            query_type: qtype.value(i).to_string(),
            source_id: source.value(i).to_string(),
            held_out: !held.is_null(i) && held.value(i),
        })
        .collect())
}

fn write_err(path: &Path) -> impl Fn(std::io::Error) -> EngineError + '_ {
    move |source| EngineError::Write {
        path: path.to_path_buf(),
        source,
    }
}

/// Rows per Arrow batch handed to the Parquet writer: the engine's chunk size
/// (`dataflow::CHUNK_ROWS`). The file's bytes depend on it, so it is fixed here rather
/// than borrowed from the layer above.
const WRITE_BATCH_ROWS: usize = 2048;

/// Writes the queries to `path`: Parquet when it ends in `.parquet`, JSONL otherwise.
/// The file is written through the store's durable protocol: whole or absent.
pub fn write_queries_file(path: &Path, rows: &[GeneratedQuery]) -> Result<(), EngineError> {
    crate::store::write_file_with(path, |file: &mut std::fs::File, tmp| {
        if path.extension().is_some_and(|e| e == "parquet") {
            let parquet = |e| EngineError::Invalid(format!("{}: {e}", tmp.display()));
            let mut writer = ArrowWriter::try_new(file, queries_schema(), None).map_err(parquet)?;
            for chunk in rows.chunks(WRITE_BATCH_ROWS) {
                writer.write(&queries_batch(chunk)?).map_err(parquet)?;
            }
            writer.close().map_err(parquet)?;
        } else {
            let mut out = std::io::BufWriter::new(file);
            for row in rows {
                let line =
                    serde_json::to_string(row).map_err(|e| EngineError::Invalid(e.to_string()))?;
                writeln!(out, "{line}").map_err(write_err(tmp))?;
            }
            out.flush().map_err(write_err(tmp))?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows() -> Vec<GeneratedQuery> {
        vec![
            GeneratedQuery {
                query_id: query_id("p1", "question"),
                query_text: "why is the sky blue".into(),
                query_type: "question".into(),
                source_id: "p1".into(),
                held_out: false,
            },
            GeneratedQuery {
                query_id: query_id("p2", "title"),
                query_text: "Rayleigh \"scattering\"".into(),
                query_type: "title".into(),
                source_id: "p2".into(),
                held_out: true,
            },
        ]
    }

    #[test]
    fn batches_round_trip() {
        let rows = rows();
        assert_eq!(rows[0].query_id, "p1#question");
        let back = queries_from_batch(&queries_batch(&rows).unwrap()).unwrap();
        assert_eq!(back, rows);
    }

    #[test]
    fn jsonl_and_parquet_files() {
        let dir = tempfile::tempdir().unwrap();
        let jsonl = dir.path().join("q.jsonl");
        write_queries_file(&jsonl, &rows()).unwrap();
        let text = std::fs::read_to_string(&jsonl).unwrap();
        assert_eq!(
            text.lines().nth(1).unwrap(),
            r#"{"query_id":"p2#title","query_text":"Rayleigh \"scattering\"","query_type":"title","source_id":"p2","held_out":true}"#
        );
        let pq = dir.path().join("q.parquet");
        write_queries_file(&pq, &rows()).unwrap();
        let file = std::fs::File::open(&pq).unwrap();
        let reader =
            parquet::arrow::arrow_reader::ParquetRecordBatchReader::try_new(file, 1024).unwrap();
        let mut back = Vec::new();
        for b in reader {
            back.extend(queries_from_batch(&b.unwrap()).unwrap());
        }
        assert_eq!(back, rows());
        assert!(!dir.path().join("q.partial").exists());
    }
}
