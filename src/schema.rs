//! Arrow schemas of the stage records, and conversions between them and plain Rust.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, FixedSizeBinaryArray, FixedSizeListArray, Float32Array, ListArray,
    ListBuilder, StringArray, StringBuilder, UInt32Array, UInt64Array,
};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;

use crate::retrieval::Hit;

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

/// Column names of a retrieval's passage list (one row per passage, in the order the
/// lists' positions count) and of its lists (one row per query, in query order).
pub const COL_IDENTITY: &str = "identity";
pub const COL_QUERY: &str = "query";
pub const COL_PASSAGES: &str = "passages";
pub const COL_SCORES: &str = "scores";

/// Bytes of an identity ([`crate::retrieval::repair::Identity`]), stored big-endian.
const IDENTITY_BYTES: i32 = 16;

fn identity_column(identities: &[u128]) -> Result<ArrayRef, ArrowError> {
    Ok(Arc::new(FixedSizeBinaryArray::try_from_iter(
        identities.iter().map(|i| i.to_be_bytes()),
    )?))
}

fn identities_of(batch: &RecordBatch, name: &str) -> Result<Vec<u128>, ArrowError> {
    let column = batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<FixedSizeBinaryArray>())
        .filter(|c| c.value_length() == IDENTITY_BYTES)
        .ok_or_else(|| {
            ArrowError::SchemaError(format!("no 16-byte fixed-size binary column `{name}`"))
        })?;
    Ok((0..column.len())
        .map(|i| {
            let mut bytes = [0u8; 16];
            bytes.copy_from_slice(column.value(i));
            u128::from_be_bytes(bytes)
        })
        .collect())
}

/// A retrieval's passage list: `id` (utf8) and `identity` (16 bytes).
pub fn passage_list_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(COL_ID, DataType::Utf8, false),
        Field::new(
            COL_IDENTITY,
            DataType::FixedSizeBinary(IDENTITY_BYTES),
            false,
        ),
    ]))
}

/// Builds a passage-list batch.
pub fn passage_list_batch(ids: &[String], identities: &[u128]) -> Result<RecordBatch, ArrowError> {
    RecordBatch::try_new(
        passage_list_schema(),
        vec![
            Arc::new(StringArray::from_iter_values(ids.iter())),
            identity_column(identities)?,
        ],
    )
}

/// Appends a passage-list batch's ids and identities.
pub fn passage_list_from_batch(
    batch: &RecordBatch,
    ids: &mut Vec<String>,
    identities: &mut Vec<u128>,
) -> Result<(), ArrowError> {
    let id = batch
        .column_by_name(COL_ID)
        .and_then(|c| c.as_any().downcast_ref::<StringArray>())
        .ok_or_else(|| ArrowError::SchemaError("passage list: no utf8 column `id`".into()))?;
    ids.extend(id.iter().map(|s| s.unwrap_or_default().to_string()));
    identities.extend(identities_of(batch, COL_IDENTITY)?);
    Ok(())
}

/// A retrieval's lists: `query` (16-byte identity of the query vector), `passages`
/// (list of u32 positions in the passage list) and `scores` (list of f32), best first.
pub fn retrieved_schema() -> SchemaRef {
    let list = |t: DataType| DataType::List(Arc::new(Field::new("item", t, false)));
    Arc::new(Schema::new(vec![
        Field::new(COL_QUERY, DataType::FixedSizeBinary(IDENTITY_BYTES), false),
        Field::new(COL_PASSAGES, list(DataType::UInt32), false),
        Field::new(COL_SCORES, list(DataType::Float32), false),
    ]))
}

/// Builds a batch of retrieved lists: one row per query.
pub fn retrieved_batch(queries: &[u128], lists: &[Vec<Hit>]) -> Result<RecordBatch, ArrowError> {
    let offsets = OffsetBuffer::from_lengths(lists.iter().map(Vec::len));
    let passages = UInt32Array::from_iter_values(lists.iter().flatten().map(|h| h.passage));
    let scores = Float32Array::from_iter_values(lists.iter().flatten().map(|h| h.score));
    let item = |t: DataType| Arc::new(Field::new("item", t, false));
    RecordBatch::try_new(
        retrieved_schema(),
        vec![
            identity_column(queries)?,
            Arc::new(ListArray::try_new(
                item(DataType::UInt32),
                offsets.clone(),
                Arc::new(passages),
                None,
            )?),
            Arc::new(ListArray::try_new(
                item(DataType::Float32),
                offsets,
                Arc::new(scores),
                None,
            )?),
        ],
    )
}

