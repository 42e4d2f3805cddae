//! The `examples` table: one training example per kept query, as Arrow batches (for the
//! stage store) and as JSONL (for people and other tools). The fields are documented in
//! the module docs of [`super`].

use std::io::Write;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, Float32Array, Float32Builder, ListArray, ListBuilder, StringArray,
    StringBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;
use serde::{Deserialize, Serialize};

use super::split::{split_of, Split};
use super::teacher_filter::{LabelledQuery, TeacherConfig};
use super::{MiningError, PassageIdx};

pub const COL_QUERY_ID: &str = "query_id";
pub const COL_QUERY_TEXT: &str = "query_text";
pub const COL_QUERY_TYPE: &str = "query_type";
pub const COL_SOURCE_IDS: &str = "source_ids";
pub const COL_PASSAGE_IDS: &str = "passage_ids";
pub const COL_SCORES: &str = "scores";
pub const COL_SPLIT: &str = "split";

/// One row of the `examples` table. Field order is the column order and the JSON key
/// order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Example {
    pub query_id: String,
    pub query_text: String,
    pub query_type: String,
    pub source_ids: Vec<String>,
    /// Teacher order, best first; the first is the positive.
    pub passage_ids: Vec<String>,
    /// Normalised teacher scores, one per passage.
    pub scores: Vec<f32>,
    pub split: Split,
}

/// Builds a query's example: passage positions become ids through `passage_ids` (the
/// stage's passage table) and the split comes from `config`'s seed and fraction.
pub fn example_from_labelled(
    labelled: LabelledQuery,
    query_text: String,
    query_type: String,
    passage_ids: &[String],
    config: &TeacherConfig,
) -> Result<Example, MiningError> {
    let id_of = |p: PassageIdx| {
        passage_ids
            .get(p as usize)
            .cloned()
            .ok_or_else(|| MiningError::UnknownPassage {
                query_id: labelled.query_id.clone(),
                passage: p,
                passages: passage_ids.len(),
            })
    };
    let source_ids = labelled
        .sources
        .iter()
        .map(|&p| id_of(p))
        .collect::<Result<Vec<_>, _>>()?;
    let passages = labelled
        .passages
        .iter()
        .map(|&p| id_of(p))
        .collect::<Result<Vec<_>, _>>()?;
    let split = split_of(&labelled.query_id, config.split_seed, config.dev_fraction);
    Ok(Example {
        query_id: labelled.query_id,
        query_text,
        query_type,
        source_ids,
        passage_ids: passages,
        scores: labelled.scores,
        split,
    })
}

fn item_field(data_type: DataType) -> Arc<Field> {
    Arc::new(Field::new("item", data_type, false))
}

/// The Arrow schema of the `examples` table; no column and no list item is nullable.
pub fn examples_schema() -> SchemaRef {
    let utf8_list = DataType::List(item_field(DataType::Utf8));
    Arc::new(Schema::new(vec![
        Field::new(COL_QUERY_ID, DataType::Utf8, false),
        Field::new(COL_QUERY_TEXT, DataType::Utf8, false),
        Field::new(COL_QUERY_TYPE, DataType::Utf8, false),
        Field::new(COL_SOURCE_IDS, utf8_list.clone(), false),
        Field::new(COL_PASSAGE_IDS, utf8_list, false),
        Field::new(
            COL_SCORES,
            DataType::List(item_field(DataType::Float32)),
            false,
        ),
        Field::new(COL_SPLIT, DataType::Utf8, false),
    ]))
}

fn string_list<'a>(rows: impl Iterator<Item = &'a [String]>) -> ListArray {
    let mut builder = ListBuilder::new(StringBuilder::new()).with_field(item_field(DataType::Utf8));
    for row in rows {
        for s in row {
            builder.values().append_value(s);
        }
        builder.append(true);
    }
    builder.finish()
}

/// One batch holding `examples` in order. Fails when an example has a different number of
/// scores than passages.
pub fn examples_to_batch(examples: &[Example]) -> Result<RecordBatch, ArrowError> {
    if let Some(e) = examples
        .iter()
        .find(|e| e.scores.len() != e.passage_ids.len())
    {
        return Err(ArrowError::InvalidArgumentError(format!(
            "example `{}`: {} scores for {} passages",
            e.query_id,
            e.scores.len(),
            e.passage_ids.len()
        )));
    }
    let strings = |f: fn(&Example) -> &str| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(examples.iter().map(f)))
    };
    let mut scores =
        ListBuilder::new(Float32Builder::new()).with_field(item_field(DataType::Float32));
    for e in examples {
        scores.values().append_slice(&e.scores);
        scores.append(true);
    }
    let columns: Vec<ArrayRef> = vec![
        strings(|e| &e.query_id),
        strings(|e| &e.query_text),
        strings(|e| &e.query_type),
        Arc::new(string_list(examples.iter().map(|e| &e.source_ids[..]))),
        Arc::new(string_list(examples.iter().map(|e| &e.passage_ids[..]))),
        Arc::new(scores.finish()),
        strings(|e| e.split.as_str()),
    ];
    RecordBatch::try_new(examples_schema(), columns)
}

