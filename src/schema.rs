//! Arrow schemas of the stage records, and conversions between them and plain Rust.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, FixedSizeListArray, Float32Array, StringArray};
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

#[cfg(test)]
mod tests {
    use super::*;

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