/// Reads a batch of retrieved lists: the query identities and their lists.
pub fn retrieved_from_batch(batch: &RecordBatch) -> Result<Vec<(u128, Vec<Hit>)>, ArrowError> {
    let bad = |what: &str| ArrowError::SchemaError(format!("retrieved lists: {what}"));
    let queries = identities_of(batch, COL_QUERY)?;
    let list = |name: &str| {
        batch
            .column_by_name(name)
            .and_then(|c| c.as_any().downcast_ref::<ListArray>())
            .ok_or_else(|| bad(&format!("no list column `{name}`")))
    };
    let (passages, scores) = (list(COL_PASSAGES)?, list(COL_SCORES)?);
    if passages.offsets() != scores.offsets() {
        return Err(bad("passages and scores differ in length"));
    }
    let p = passages
        .values()
        .as_any()
        .downcast_ref::<UInt32Array>()
        .ok_or_else(|| bad("passages are not u32"))?;
    let s = scores
        .values()
        .as_any()
        .downcast_ref::<Float32Array>()
        .ok_or_else(|| bad("scores are not f32"))?;
    let offsets = passages.offsets();
    Ok(queries
        .into_iter()
        .enumerate()
        .map(|(i, q)| {
            let (a, b) = (offsets[i] as usize, offsets[i + 1] as usize);
            let hits = (a..b)
                .map(|j| Hit {
                    passage: p.value(j),
                    score: s.value(j),
                })
                .collect();
            (q, hits)
        })
        .collect())
}

/// Column names of a corpus version (the corpus change plan's record of a finished
/// generation): per passage its `id` and digests of its `title` and `text`; per query
/// its `query_id`, `source_id` and a digest of its `text`.
pub const COL_TITLE_DIGEST: &str = "title";
pub const COL_TEXT_DIGEST: &str = "text";
pub const COL_SOURCE_ID: &str = "source_id";

/// A corpus version's passages: `id` (utf8), `title` and `text` (u64 digests).
pub fn version_passages_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(COL_ID, DataType::Utf8, false),
        Field::new(COL_TITLE_DIGEST, DataType::UInt64, false),
        Field::new(COL_TEXT_DIGEST, DataType::UInt64, false),
    ]))
}

/// A corpus version's queries: `query_id`, `source_id` (utf8) and `text` (u64 digest).
pub fn version_queries_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(COL_QUERY_ID, DataType::Utf8, false),
        Field::new(COL_SOURCE_ID, DataType::Utf8, false),
        Field::new(COL_TEXT_DIGEST, DataType::UInt64, false),
    ]))
}

/// Builds a batch of `schema` (one of the two above): two utf8 columns or one, then the
/// digests, in the schema's order.
pub fn version_batch(
    schema: SchemaRef,
    strings: &[&[String]],
    digests: &[&[u64]],
) -> Result<RecordBatch, ArrowError> {
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(strings.len() + digests.len());
    for s in strings {
        columns.push(Arc::new(StringArray::from_iter_values(s.iter())));
    }
    for d in digests {
        columns.push(Arc::new(UInt64Array::from(d.to_vec())));
    }
    RecordBatch::try_new(schema, columns)
}

/// The column `name` of a corpus-version batch as `T`; `kind` names the type expected.
fn version_column<'a, T: 'static>(
    batch: &'a RecordBatch,
    name: &str,
    kind: &str,
) -> Result<&'a T, ArrowError> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<T>())
        .ok_or_else(|| {
            ArrowError::SchemaError(format!("corpus version: no {kind} column `{name}`"))
        })
}

/// A utf8 column of a corpus-version batch.
pub fn version_strings(batch: &RecordBatch, name: &str) -> Result<Vec<String>, ArrowError> {
    let column = version_column::<StringArray>(batch, name, "utf8")?;
    Ok(column
        .iter()
        .map(|s| s.unwrap_or_default().to_string())
        .collect())
}

/// A u64 column of a corpus-version batch.
pub fn version_digests(batch: &RecordBatch, name: &str) -> Result<Vec<u64>, ArrowError> {
    Ok(version_column::<UInt64Array>(batch, name, "u64")?
        .values()
        .to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retrieved_lists_and_passage_lists_round_trip_through_a_batch() {
        let hit = |passage, score| Hit { passage, score };
        let lists = vec![
            vec![hit(3, 0.5), hit(0, -0.25)],
            vec![],
            vec![hit(7, 1.0)],
            vec![hit(1, 0.125), hit(2, 0.0), hit(9, -1.0)],
        ];
        let queries = [1u128, u128::MAX, 0, 42 << 100];
        let batch = retrieved_batch(&queries, &lists).unwrap();
        let back = retrieved_from_batch(&batch).unwrap();
        assert_eq!(back.len(), 4);
        for ((q, l), (bq, bl)) in queries.iter().zip(&lists).zip(&back) {
            assert_eq!((q, l), (bq, bl));
        }
        // A slice (offsets not starting at zero) reads its own rows.
        let slice = retrieved_from_batch(&batch.slice(2, 2)).unwrap();
        assert_eq!(slice, back[2..].to_vec());

        let ids = vec!["a".to_string(), "b".to_string()];
        let batch = passage_list_batch(&ids, &[u128::MAX, 5]).unwrap();
        let (mut got_ids, mut got) = (Vec::new(), Vec::new());
        passage_list_from_batch(&batch, &mut got_ids, &mut got).unwrap();
        assert_eq!((got_ids, got), (ids, vec![u128::MAX, 5]));
    }

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