fn bad(what: String) -> ArrowError {
    ArrowError::SchemaError(format!("examples batch: {what}"))
}

fn string_column<'a>(batch: &'a RecordBatch, name: &str) -> Result<&'a StringArray, ArrowError> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<StringArray>())
        .ok_or_else(|| bad(format!("no utf8 column `{name}`")))
}

fn list_column<'a>(batch: &'a RecordBatch, name: &str) -> Result<&'a ListArray, ArrowError> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<ListArray>())
        .ok_or_else(|| bad(format!("no list column `{name}`")))
}

fn string_at(column: &StringArray, name: &str, row: usize) -> Result<String, ArrowError> {
    if column.is_null(row) {
        return Err(bad(format!("null `{name}` in row {row}")));
    }
    Ok(column.value(row).to_string())
}

fn strings_at(column: &ListArray, name: &str, row: usize) -> Result<Vec<String>, ArrowError> {
    if column.is_null(row) {
        return Err(bad(format!("null `{name}` in row {row}")));
    }
    let values = column.value(row);
    let values = values
        .as_any()
        .downcast_ref::<StringArray>()
        .ok_or_else(|| bad(format!("`{name}` items are not utf8")))?;
    if values.null_count() > 0 {
        return Err(bad(format!("null item in `{name}` in row {row}")));
    }
    Ok(values
        .iter()
        .map(|s| s.unwrap_or_default().to_string())
        .collect())
}

/// Reads examples back from a batch of [`examples_schema`] (columns are found by name).
/// Fails on a missing or mistyped column, a null, an unknown split, or a row with a
/// different number of scores than passages.
pub fn examples_from_batch(batch: &RecordBatch) -> Result<Vec<Example>, ArrowError> {
    let query_id = string_column(batch, COL_QUERY_ID)?;
    let query_text = string_column(batch, COL_QUERY_TEXT)?;
    let query_type = string_column(batch, COL_QUERY_TYPE)?;
    let source_ids = list_column(batch, COL_SOURCE_IDS)?;
    let passage_ids = list_column(batch, COL_PASSAGE_IDS)?;
    let scores = list_column(batch, COL_SCORES)?;
    let split = string_column(batch, COL_SPLIT)?;
    let mut examples = Vec::with_capacity(batch.num_rows());
    for row in 0..batch.num_rows() {
        if scores.is_null(row) {
            return Err(bad(format!("null `{COL_SCORES}` in row {row}")));
        }
        let row_scores = scores.value(row);
        let row_scores = row_scores
            .as_any()
            .downcast_ref::<Float32Array>()
            .ok_or_else(|| bad(format!("`{COL_SCORES}` items are not f32")))?;
        if row_scores.null_count() > 0 {
            return Err(bad(format!("null item in `{COL_SCORES}` in row {row}")));
        }
        let example = Example {
            query_id: string_at(query_id, COL_QUERY_ID, row)?,
            query_text: string_at(query_text, COL_QUERY_TEXT, row)?,
            query_type: string_at(query_type, COL_QUERY_TYPE, row)?,
            source_ids: strings_at(source_ids, COL_SOURCE_IDS, row)?,
            passage_ids: strings_at(passage_ids, COL_PASSAGE_IDS, row)?,
            scores: row_scores.values().to_vec(),
            split: string_at(split, COL_SPLIT, row)?
                .parse()
                .map_err(|e: String| bad(format!("row {row}: {e}")))?,
        };
        if example.scores.len() != example.passage_ids.len() {
            return Err(bad(format!(
                "row {row}: {} scores for {} passages",
                example.scores.len(),
                example.passage_ids.len()
            )));
        }
        examples.push(example);
    }
    Ok(examples)
}

