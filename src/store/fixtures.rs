//! Batches and keys shared by the store's unit tests.

use std::sync::Arc;

use arrow::array::{Array, FixedSizeListArray, Float32Array, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use super::StageKey;

/// Four column types a stage meets: text, integers, nullable floats, fixed vectors.
pub fn schema() -> SchemaRef {
    let item = Arc::new(Field::new("item", DataType::Float32, false));
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("n", DataType::Int64, false),
        Field::new("score", DataType::Float32, true),
        Field::new("vec", DataType::FixedSizeList(item, 2), false),
    ]))
}

/// Rows `first..first + rows`: id `p<n>`, n, score n/2 (null when n is a multiple of
/// 3), vec [n, -n].
pub fn batch(first: i64, rows: usize) -> RecordBatch {
    let ns: Vec<i64> = (first..first + rows as i64).collect();
    let ids = StringArray::from_iter_values(ns.iter().map(|n| format!("p{n}")));
    let scores: Float32Array = ns
        .iter()
        .map(|&n| (n % 3 != 0).then_some(n as f32 / 2.0))
        .collect();
    let flat = Float32Array::from_iter_values(ns.iter().flat_map(|&n| [n as f32, -n as f32]));
    let item = Arc::new(Field::new("item", DataType::Float32, false));
    let vecs = FixedSizeListArray::new(item, 2, Arc::new(flat), None);
    RecordBatch::try_new(
        schema(),
        vec![
            Arc::new(ids),
            Arc::new(Int64Array::from(ns)),
            Arc::new(scores),
            Arc::new(vecs),
        ],
    )
    .unwrap()
}

pub fn key(settings: &str, input: &str) -> StageKey {
    StageKey {
        settings_hash: settings.to_string(),
        input_hash: input.to_string(),
    }
}

/// The `n` column of all batches, concatenated.
pub fn ns(batches: &[RecordBatch]) -> Vec<i64> {
    batches
        .iter()
        .flat_map(|b| {
            let n = b.column(1).as_any().downcast_ref::<Int64Array>().unwrap();
            assert_eq!(n.null_count(), 0);
            n.values().to_vec()
        })
        .collect()
}
