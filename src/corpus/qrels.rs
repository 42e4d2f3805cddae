//! Relevance judgements: BEIR's `qrels/*.tsv`, `query-id<TAB>corpus-id<TAB>score`.
//!
//! The first non-blank line is a header, and skipped, when it reads `query-id corpus-id
//! score` (any case, `_` accepted for `-`). Every row must have three columns, an
//! integer score, a query id from the known queries, a passage id from the known passages
//! when those are given, and must not repeat a (query, passage) pair. Qrels are small, so
//! they are read whole into a [`Qrels`] map.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use super::jsonl::utf8;
use super::lines::{is_blank, ByteLines, Line, MAX_LINE_BYTES};
use super::{bad_record, CorpusError, ReadOptions};
use crate::bad_record::BadRecord;
use crate::record::Qrels;

/// BEIR's column names, which are also the field names in error locations.
const COLUMNS: [&str; 3] = ["query-id", "corpus-id", "score"];

/// Reads a qrels TSV file, checking every row against `known_queries` and, when given,
/// `known_passages`. Bad rows follow `opts.policy`; `opts.format` is not consulted (qrels
/// are always TSV).
pub fn read_qrels(
    path: &Path,
    known_queries: &HashSet<String>,
    known_passages: Option<&HashSet<String>>,
    opts: &ReadOptions,
) -> Result<Qrels, CorpusError> {
    let mut lines = ByteLines::open(path)?;
    let mut qrels = Qrels::new();
    let mut first_line: HashMap<(String, String), u64> = HashMap::new();
    let mut started = false;
    while let Some(line) = lines.next_line()? {
        let (number, bytes) = match line {
            Line::TooLong { number, prefix } => {
                started = true;
                let reason = format!(
                    "expected a line of at most {MAX_LINE_BYTES} bytes, found a longer one"
                );
                opts.policy
                    .handle(bad_record(path, number, None, reason), &prefix)?;
                continue;
            }
            Line::Text { number, bytes } => (number, bytes),
        };
        if is_blank(&bytes) {
            continue;
        }
        let first = !started;
        started = true;
        let row = match parse_row(&bytes, path, number) {
            Ok(row) => row,
            Err(_) if first && is_header(&bytes) => continue,
            Err(bad) => {
                opts.policy.handle(bad, &bytes)?;
                continue;
            }
        };
        let checked = check_row(
            &row,
            path,
            number,
            known_queries,
            known_passages,
            &first_line,
        );
        match checked {
            Ok(()) => {
                let (query, passage, score) = row;
                first_line.insert((query.clone(), passage.clone()), number);
                qrels.entry(query).or_default().insert(passage, score);
            }
            Err(bad) => opts.policy.handle(bad, &bytes)?,
        }
    }
    Ok(qrels)
}

/// Splits a row into (query id, passage id, score).
fn parse_row(bytes: &[u8], file: &Path, line: u64) -> Result<(String, String, i32), BadRecord> {
    let text = utf8(bytes, file, line)?;
    let columns: Vec<&str> = text.split('\t').collect();
    let [query, passage, score] = columns.as_slice() else {
        let reason = format!(
            "expected 3 tab-separated columns ({}), found {} columns",
            COLUMNS.join(", "),
            columns.len()
        );
        return Err(bad_record(file, line, None, reason));
    };
    for (value, field) in [(query, COLUMNS[0]), (passage, COLUMNS[1])] {
        if value.is_empty() {
            let reason = "expected a non-empty id, found an empty column";
            return Err(bad_record(file, line, Some(field), reason));
        }
    }
    let score: i32 = score.trim().parse().map_err(|_| {
        let reason = format!("expected an integer, found `{score}`");
        bad_record(file, line, Some(COLUMNS[2]), reason)
    })?;
    Ok((query.to_string(), passage.to_string(), score))
}

fn check_row(
    (query, passage, _): &(String, String, i32),
    file: &Path,
    line: u64,
    known_queries: &HashSet<String>,
    known_passages: Option<&HashSet<String>>,
    first_line: &HashMap<(String, String), u64>,
) -> Result<(), BadRecord> {
    if !known_queries.contains(query) {
        let reason = format!("expected a query id from the queries file, found `{query}`");
        return Err(bad_record(file, line, Some(COLUMNS[0]), reason));
    }
    if known_passages.is_some_and(|known| !known.contains(passage)) {
        let reason = format!("expected a passage id from the corpus, found `{passage}`");
        return Err(bad_record(file, line, Some(COLUMNS[1]), reason));
    }
    if let Some(first) = first_line.get(&(query.clone(), passage.clone())) {
        let reason = format!(
            "expected one judgement per query and passage, found `{query}`, `{passage}` again \
             (first given on line {first})"
        );
        return Err(bad_record(file, line, Some(COLUMNS[1]), reason));
    }
    Ok(())
}

