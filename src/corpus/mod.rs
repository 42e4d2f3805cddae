//! Streaming readers for corpora, queries and relevance judgements.
//!
//! Contracts:
//! - **Streaming.** [`open_passages`] and [`open_queries`] return iterators that read one
//!   line (or one Parquet batch) at a time; a corpus larger than memory is never loaded
//!   whole. The only state that grows with the file is the set of ids seen so far, kept
//!   to report duplicates. Qrels are small and [`read_qrels`] reads them whole.
//! - **Formats** are chosen by extension unless [`ReadOptions::format`] says otherwise:
//!   `.jsonl`/`.json` (BEIR JSON lines), `.tsv`, `.parquet` for passages; `.jsonl`/`.json`
//!   and `.tsv` for queries. Field by field they are described in `datasets/README.md`.
//!   An `_id` written as a JSON integer (as some BEIR files do) is read as its decimal
//!   string; a Parquet id column may likewise be an integer column.
//! - **Bad input is named.** Every problem with a record is a [`BadRecord`] giving the
//!   file, the 1-based line (the row, for Parquet), the field and what was expected
//!   versus found. A duplicate id names the line where the id was first seen. Blank lines
//!   in text formats hold no record and are passed over. A file with no good record
//!   (empty, only blank lines, or every record bad and quarantined) ends with
//!   [`CorpusError::NoRecords`]: a run over nothing is a mistake, never a silent
//!   success. A missing file is [`CorpusError::Io`] naming its path.
//! - **Nothing is dropped without a trace.** Under [`BadRecordPolicy::Fail`] (the
//!   default) the iterator yields the error and then ends. Under
//!   [`BadRecordPolicy::Skip`] each bad record goes to the [`Quarantine`] file and
//!   reading goes on; `skipped()` counts them. Problems with a whole file (unreadable,
//!   not Parquet, a required column missing) end the read under either policy.

mod jsonl;
mod lines;
mod pairs;
mod parquet;
mod qrels;
mod quarantine;
mod tsv;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::bad_record::{BadRecord, Location};
use crate::record::{Passage, Query};

pub use lines::MAX_LINE_BYTES;
pub use pairs::{open_pairs, Pair, PairReader};
pub use qrels::read_qrels;
pub use quarantine::{Quarantine, MAX_RAW_BYTES};

/// Corpus file names looked for in a BEIR dataset directory, in order.
pub const CORPUS_FILES: [&str; 3] = ["corpus.jsonl", "corpus.parquet", "corpus.tsv"];

/// Errors from reading corpus, query and qrels files.
#[derive(Debug, thiserror::Error)]
pub enum CorpusError {
    /// A file could not be opened or read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A record is not what it should be; line 0 means the file's layout as a whole.
    #[error(transparent)]
    Bad(#[from] BadRecord),
    /// The file's extension names no format that this kind of file can be read from.
    #[error("{}: unknown format; expected a file ending in {expected}", path.display())]
    UnknownFormat {
        path: PathBuf,
        expected: &'static str,
    },
    /// The Parquet decoder failed: the file is corrupt or not Parquet at all.
    #[error("cannot read Parquet file {}: {source}", path.display())]
    Parquet {
        path: PathBuf,
        #[source]
        source: ::parquet::errors::ParquetError,
    },
    /// The file holds no good record: it is empty, or every record was bad and skipped.
    #[error("{}: no records{}", path.display(), match (skipped, quarantine) {
        (0, _) => " (the file is empty)".to_string(),
        (n, Some(q)) => format!(": all {n} were bad and are in {}", q.display()),
        (n, None) => format!(": all {n} were bad"),
    })]
    NoRecords {
        path: PathBuf,
        skipped: u64,
        quarantine: Option<PathBuf>,
    },
    /// The quarantine file could not be created or written.
    #[error("cannot write quarantine file {}: {source}", path.display())]
    Quarantine {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What a reader does with a bad record.
#[derive(Clone, Debug, Default)]
pub enum BadRecordPolicy {
    /// Yield the error and stop reading.
    #[default]
    Fail,
    /// Write the record to this quarantine and read on.
    Skip(Quarantine),
}

impl BadRecordPolicy {
    /// Applies the policy to one bad record: under `Fail` returns it as the error, under
    /// `Skip` quarantines it and returns `Ok`.
    pub(crate) fn handle(&self, bad: BadRecord, raw: &[u8]) -> Result<(), CorpusError> {
        match self {
            BadRecordPolicy::Fail => Err(CorpusError::Bad(bad)),
            BadRecordPolicy::Skip(quarantine) => quarantine.record(&bad, raw),
        }
    }
}

/// A file format a reader understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// One JSON object per line (BEIR `corpus.jsonl`, `queries.jsonl`).
    JsonLines,
    /// Tab-separated columns, one record per line, no quoting.
    Tsv,
    /// Apache Parquet with string columns (passages only).
    Parquet,
}

