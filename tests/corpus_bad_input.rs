//! Bad input, read under both policies: every kind of bad record is named by file, line
//! and field; under `Fail` reading stops there, under `Skip` the record lands in the
//! quarantine file and the good records around it are still read. Plus one happy path
//! per format, and the shipped scifact-mini dataset read end to end.

// A test that unwraps fails loudly, which is its job.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use distillery::corpus::{
    open_passages, open_queries, read_qrels, BadRecordPolicy, CorpusError, Quarantine, ReadOptions,
};
use distillery::error::BadRecord;
use distillery::record::{Passage, Query};
use serde_json::{json, Value};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/bad_input")
        .join(name)
}

/// One bad record in a fixture: where it is, what is said about it, and its raw line.
struct Case {
    file: &'static str,
    line: u64,
    field: Option<&'static str>,
    reason: &'static str,
    raw: &'static [u8],
    /// Ids read before the bad record, and all ids read when it is skipped.
    before: &'static [&'static str],
    all_good: &'static [&'static str],
}

const PASSAGE_CASES: &[Case] = &[
    Case {
        file: "malformed_json.jsonl",
        line: 2,
        field: None,
        reason:
            "expected a JSON object, found malformed JSON (EOF while parsing a string at column 34)",
        raw: br#"{"_id": "b", "text": "unterminated"#,
        before: &["a"],
        all_good: &["a", "c"],
    },
    Case {
        file: "missing_id.jsonl",
        line: 2,
        field: Some("_id"),
        reason: "expected a non-empty string or an integer, found no such field",
        raw: br#"{"title": "T", "text": "no id"}"#,
        before: &["a"],
        all_good: &["a", "c"],
    },
    Case {
        file: "missing_text.jsonl",
        line: 2,
        field: Some("text"),
        reason: "expected a string, found no such field",
        raw: br#"{"_id": "b", "title": "only a title"}"#,
        before: &["a"],
        all_good: &["a", "c"],
    },
    Case {
        file: "wrong_type.jsonl",
        line: 2,
        field: Some("text"),
        reason: "expected a string, found a number (42)",
        raw: br#"{"_id": "b", "text": 42}"#,
        before: &["a"],
        all_good: &["a", "c"],
    },
    Case {
        file: "duplicate_id.jsonl",
        line: 4,
        field: Some("_id"),
        reason: "expected a unique id, found `a` again (first seen on line 1)",
        raw: br#"{"_id": "a", "text": "again"}"#,
        before: &["a", "b"],
        all_good: &["a", "b", "c"],
    },
    Case {
        file: "invalid_utf8.jsonl",
        line: 2,
        field: None,
        reason: "expected UTF-8 text, found invalid byte 0xE9 at byte 26",
        raw: b"{\"_id\": \"b\", \"text\": \"caf\xe9\"}",
        before: &["a"],
        all_good: &["a", "c"],
    },
    Case {
        file: "wrong_columns.tsv",
        line: 3,
        field: None,
        reason: "expected 3 tab-separated columns (id, title, text), found 2 columns",
        raw: b"b\tonly two",
        before: &["a"],
        all_good: &["a", "c"],
    },
];

fn skip_options(dir: &Path) -> (ReadOptions, Quarantine) {
    let quarantine = Quarantine::open(&dir.join("quarantine.jsonl")).unwrap();
    let opts = ReadOptions {
        policy: BadRecordPolicy::Skip(quarantine.clone()),
        ..ReadOptions::default()
    };
    (opts, quarantine)
}

fn assert_location(bad: &BadRecord, case: &Case) {
    assert_eq!(bad.location.file, fixture(case.file), "{}", case.file);
    assert_eq!(bad.location.line, case.line, "{}", case.file);
    assert_eq!(bad.location.field.as_deref(), case.field, "{}", case.file);
    assert_eq!(bad.reason, case.reason, "{}", case.file);
}