/// Writes one JSON object per example, one per line (`\n`-terminated), keys in
/// [`Example`]'s field order. Scores are written as the shortest decimal that reads back
/// as the same f32.
pub fn write_examples_jsonl<W: Write>(mut writer: W, examples: &[Example]) -> std::io::Result<()> {
    for example in examples {
        serde_json::to_writer(&mut writer, example)?;
        writer.write_all(b"\n")?;
    }
    writer.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn sample() -> Vec<Example> {
        vec![
            Example {
                query_id: "q1".to_string(),
                query_text: "what is \"rust\"?".to_string(),
                query_type: "question".to_string(),
                source_ids: strings(&["p1"]),
                passage_ids: strings(&["p1", "p9", "p4"]),
                scores: vec![1.0, 0.25, 0.0],
                split: Split::Train,
            },
            Example {
                query_id: "q2".to_string(),
                query_text: "ferris crab".to_string(),
                query_type: "keywords".to_string(),
                source_ids: strings(&["p7", "p8"]),
                passage_ids: strings(&["p8"]),
                scores: vec![0.5],
                split: Split::Dev,
            },
        ]
    }

    #[test]
    fn arrow_round_trip_keeps_every_field() {
        let batch = examples_to_batch(&sample()).unwrap();
        assert_eq!(batch.schema(), examples_schema());
        assert_eq!(batch.num_rows(), 2);
        assert_eq!(examples_from_batch(&batch).unwrap(), sample());
        // A slice reads back as the rows it holds (list offsets are respected).
        assert_eq!(
            examples_from_batch(&batch.slice(1, 1)).unwrap(),
            sample()[1..]
        );
        assert!(examples_from_batch(&examples_to_batch(&[]).unwrap())
            .unwrap()
            .is_empty());
    }

    #[test]
    fn schema_types_are_the_documented_ones() {
        let schema = examples_schema();
        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        assert_eq!(
            names,
            vec![
                "query_id",
                "query_text",
                "query_type",
                "source_ids",
                "passage_ids",
                "scores",
                "split"
            ]
        );
        let utf8_list = DataType::List(Arc::new(Field::new("item", DataType::Utf8, false)));
        let f32_list = DataType::List(Arc::new(Field::new("item", DataType::Float32, false)));
        assert_eq!(schema.field(3).data_type(), &utf8_list);
        assert_eq!(schema.field(5).data_type(), &f32_list);
        assert!(schema.fields().iter().all(|f| !f.is_nullable()));
    }

    #[test]
    fn mismatched_scores_and_bad_batches_are_errors() {
        let mut bad_example = sample();
        bad_example[0].scores.pop();
        let err = examples_to_batch(&bad_example).unwrap_err();
        assert!(
            err.to_string()
                .contains("example `q1`: 2 scores for 3 passages"),
            "{err}"
        );

        let batch = examples_to_batch(&sample()).unwrap();
        let without_split = batch.project(&[0, 1, 2, 3, 4, 5]).unwrap();
        let err = examples_from_batch(&without_split).unwrap_err();
        assert!(err.to_string().contains("no utf8 column `split`"), "{err}");

        let mut columns = batch.columns().to_vec();
        columns[6] = Arc::new(StringArray::from(vec!["train", "test"]));
        let wrong_split = RecordBatch::try_new(batch.schema(), columns).unwrap();
        let err = examples_from_batch(&wrong_split).unwrap_err();
        assert!(err.to_string().contains("row 1: split `test`"), "{err}");
    }

    #[test]
    fn jsonl_lines_are_exact() {
        let mut out = Vec::new();
        write_examples_jsonl(&mut out, &sample()).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            concat!(
                r#"{"query_id":"q1","query_text":"what is \"rust\"?","query_type":"question","#,
                r#""source_ids":["p1"],"passage_ids":["p1","p9","p4"],"scores":[1.0,0.25,0.0],"#,
                r#""split":"train"}"#,
                "\n",
                r#"{"query_id":"q2","query_text":"ferris crab","query_type":"keywords","#,
                r#""source_ids":["p7","p8"],"passage_ids":["p8"],"scores":[0.5],"split":"dev"}"#,
                "\n",
            )
        );
        let back: Example = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(back, sample()[0]);
    }

    #[test]
    fn labelled_queries_become_examples_with_ids_and_a_split() {
        let table = strings(&["p0", "p1", "p2", "p3"]);
        let labelled = LabelledQuery {
            query_id: "q1".to_string(),
            sources: vec![2],
            passages: vec![2, 0, 3],
            scores: vec![1.0, 0.5, 0.0],
        };
        let config = TeacherConfig::default();
        let example = example_from_labelled(
            labelled.clone(),
            "text".to_string(),
            "claim".to_string(),
            &table,
            &config,
        )
        .unwrap();
        assert_eq!(example.source_ids, strings(&["p2"]));
        assert_eq!(example.passage_ids, strings(&["p2", "p0", "p3"]));
        assert_eq!(example.scores, vec![1.0, 0.5, 0.0]);
        assert_eq!(
            (example.query_text.as_str(), example.query_type.as_str()),
            ("text", "claim")
        );
        assert_eq!(example.split, split_of("q1", 42, 0.1));
        let all_dev = TeacherConfig {
            dev_fraction: 1.0,
            ..config.clone()
        };
        let dev = example_from_labelled(
            labelled.clone(),
            String::new(),
            String::new(),
            &table,
            &all_dev,
        );
        assert_eq!(dev.unwrap().split, Split::Dev);

        let err =
            example_from_labelled(labelled, String::new(), String::new(), &table[..3], &config)
                .unwrap_err();
        assert_eq!(
            err.to_string(),
            "query `q1`: passage 3 is not in the table of 3 passages"
        );
    }
}
