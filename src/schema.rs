//! Arrow schemas of the stage records, and conversions between them and plain Rust.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, FixedSizeListArray, Float32Array, ListArray, ListBuilder, StringArray,
    StringBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;

/// Column names of the embeddings stage: one row per text.
pub const COL_ID: &str = "id";
pub const COL_EMBEDDING: &str = "embedding";

/// The embeddings stage: `id` (utf8) and `embedding` (fixed-size list of `dim` f32).
pub fn embeddings_schema(dim: usize) -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(COL_ID, DataType::Utf8, false),
        Field::new(
            COL_EMBEDDING,
            DataType::FixedSizeList(
                Arc::new(Field::new("item", DataType::Float32, false)),
                dim as i32,
            ),
            false,
        ),
    ]))
}

/// Builds an embeddings batch from ids and a row-major `ids.len() x dim` matrix.
pub fn embeddings_batch(
    ids: &[String],
    matrix: Vec<f32>,
    dim: usize,
) -> Result<RecordBatch, ArrowError> {
    let schema = embeddings_schema(dim);
    let values = Arc::new(Float32Array::from(matrix));
    let item = Arc::new(Field::new("item", DataType::Float32, false));
    let list = FixedSizeListArray::try_new(item, dim as i32, values, None)?;
    let id: ArrayRef = Arc::new(StringArray::from_iter_values(ids.iter()));
    RecordBatch::try_new(schema, vec![id, Arc::new(list)])
}

/// Texts with their embeddings, in stage order: a row-major matrix.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EmbeddingMatrix {
    pub ids: Vec<String>,
    pub dim: usize,
    pub values: Vec<f32>,
}

impl EmbeddingMatrix {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.values[i * self.dim..(i + 1) * self.dim]
    }

    /// Appends the rows of an embeddings batch.
    pub fn extend_from_batch(&mut self, batch: &RecordBatch) -> Result<(), ArrowError> {
        let bad = |what: &str| ArrowError::SchemaError(format!("embeddings batch: {what}"));
        let ids = batch
            .column_by_name(COL_ID)
            .and_then(|c| c.as_any().downcast_ref::<StringArray>())
            .ok_or_else(|| bad("no utf8 column `id`"))?;
        let list = batch
            .column_by_name(COL_EMBEDDING)
            .and_then(|c| c.as_any().downcast_ref::<FixedSizeListArray>())
            .ok_or_else(|| bad("no fixed-size-list column `embedding`"))?;
        let dim = list.value_length() as usize;
        if self.ids.is_empty() {
            self.dim = dim;
        } else if dim != self.dim {
            return Err(bad(&format!("dimension {dim} after {}", self.dim)));
        }
        let values = list
            .values()
            .as_any()
            .downcast_ref::<Float32Array>()
            .ok_or_else(|| bad("embedding values are not f32"))?;
        let offset = list.offset() * dim;
        self.values
            .extend_from_slice(&values.values()[offset..offset + list.len() * dim]);
        self.ids
            .extend(ids.iter().map(|s| s.unwrap_or_default().to_string()));
        Ok(())
    }
}

/// Column names of the candidates stage: one row per kept query.
pub const COL_QUERY_ID: &str = "query_id";
pub const COL_QUERY_TEXT: &str = "query_text";
pub const COL_QUERY_TYPE: &str = "query_type";
pub const COL_SOURCE_IDS: &str = "source_ids";
pub const COL_CANDIDATE_IDS: &str = "candidate_ids";

/// One query's fused candidates, by passage id, best first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CandidateRow {
    pub query_id: String,
    pub query_text: String,
    pub query_type: String,
    pub source_ids: Vec<String>,
    pub candidate_ids: Vec<String>,
}

fn utf8_list() -> DataType {
    DataType::List(Arc::new(Field::new("item", DataType::Utf8, true)))
}

/// The candidates stage: `query_id`, `query_text`, `query_type` (utf8), `source_ids`,
/// `candidate_ids` (list of utf8, fused order).
pub fn candidates_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(COL_QUERY_ID, DataType::Utf8, false),
        Field::new(COL_QUERY_TEXT, DataType::Utf8, false),
        Field::new(COL_QUERY_TYPE, DataType::Utf8, false),
        Field::new(COL_SOURCE_IDS, utf8_list(), false),
        Field::new(COL_CANDIDATE_IDS, utf8_list(), false),
    ]))
}