/// The quarantine file's entries, flushed first.
fn quarantined(quarantine: &Quarantine) -> Vec<Value> {
    quarantine.finish().unwrap();
    std::fs::read_to_string(quarantine.path())
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

fn expected_entry(case: &Case) -> Value {
    json!({
        "file": fixture(case.file).display().to_string(),
        "line": case.line,
        "field": case.field,
        "reason": case.reason,
        "raw": String::from_utf8_lossy(case.raw),
        "raw_bytes": case.raw.len(),
    })
}

#[test]
fn fail_policy_stops_at_each_bad_passage_and_names_it() {
    for case in PASSAGE_CASES {
        let mut reader = open_passages(&fixture(case.file), &ReadOptions::default()).unwrap();
        let mut ids = Vec::new();
        let error = loop {
            match reader.next() {
                Some(Ok(passage)) => ids.push(passage.id),
                Some(Err(e)) => break e,
                None => panic!("{}: read to the end without an error", case.file),
            }
        };
        assert_eq!(ids, case.before, "{}", case.file);
        match &error {
            CorpusError::Bad(bad) => assert_location(bad, case),
            other => panic!("{}: expected a bad record, got {other}", case.file),
        }
        assert!(
            reader.next().is_none(),
            "{}: read on after failing",
            case.file
        );
        assert_eq!(reader.skipped(), 0);
    }
}

#[test]
fn skip_policy_quarantines_each_bad_passage_and_reads_on() {
    for case in PASSAGE_CASES {
        let dir = tempfile::tempdir().unwrap();
        let (opts, quarantine) = skip_options(dir.path());
        let mut reader = open_passages(&fixture(case.file), &opts).unwrap();
        let ids: Vec<String> = reader.by_ref().map(|p| p.unwrap().id).collect();
        assert_eq!(ids, case.all_good, "{}", case.file);
        assert_eq!(reader.skipped(), 1, "{}", case.file);
        assert_eq!(
            quarantined(&quarantine),
            vec![expected_entry(case)],
            "{}",
            case.file
        );
    }
}

#[test]
fn one_quarantine_is_shared_by_several_readers() {
    let dir = tempfile::tempdir().unwrap();
    let (opts, quarantine) = skip_options(dir.path());
    for case in PASSAGE_CASES {
        let count = open_passages(&fixture(case.file), &opts).unwrap().count();
        assert_eq!(count, case.all_good.len());
    }
    let entries = quarantined(&quarantine);
    let expected: Vec<Value> = PASSAGE_CASES.iter().map(expected_entry).collect();
    assert_eq!(entries, expected);
    assert_eq!(quarantine.count(), PASSAGE_CASES.len() as u64);
}

#[test]
fn bad_query_under_both_policies() {
    let case = Case {
        file: "queries.jsonl",
        line: 2,
        field: Some("text"),
        reason: "expected a string, found no such field",
        raw: br#"{"_id": "q2"}"#,
        before: &["q1"],
        all_good: &["q1", "q3"],
    };
    let results: Vec<Result<Query, CorpusError>> =
        open_queries(&fixture(case.file), &ReadOptions::default())
            .unwrap()
            .collect();
    assert_eq!(results.len(), 2);
    assert_eq!(results[0].as_ref().unwrap().id, "q1");
    match &results[1] {
        Err(CorpusError::Bad(bad)) => assert_location(bad, &case),
        other => panic!("expected a bad record, got {other:?}"),
    }

    let dir = tempfile::tempdir().unwrap();
    let (opts, quarantine) = skip_options(dir.path());
    let mut reader = open_queries(&fixture(case.file), &opts).unwrap();
    let ids: Vec<String> = reader.by_ref().map(|q| q.unwrap().id).collect();
    assert_eq!(ids, case.all_good);
    assert_eq!(reader.skipped(), 1);
    assert_eq!(quarantined(&quarantine), vec![expected_entry(&case)]);
}

const QRELS_CASES: &[Case] = &[
    Case {
        file: "unknown_query_qrels.tsv",
        line: 3,
        field: Some("query-id"),
        reason: "expected a query id from the queries file, found `q9`",
        raw: b"q9\tb\t1",
        before: &[],
        all_good: &["q1/a", "q3/c"],
    },
    Case {
        file: "non_integer_score_qrels.tsv",
        line: 3,
        field: Some("score"),
        reason: "expected an integer, found `high`",
        raw: b"q3\tb\thigh",
        before: &[],
        all_good: &["q1/a", "q3/c"],
    },
];

#[test]
fn bad_qrels_rows_under_both_policies() {
    let known: HashSet<String> = ["q1", "q3"].iter().map(|s| s.to_string()).collect();
    for case in QRELS_CASES {
        match read_qrels(&fixture(case.file), &known, None, &ReadOptions::default()) {
            Err(CorpusError::Bad(bad)) => assert_location(&bad, case),
            other => panic!("{}: expected a bad record, got {other:?}", case.file),
        }

        let dir = tempfile::tempdir().unwrap();
        let (opts, quarantine) = skip_options(dir.path());
        let qrels = read_qrels(&fixture(case.file), &known, None, &opts).unwrap();
        let pairs: Vec<String> = qrels
            .iter()
            .flat_map(|(q, docs)| docs.keys().map(move |d| format!("{q}/{d}")))
            .collect();
        assert_eq!(pairs, case.all_good, "{}", case.file);
        assert_eq!(
            quarantined(&quarantine),
            vec![expected_entry(case)],
            "{}",
            case.file
        );
    }
}

#[test]
fn empty_file_is_an_error_and_missing_file_names_its_path() {
    let empty = fixture("empty.jsonl");
    let read: Vec<_> = open_passages(&empty, &ReadOptions::default())
        .unwrap()
        .collect();
    match read.as_slice() {
        [Err(
            e @ CorpusError::NoRecords {
                path, skipped: 0, ..
            },
        )] => {
            assert_eq!(path, &empty);
            assert!(e.to_string().contains("the file is empty"), "{e}");
        }
        other => panic!("expected one NoRecords error, got {other:?}"),
    }

    let missing = fixture("no_such_corpus.jsonl");
    let err = open_passages(&missing, &ReadOptions::default()).unwrap_err();
    match &err {
        CorpusError::Io { path, .. } => assert_eq!(path, &missing),
        other => panic!("expected an I/O error, got {other}"),
    }
    assert!(err.to_string().contains("no_such_corpus.jsonl"), "{err}");
}

fn read_all(path: &Path) -> Vec<Passage> {
    open_passages(path, &ReadOptions::default())
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

fn passage(id: &str, title: &str, text: &str) -> Passage {
    Passage {
        id: id.into(),
        title: title.into(),
        text: text.into(),
    }
}

#[test]
fn happy_path_jsonl_with_integer_ids_and_optional_titles() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("corpus.jsonl");
    let body = "{\"_id\": 12, \"title\": \"T\", \"text\": \"x\", \"metadata\": {}}\n\
                {\"_id\": \"b\", \"text\": \"y\"}\r\n";
    std::fs::write(&path, body).unwrap();
    assert_eq!(
        read_all(&path),
        vec![passage("12", "T", "x"), passage("b", "", "y")]
    );
}

#[test]
fn happy_path_tsv() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("passages.tsv");
    std::fs::write(
        &path,
        "id\ttitle\ttext\np1\tA title\tsome text\np2\t\tuntitled\n",
    )
    .unwrap();
    assert_eq!(
        read_all(&path),
        vec![
            passage("p1", "A title", "some text"),
            passage("p2", "", "untitled")
        ]
    );
}