impl Format {
    /// The format named by `path`'s extension (case-insensitive), if any.
    pub fn from_extension(path: &Path) -> Option<Format> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "jsonl" | "json" => Some(Format::JsonLines),
            "tsv" => Some(Format::Tsv),
            "parquet" => Some(Format::Parquet),
            _ => None,
        }
    }
}

/// How to read a file.
#[derive(Clone, Debug, Default)]
pub struct ReadOptions {
    /// What to do with bad records. Default: fail on the first.
    pub policy: BadRecordPolicy,
    /// The file's format; `None` (the default) chooses it by extension.
    pub format: Option<Format>,
}

/// One step of a source: a record, or a bad record with its raw bytes.
pub(crate) enum Item<T> {
    Good(T),
    Bad { error: BadRecord, raw: Vec<u8> },
}

/// A file read record by record; `Err` is fatal, a bad record is an [`Item::Bad`].
pub(crate) trait Source {
    type Record;
    fn next_item(&mut self) -> Result<Option<Item<Self::Record>>, CorpusError>;
}

/// Builds the [`BadRecord`] for a location.
pub(crate) fn bad_record(
    file: &Path,
    line: u64,
    field: Option<&str>,
    reason: impl Into<String>,
) -> BadRecord {
    BadRecord {
        location: Location {
            file: file.to_path_buf(),
            line,
            field: field.map(str::to_string),
        },
        reason: reason.into(),
    }
}

/// The ids met so far and the line each was first met on.
#[derive(Default)]
pub(crate) struct SeenIds {
    first_line: HashMap<String, u64>,
}

impl SeenIds {
    /// Records `id` as seen on `line`, or names the line it was first seen on.
    pub(crate) fn check(
        &mut self,
        id: &str,
        file: &Path,
        line: u64,
        field: &str,
    ) -> Result<(), BadRecord> {
        if let Some(first) = self.first_line.get(id) {
            return Err(bad_record(
                file,
                line,
                Some(field),
                format!("expected a unique id, found `{id}` again (first seen on line {first})"),
            ));
        }
        self.first_line.insert(id.to_string(), line);
        Ok(())
    }
}

/// Applies a policy to a source's items; ends after the first error it yields.
struct Driver<S> {
    source: S,
    path: PathBuf,
    policy: BadRecordPolicy,
    skipped: u64,
    good: u64,
    done: bool,
}

impl<S: Source> Driver<S> {
    fn new(source: S, path: &Path, policy: BadRecordPolicy) -> Self {
        Driver {
            source,
            path: path.to_path_buf(),
            policy,
            skipped: 0,
            good: 0,
            done: false,
        }
    }

    fn next_record(&mut self) -> Option<Result<S::Record, CorpusError>> {
        while !self.done {
            let outcome = match self.source.next_item() {
                Ok(None) if self.good == 0 => Some(Err(CorpusError::NoRecords {
                    path: self.path.clone(),
                    skipped: self.skipped,
                    quarantine: match &self.policy {
                        BadRecordPolicy::Skip(q) => Some(q.path().to_path_buf()),
                        BadRecordPolicy::Fail => None,
                    },
                })),
                Ok(None) => None,
                Ok(Some(Item::Good(record))) => {
                    self.good += 1;
                    return Some(Ok(record));
                }
                Ok(Some(Item::Bad { error, raw })) => match self.policy.handle(error, &raw) {
                    Ok(()) => {
                        self.skipped += 1;
                        continue;
                    }
                    Err(e) => Some(Err(e)),
                },
                Err(e) => Some(Err(e)),
            };
            self.done = true;
            return outcome;
        }
        None
    }
}