fn string_list<'a>(rows: impl Iterator<Item = &'a Vec<String>>) -> ListArray {
    let mut b = ListBuilder::new(StringBuilder::new());
    for row in rows {
        for s in row {
            b.values().append_value(s);
        }
        b.append(true);
    }
    b.finish()
}

/// Builds a candidates batch.
pub fn candidates_batch(rows: &[CandidateRow]) -> Result<RecordBatch, ArrowError> {
    let col = |f: fn(&CandidateRow) -> &str| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(rows.iter().map(f)))
    };
    RecordBatch::try_new(
        candidates_schema(),
        vec![
            col(|r| &r.query_id),
            col(|r| &r.query_text),
            col(|r| &r.query_type),
            Arc::new(string_list(rows.iter().map(|r| &r.source_ids))),
            Arc::new(string_list(rows.iter().map(|r| &r.candidate_ids))),
        ],
    )
}

/// Reads the rows of a candidates batch.
pub fn candidates_from_batch(batch: &RecordBatch) -> Result<Vec<CandidateRow>, ArrowError> {
    let bad = |what: &str| ArrowError::SchemaError(format!("candidates batch: {what}"));
    let utf8 = |name: &str| {
        batch
            .column_by_name(name)
            .and_then(|c| c.as_any().downcast_ref::<StringArray>())
            .ok_or_else(|| bad(&format!("no utf8 column `{name}`")))
    };
    let list = |name: &str| {
        batch
            .column_by_name(name)
            .and_then(|c| c.as_any().downcast_ref::<ListArray>())
            .ok_or_else(|| bad(&format!("no list column `{name}`")))
    };
    let strings = |l: &ListArray, i: usize| -> Result<Vec<String>, ArrowError> {
        let v = l.value(i);
        let s = v
            .as_any()
            .downcast_ref::<StringArray>()
            .ok_or_else(|| bad("list items are not utf8"))?;
        Ok(s.iter()
            .map(|x| x.unwrap_or_default().to_string())
            .collect())
    };
    let (qid, text, kind) = (
        utf8(COL_QUERY_ID)?,
        utf8(COL_QUERY_TEXT)?,
        utf8(COL_QUERY_TYPE)?,
    );
    let (sources, candidates) = (list(COL_SOURCE_IDS)?, list(COL_CANDIDATE_IDS)?);
    (0..batch.num_rows())
        .map(|i| {
            Ok(CandidateRow {
                query_id: qid.value(i).to_string(),
                query_text: text.value(i).to_string(),
                query_type: kind.value(i).to_string(),
                source_ids: strings(sources, i)?,
                candidate_ids: strings(candidates, i)?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_round_trip_through_a_batch() {
        let rows = vec![
            CandidateRow {
                query_id: "q1".into(),
                query_text: "what?".into(),
                query_type: "human".into(),
                source_ids: vec!["p1".into()],
                candidate_ids: vec!["p1".into(), "p9".into(), "p3".into()],
            },
            CandidateRow {
                query_id: "q2".into(),
                query_text: "why?".into(),
                query_type: "claim".into(),
                source_ids: vec!["p2".into(), "p4".into()],
                candidate_ids: vec![],
            },
        ];
        let batch = candidates_batch(&rows).unwrap();
        assert_eq!(candidates_from_batch(&batch).unwrap(), rows);
        assert_eq!(
            candidates_from_batch(&batch.slice(1, 1)).unwrap(),
            rows[1..]
        );
    }

    #[test]
    fn embeddings_round_trip_through_a_batch() {
        let ids = vec!["a".to_string(), "b".to_string()];
        let batch = embeddings_batch(&ids, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 3).unwrap();
        let mut m = EmbeddingMatrix::default();
        m.extend_from_batch(&batch).unwrap();
        m.extend_from_batch(&batch.slice(1, 1)).unwrap();
        assert_eq!(m.ids, vec!["a", "b", "b"]);
        assert_eq!(m.dim, 3);
        assert_eq!(m.row(2), &[4.0, 5.0, 6.0]);
    }
}