#[test]
fn happy_path_parquet() {
    use arrow::array::{ArrayRef, LargeStringArray, RecordBatch, StringArray};
    use parquet::arrow::ArrowWriter;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("passages.parquet");
    let batch = RecordBatch::try_from_iter(vec![
        (
            "_id",
            Arc::new(StringArray::from(vec!["p1", "p2"])) as ArrayRef,
        ),
        (
            "title",
            Arc::new(StringArray::from(vec![Some("A title"), None])) as ArrayRef,
        ),
        (
            "text",
            Arc::new(LargeStringArray::from(vec!["some text", "untitled"])) as ArrayRef,
        ),
    ])
    .unwrap();
    let file = std::fs::File::create(&path).unwrap();
    let mut writer = ArrowWriter::try_new(file, batch.schema(), None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
    assert_eq!(
        read_all(&path),
        vec![
            passage("p1", "A title", "some text"),
            passage("p2", "", "untitled")
        ]
    );
}

#[test]
fn shipped_scifact_mini_reads_cleanly() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("datasets/scifact-mini");
    let passages = read_all(&root.join("corpus.jsonl"));
    assert_eq!(passages.len(), 500);
    let queries: Vec<Query> = open_queries(&root.join("queries.jsonl"), &ReadOptions::default())
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(queries.len(), 127);
    let query_ids: HashSet<String> = queries.into_iter().map(|q| q.id).collect();
    let passage_ids: HashSet<String> = passages.into_iter().map(|p| p.id).collect();
    let qrels = read_qrels(
        &root.join("qrels/test.tsv"),
        &query_ids,
        Some(&passage_ids),
        &ReadOptions::default(),
    )
    .unwrap();
    // Every shipped query has at least one judgement, and the file has 146 rows.
    assert_eq!(qrels.len(), 127);
    assert_eq!(qrels.values().map(|docs| docs.len()).sum::<usize>(), 146);
    // The first row of qrels/test.tsv.
    assert_eq!(qrels["1"]["31715818"], 1);
}