enum PassageSource {
    Jsonl(jsonl::JsonlSource<Passage>),
    Tsv(tsv::TsvSource<Passage>),
    Parquet(parquet::ParquetSource),
}

impl Source for PassageSource {
    type Record = Passage;
    fn next_item(&mut self) -> Result<Option<Item<Passage>>, CorpusError> {
        match self {
            PassageSource::Jsonl(s) => s.next_item(),
            PassageSource::Tsv(s) => s.next_item(),
            PassageSource::Parquet(s) => s.next_item(),
        }
    }
}

/// Passages of one file, in file order. See the module docs for the contract.
pub struct PassageReader {
    driver: Driver<PassageSource>,
    path: PathBuf,
}

impl PassageReader {
    /// The file being read.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How many bad records this reader has quarantined so far.
    pub fn skipped(&self) -> u64 {
        self.driver.skipped
    }
}

impl std::fmt::Debug for PassageReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PassageReader")
            .field("path", &self.path)
            .field("skipped", &self.driver.skipped)
            .field("done", &self.driver.done)
            .finish()
    }
}

impl Iterator for PassageReader {
    type Item = Result<Passage, CorpusError>;
    fn next(&mut self) -> Option<Self::Item> {
        self.driver.next_record()
    }
}

enum QuerySource {
    Jsonl(jsonl::JsonlSource<Query>),
    Tsv(tsv::TsvSource<Query>),
}

impl Source for QuerySource {
    type Record = Query;
    fn next_item(&mut self) -> Result<Option<Item<Query>>, CorpusError> {
        match self {
            QuerySource::Jsonl(s) => s.next_item(),
            QuerySource::Tsv(s) => s.next_item(),
        }
    }
}

/// Queries of one file, in file order. See the module docs for the contract.
pub struct QueryReader {
    driver: Driver<QuerySource>,
    path: PathBuf,
}

impl QueryReader {
    /// The file being read.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How many bad records this reader has quarantined so far.
    pub fn skipped(&self) -> u64 {
        self.driver.skipped
    }
}

impl std::fmt::Debug for QueryReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueryReader")
            .field("path", &self.path)
            .field("skipped", &self.driver.skipped)
            .field("done", &self.driver.done)
            .finish()
    }
}

impl Iterator for QueryReader {
    type Item = Result<Query, CorpusError>;
    fn next(&mut self) -> Option<Self::Item> {
        self.driver.next_record()
    }
}

fn format_of(
    path: &Path,
    opts: &ReadOptions,
    expected: &'static str,
) -> Result<Format, CorpusError> {
    opts.format
        .or_else(|| Format::from_extension(path))
        .ok_or_else(|| CorpusError::UnknownFormat {
            path: path.to_path_buf(),
            expected,
        })
}

/// Reading that fails on the first bad record, or skips bad records into `quarantine`.
pub fn read_options(quarantine: Option<&Path>) -> Result<ReadOptions, CorpusError> {
    let policy = match quarantine {
        None => BadRecordPolicy::Fail,
        Some(path) => BadRecordPolicy::Skip(Quarantine::open(path)?),
    };
    Ok(ReadOptions {
        policy,
        ..ReadOptions::default()
    })
}

/// Records skipped into the quarantine of `read`, and its path (none under `Fail`).
pub fn quarantined(read: &ReadOptions) -> Result<(u64, Option<PathBuf>), CorpusError> {
    Ok(match &read.policy {
        BadRecordPolicy::Fail => (0, None),
        BadRecordPolicy::Skip(q) => (q.finish()?, Some(q.path().to_path_buf())),
    })
}