fn is_header(bytes: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return false;
    };
    let names: Vec<String> = text
        .split('\t')
        .map(|c| c.trim().to_ascii_lowercase().replace('_', "-"))
        .collect();
    names == COLUMNS
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is its job
mod tests {
    use super::*;
    use crate::corpus::{BadRecordPolicy, Quarantine};

    fn set(ids: &[&str]) -> HashSet<String> {
        ids.iter().map(|s| s.to_string()).collect()
    }

    fn write(body: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("test.tsv");
        std::fs::write(&path, body).unwrap();
        (dir, path)
    }

    fn fail_on(body: &str, passages: Option<&HashSet<String>>) -> BadRecord {
        let (_dir, path) = write(body);
        match read_qrels(&path, &set(&["1", "3"]), passages, &ReadOptions::default()) {
            Err(CorpusError::Bad(bad)) => bad,
            other => panic!("expected a bad record, got {other:?}"),
        }
    }

    #[test]
    fn reads_beir_qrels_with_header() {
        let (_dir, path) = write("query-id\tcorpus-id\tscore\n1\td1\t1\n1\td2\t0\n3\td1\t2\n");
        let qrels =
            read_qrels(&path, &set(&["1", "3", "5"]), None, &ReadOptions::default()).unwrap();
        assert_eq!(qrels.len(), 2);
        assert_eq!(qrels["1"]["d1"], 1);
        assert_eq!(qrels["1"]["d2"], 0);
        assert_eq!(qrels["3"]["d1"], 2);
    }

    #[test]
    fn header_is_optional_and_only_on_the_first_line() {
        let (_dir, path) = write("1\td1\t1\n");
        let qrels = read_qrels(&path, &set(&["1"]), None, &ReadOptions::default()).unwrap();
        assert_eq!(qrels["1"]["d1"], 1);
        let bad = fail_on("1\td1\t1\nquery-id\tcorpus-id\tscore\n", None);
        assert_eq!(
            (bad.location.line, bad.location.field.as_deref()),
            (2, Some("score"))
        );
    }

    #[test]
    fn bad_rows_are_named() {
        let bad = fail_on("query-id\tcorpus-id\tscore\n1\td1\t1\n7\td1\t1\n", None);
        assert_eq!(
            (bad.location.line, bad.location.field.as_deref()),
            (3, Some("query-id"))
        );
        assert_eq!(
            bad.reason,
            "expected a query id from the queries file, found `7`"
        );

        let bad = fail_on("1\td1\t1.5\n", None);
        assert_eq!(
            (bad.location.line, bad.location.field.as_deref()),
            (1, Some("score"))
        );
        assert_eq!(bad.reason, "expected an integer, found `1.5`");

        let bad = fail_on("1\td1\n", None);
        assert_eq!(bad.location.field, None);
        assert_eq!(
            bad.reason,
            "expected 3 tab-separated columns (query-id, corpus-id, score), found 2 columns"
        );

        let bad = fail_on("1\td9\t1\n", Some(&set(&["d1"])));
        assert_eq!(
            (bad.location.line, bad.location.field.as_deref()),
            (1, Some("corpus-id"))
        );

        let bad = fail_on("1\td1\t1\n3\td1\t1\n1\td1\t0\n", None);
        assert_eq!(bad.location.line, 3);
        assert!(
            bad.reason.ends_with("(first given on line 1)"),
            "{}",
            bad.reason
        );
    }

    #[test]
    fn skip_quarantines_bad_rows_and_keeps_the_rest() {
        let (dir, path) =
            write("query-id\tcorpus-id\tscore\n1\td1\t1\n9\td1\t1\n3\td2\tx\n3\td3\t1\n");
        let quarantine = Quarantine::open(&dir.path().join("q.jsonl")).unwrap();
        let opts = ReadOptions {
            policy: BadRecordPolicy::Skip(quarantine.clone()),
            ..ReadOptions::default()
        };
        let qrels = read_qrels(&path, &set(&["1", "3"]), None, &opts).unwrap();
        assert_eq!(qrels.len(), 2);
        assert_eq!(qrels["3"].len(), 1);
        assert_eq!(qrels["3"]["d3"], 1);
        assert_eq!(quarantine.finish().unwrap(), 2);
    }

    #[test]
    fn empty_file_is_empty_qrels_and_missing_file_an_error() {
        let (_dir, path) = write("");
        assert!(read_qrels(&path, &set(&[]), None, &ReadOptions::default())
            .unwrap()
            .is_empty());
        let err = read_qrels(
            Path::new("/no/qrels.tsv"),
            &set(&[]),
            None,
            &ReadOptions::default(),
        )
        .unwrap_err();
        assert!(matches!(err, CorpusError::Io { .. }));
        assert!(
            err.to_string().starts_with("cannot read /no/qrels.tsv: "),
            "{err}"
        );
    }
}
