//! TREC run files, the format trec_eval reads: one line per retrieved passage,
//! `qid Q0 docid rank score tag`, fields separated by whitespace.
//!
//! Writing: queries in id order, each query's results in trec_eval's rank order
//! ([`trec_order`]) with 1-based ranks in that order. A score is written as the shortest
//! decimal that reads back as the same `f32`, so trec_eval, which re-sorts by the score
//! it reads, ranks exactly as we do. Ids and the tag must be non-empty and free of ASCII
//! whitespace and scores finite; the whole run is checked before the first byte is
//! written, so a refused run leaves no partial output.
//!
//! Reading: blank lines are skipped; every other line needs exactly six fields. Field 2
//! is ignored (writers use `Q0` or `0`; trec_eval ignores it too). The rank must be a
//! non-negative integer but is not used: like trec_eval, the order comes from the
//! scores. Scores must be finite. A passage listed twice for one query is an error, as
//! in trec_eval. Each query's results keep file order.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use super::metrics::{trec_order, Run};
use crate::bad_record::{BadRecord, Location};

/// Fields per line: qid, Q0, docid, rank, score, tag.
const FIELDS: usize = 6;
/// The literal trec_eval's documentation puts in field 2.
const ITER_FIELD: &str = "Q0";

/// Problems reading or writing a TREC run.
#[derive(Debug, thiserror::Error)]
pub enum TrecError {
    /// The file could not be opened, read or written.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A line is not a valid run record.
    #[error(transparent)]
    BadRecord(#[from] BadRecord),
    /// A value cannot be written as one whitespace-free TREC field.
    #[error("cannot write {field} `{value}` in a TREC run: {reason}")]
    Unwritable {
        field: &'static str,
        value: String,
        reason: &'static str,
    },
}

/// Writes `run` as a TREC run with the given `tag` (the run's name); `file` names the
/// destination in errors.
pub fn write_run<W: Write>(out: W, file: &Path, run: &Run, tag: &str) -> Result<(), TrecError> {
    check_field("tag", tag)?;
    for (query, results) in run {
        check_field("qid", query)?;
        for (passage, score) in results {
            check_field("docid", passage)?;
            if !score.is_finite() {
                return Err(TrecError::Unwritable {
                    field: "score",
                    value: score.to_string(),
                    reason: "not a finite number",
                });
            }
        }
    }
    let io_error = |source| TrecError::Io {
        path: file.to_owned(),
        source,
    };
    let mut out = BufWriter::new(out);
    for (query, results) in run {
        let mut ranked: Vec<(&str, f32)> = results.iter().map(|(p, s)| (p.as_str(), *s)).collect();
        ranked.sort_by(|a, b| trec_order(*a, *b));
        for (i, (passage, score)) in ranked.iter().enumerate() {
            let rank = i + 1;
            writeln!(out, "{query} {ITER_FIELD} {passage} {rank} {score} {tag}")
                .map_err(io_error)?;
        }
    }
    out.flush().map_err(io_error)
}

/// Creates (or truncates) `path` and writes `run` to it; see [`write_run`].
pub fn write_run_file(path: &Path, run: &Run, tag: &str) -> Result<(), TrecError> {
    let file = File::create(path).map_err(|source| TrecError::Io {
        path: path.to_owned(),
        source,
    })?;
    write_run(file, path, run, tag)
}

fn check_field(field: &'static str, value: &str) -> Result<(), TrecError> {
    let reason = if value.is_empty() {
        "empty"
    } else if value.bytes().any(|b| b.is_ascii_whitespace()) {
        "contains whitespace"
    } else {
        return Ok(());
    };
    Err(TrecError::Unwritable {
        field,
        value: value.to_owned(),
        reason,
    })
}

/// Reads a TREC run; `file` names the source in errors.
pub fn read_run<R: BufRead>(mut input: R, file: &Path) -> Result<Run, TrecError> {
    // Query -> (passage, score, line), to name both lines of a duplicate.
    let mut lines: BTreeMap<String, Vec<(String, f32, u64)>> = BTreeMap::new();
    let mut buf = Vec::new();
    let mut line_no = 0u64;
    loop {
        buf.clear();
        let read = input
            .read_until(b'\n', &mut buf)
            .map_err(|source| TrecError::Io {
                path: file.to_owned(),
                source,
            })?;
        if read == 0 {
            break;
        }
        line_no += 1;
        let bad = |field: Option<&str>, reason: String| BadRecord {
            location: Location {
                file: file.to_owned(),
                line: line_no,
                field: field.map(str::to_owned),
            },
            reason,
        };
        let text = std::str::from_utf8(&buf).map_err(|e| bad(None, format!("not UTF-8 ({e})")))?;
        let fields: Vec<&str> = text.split_ascii_whitespace().collect();
        if fields.is_empty() {
            continue;
        }
        let [query, _iter, passage, rank, score, _tag] = fields[..] else {
            return Err(bad(
                None,
                format!(
                    "expected {FIELDS} whitespace-separated fields (qid Q0 docid rank score tag), found {}",
                    fields.len()
                ),
            )
            .into());
        };
        if rank.parse::<u64>().is_err() {
            let reason = format!("expected a non-negative integer, found `{rank}`");
            return Err(bad(Some("rank"), reason).into());
        }
        let score = match score.parse::<f32>() {
            Ok(s) if s.is_finite() => s,
            _ => {
                let reason = format!("expected a finite number, found `{score}`");
                return Err(bad(Some("score"), reason).into());
            }
        };
        lines
            .entry(query.to_owned())
            .or_default()
            .push((passage.to_owned(), score, line_no));
    }
    let mut run = Run::new();
    for (query, results) in lines {
        reject_duplicates(&query, &results, file)?;
        let results = results.into_iter().map(|(p, s, _)| (p, s)).collect();
        run.insert(query, results);
    }
    Ok(run)
}

/// Opens and reads `path`; see [`read_run`].
pub fn read_run_file(path: &Path) -> Result<Run, TrecError> {
    let file = File::open(path).map_err(|source| TrecError::Io {
        path: path.to_owned(),
        source,
    })?;
    read_run(BufReader::new(file), path)
}

/// Fails on the later line of the first repeated passage (by line) of one query.
fn reject_duplicates(
    query: &str,
    results: &[(String, f32, u64)],
    file: &Path,
) -> Result<(), BadRecord> {
    let mut by_passage: Vec<(&str, u64)> =
        results.iter().map(|(p, _, l)| (p.as_str(), *l)).collect();
    by_passage.sort_unstable();
    let first_repeat = by_passage
        .windows(2)
        .filter(|w| w[0].0 == w[1].0)
        .min_by_key(|w| w[1].1);
    match first_repeat {
        None => Ok(()),
        Some(w) => Err(BadRecord {
            location: Location {
                file: file.to_owned(),
                line: w[1].1,
                field: Some("docid".to_owned()),
            },
            reason: format!(
                "passage `{}` already listed for query `{query}` on line {}",
                w[0].0, w[0].1
            ),
        }),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is its job
mod tests {
    use super::*;

    fn run(entries: &[(&str, &[(&str, f32)])]) -> Run {
        entries
            .iter()
            .map(|(q, rs)| {
                let rs = rs.iter().map(|(p, s)| (p.to_string(), *s)).collect();
                (q.to_string(), rs)
            })
            .collect()
    }

    fn written(run: &Run, tag: &str) -> Result<String, TrecError> {
        let mut out = Vec::new();
        write_run(&mut out, Path::new("out.trec"), run, tag)?;
        Ok(String::from_utf8(out).unwrap())
    }

    fn read(text: &str) -> Result<Run, TrecError> {
        read_run(text.as_bytes(), Path::new("run.trec"))
    }

    #[test]
    fn writes_in_trec_order_and_reads_back() {
        // q1: 0.5 first; d9 and d10 tie at 0.25 and rank by id descending ("d9" > "d10").
        let original = run(&[
            ("q2", &[("x", -1.5)]),
            ("q1", &[("d10", 0.25), ("a", 0.5), ("d9", 0.25)]),
        ]);
        let text = written(&original, "bm25").unwrap();
        assert_eq!(
            text,
            "q1 Q0 a 1 0.5 bm25\nq1 Q0 d9 2 0.25 bm25\nq1 Q0 d10 3 0.25 bm25\n\
             q2 Q0 x 1 -1.5 bm25\n"
        );
        let back = read(&text).unwrap();
        let expected = run(&[
            ("q1", &[("a", 0.5), ("d9", 0.25), ("d10", 0.25)]),
            ("q2", &[("x", -1.5)]),
        ]);
        assert_eq!(back, expected);
    }

    #[test]
    fn scores_round_trip_bit_for_bit() {
        let scores = [0.1f32, 1.0 / 3.0, 1e-30, 3.4e38, -0.0];
        let results: Vec<(&str, f32)> = ["a", "b", "c", "d", "e"].into_iter().zip(scores).collect();
        let original = run(&[("q", &results)]);
        let back = read(&written(&original, "t").unwrap()).unwrap();
        let mut got: Vec<(String, u32)> = back["q"]
            .iter()
            .map(|(p, s)| (p.clone(), s.to_bits()))
            .collect();
        got.sort();
        let want: Vec<(String, u32)> = results
            .iter()
            .map(|(p, s)| (p.to_string(), s.to_bits()))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn file_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.trec");
        let original = run(&[("q", &[("p", 2.0)])]);
        write_run_file(&path, &original, "tag").unwrap();
        assert_eq!(read_run_file(&path).unwrap(), original);
    }

    #[test]
    fn reader_skips_blank_lines_and_accepts_tabs_and_crlf() {
        let back = read("\nq\t0\tp\t0\t1e2\tt\r\n   \n").unwrap();
        assert_eq!(back, run(&[("q", &[("p", 100.0)])]));
    }

    #[test]
    fn wrong_field_count_names_the_line() {
        let err = read("q Q0 p 1 0.5 t\nq Q0 r 2 0.4\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "run.trec:2: expected 6 whitespace-separated fields (qid Q0 docid rank score tag), found 5"
        );
    }

    #[test]
    fn bad_score_and_rank_name_the_field() {
        let err = read("q Q0 p 1 high t\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "run.trec:1 field `score`: expected a finite number, found `high`"
        );
        let err = read("q Q0 p 1 NaN t\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "run.trec:1 field `score`: expected a finite number, found `NaN`"
        );
        let err = read("q Q0 p -1 0.5 t\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "run.trec:1 field `rank`: expected a non-negative integer, found `-1`"
        );
    }

    #[test]
    fn duplicate_passage_names_both_lines() {
        let err = read("q Q0 p 1 0.5 t\nq Q0 r 2 0.4 t\nq Q0 p 3 0.3 t\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "run.trec:3 field `docid`: passage `p` already listed for query `q` on line 1"
        );
        // The same passage under two queries is fine.
        assert!(read("q Q0 p 1 0.5 t\nr Q0 p 1 0.5 t\n").is_ok());
    }

    #[test]
    fn invalid_utf8_is_a_bad_record() {
        let err = read_run(
            &b"q Q0 p 1 0.5 t\nq Q0 \xff 2 0.4 t\n"[..],
            Path::new("run.trec"),
        )
        .unwrap_err();
        assert!(
            err.to_string().starts_with("run.trec:2: not UTF-8"),
            "{err}"
        );
    }

    #[test]
    fn refuses_unwritable_values_before_writing() {
        let spaced = run(&[("q", &[("a b", 1.0)])]);
        let err = written(&spaced, "t").unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot write docid `a b` in a TREC run: contains whitespace"
        );
        let nan = run(&[("q", &[("a", f32::NAN)])]);
        assert_eq!(
            written(&nan, "t").unwrap_err().to_string(),
            "cannot write score `NaN` in a TREC run: not a finite number"
        );
        let err = written(&run(&[("q", &[("a", 1.0)])]), "").unwrap_err();
        assert!(matches!(err, TrecError::Unwritable { field: "tag", .. }));
        // The first query is fine, the second is not: nothing at all is written.
        let mut out = Vec::new();
        let late = run(&[("a", &[("p", 1.0)]), ("b", &[("", 1.0)])]);
        let err = write_run(&mut out, Path::new("o"), &late, "t").unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot write docid `` in a TREC run: empty"
        );
        assert!(out.is_empty());
    }
}