/// Opens a passage file (BEIR JSONL, TSV or Parquet) for streaming.
pub fn open_passages(path: &Path, opts: &ReadOptions) -> Result<PassageReader, CorpusError> {
    let source = match format_of(path, opts, ".jsonl, .json, .tsv or .parquet")? {
        Format::JsonLines => PassageSource::Jsonl(jsonl::JsonlSource::open(path)?),
        Format::Tsv => PassageSource::Tsv(tsv::TsvSource::open(path)?),
        Format::Parquet => PassageSource::Parquet(parquet::ParquetSource::open(path)?),
    };
    Ok(PassageReader {
        driver: Driver::new(source, path, opts.policy.clone()),
        path: path.to_path_buf(),
    })
}

/// Opens a query file (BEIR JSONL, or TSV `id<TAB>text`) for streaming.
pub fn open_queries(path: &Path, opts: &ReadOptions) -> Result<QueryReader, CorpusError> {
    const EXPECTED: &str = ".jsonl, .json or .tsv";
    let source = match format_of(path, opts, EXPECTED)? {
        Format::JsonLines => QuerySource::Jsonl(jsonl::JsonlSource::open(path)?),
        Format::Tsv => QuerySource::Tsv(tsv::TsvSource::open(path)?),
        Format::Parquet => {
            return Err(CorpusError::UnknownFormat {
                path: path.to_path_buf(),
                expected: EXPECTED,
            })
        }
    };
    Ok(QueryReader {
        driver: Driver::new(source, path, opts.policy.clone()),
        path: path.to_path_buf(),
    })
}

/// Records in a text file (its newline count) or a Parquet file (its row count), for
/// progress; `None` when it cannot be told cheaply.
pub fn count_records(path: &Path) -> Option<u64> {
    let is_parquet = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("parquet"));
    use std::io::Read;
    let mut f = std::fs::File::open(path).ok()?;
    if is_parquet {
        use ::parquet::file::reader::{FileReader, SerializedFileReader};
        let r = SerializedFileReader::new(f).ok()?;
        return Some(r.metadata().file_metadata().num_rows().max(0) as u64);
    }
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    let mut last = b'\n';
    loop {
        let k = f.read(&mut buf).ok()?;
        if k == 0 {
            break;
        }
        n += buf[..k].iter().filter(|&&b| b == b'\n').count() as u64;
        last = buf[k - 1];
    }
    Some(n + u64::from(last != b'\n'))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is its job
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, body: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, body).unwrap();
        path
    }

    #[test]
    fn format_follows_the_extension_case_insensitively() {
        assert_eq!(
            Format::from_extension(Path::new("a/corpus.JSONL")),
            Some(Format::JsonLines)
        );
        assert_eq!(
            Format::from_extension(Path::new("q.json")),
            Some(Format::JsonLines)
        );
        assert_eq!(
            Format::from_extension(Path::new("p.tsv")),
            Some(Format::Tsv)
        );
        assert_eq!(
            Format::from_extension(Path::new("p.parquet")),
            Some(Format::Parquet)
        );
        assert_eq!(Format::from_extension(Path::new("p.csv")), None);
        assert_eq!(Format::from_extension(Path::new("noext")), None);
    }

    #[test]
    fn unknown_extension_is_an_error_naming_the_file() {
        let err = open_passages(Path::new("corpus.csv"), &ReadOptions::default()).unwrap_err();
        assert!(matches!(err, CorpusError::UnknownFormat { .. }));
        assert_eq!(
            err.to_string(),
            "corpus.csv: unknown format; expected a file ending in .jsonl, .json, .tsv or .parquet"
        );
        let err = open_queries(Path::new("q.parquet"), &ReadOptions::default()).unwrap_err();
        assert!(matches!(err, CorpusError::UnknownFormat { .. }));
    }

    #[test]
    fn explicit_format_overrides_the_extension() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "corpus.txt", "{\"_id\":\"a\",\"text\":\"t\"}\n");
        let opts = ReadOptions {
            format: Some(Format::JsonLines),
            ..ReadOptions::default()
        };
        let got: Vec<Passage> = open_passages(&path, &opts)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].id, "a");
    }

    #[test]
    fn fail_policy_yields_the_error_then_ends() {
        let dir = tempfile::tempdir().unwrap();
        let body = "{\"_id\":\"a\",\"text\":\"1\"}\nnot json\n{\"_id\":\"b\",\"text\":\"2\"}\n";
        let path = write(dir.path(), "c.jsonl", body);
        let mut reader = open_passages(&path, &ReadOptions::default()).unwrap();
        assert_eq!(reader.next().unwrap().unwrap().id, "a");
        let err = reader.next().unwrap().unwrap_err();
        match err {
            CorpusError::Bad(bad) => assert_eq!(bad.location.line, 2),
            other => panic!("expected a bad record, got {other}"),
        }
        assert!(reader.next().is_none());
        assert!(reader.next().is_none());
    }

    #[test]
    fn skip_policy_counts_and_quarantines() {
        let dir = tempfile::tempdir().unwrap();
        let body = "{\"_id\":\"a\",\"text\":\"1\"}\nnot json\n{\"_id\":\"a\",\"text\":\"2\"}\n";
        let path = write(dir.path(), "c.jsonl", body);
        let quarantine = Quarantine::open(&dir.path().join("q.jsonl")).unwrap();
        let opts = ReadOptions {
            policy: BadRecordPolicy::Skip(quarantine.clone()),
            ..ReadOptions::default()
        };
        let mut reader = open_passages(&path, &opts).unwrap();
        let ids: Vec<String> = reader.by_ref().map(|p| p.unwrap().id).collect();
        assert_eq!(ids, vec!["a"]);
        assert_eq!(reader.skipped(), 2);
        assert_eq!(quarantine.finish().unwrap(), 2);
    }

    #[test]
    fn a_file_whose_every_record_is_bad_is_an_error_naming_the_quarantine() {
        let dir = tempfile::tempdir().unwrap();
        let quarantine_path = dir.path().join("q.jsonl");
        let quarantine = Quarantine::open(&quarantine_path).unwrap();
        let opts = ReadOptions {
            policy: BadRecordPolicy::Skip(quarantine),
            ..ReadOptions::default()
        };
        let passages = write(dir.path(), "c.jsonl", "not json\n\n{\"text\":\"no id\"}\n");
        let queries = write(dir.path(), "q.tsv", "\n\n");
        let results: Vec<_> = open_passages(&passages, &opts).unwrap().collect();
        match results.as_slice() {
            [Err(
                e @ CorpusError::NoRecords {
                    skipped: 2,
                    quarantine: Some(q),
                    ..
                },
            )] => {
                assert_eq!(q, &quarantine_path);
                let text = e.to_string();
                assert!(
                    text.contains("c.jsonl: no records: all 2 were bad"),
                    "{text}"
                );
            }
            other => panic!("expected NoRecords after 2 skipped, got {other:?}"),
        }
        let results: Vec<_> = open_queries(&queries, &opts).unwrap().collect();
        assert!(
            matches!(
                results.as_slice(),
                [Err(CorpusError::NoRecords { skipped: 0, .. })]
            ),
            "{results:?}"
        );
    }

    #[test]
    fn readers_can_move_to_another_thread() {
        fn assert_send<T: Send>() {}
        assert_send::<PassageReader>();
        assert_send::<QueryReader>();
        assert_send::<Quarantine>();
    }

    #[test]
    fn seen_ids_name_the_first_line() {
        let mut seen = SeenIds::default();
        let file = Path::new("f");
        seen.check("x", file, 4, "_id").unwrap();
        seen.check("y", file, 5, "_id").unwrap();
        let bad = seen.check("x", file, 9, "_id").unwrap_err();
        assert_eq!(bad.location.line, 9);
        assert_eq!(bad.location.field.as_deref(), Some("_id"));
        assert_eq!(
            bad.reason,
            "expected a unique id, found `x` again (first seen on line 4)"
        );
    }
}
