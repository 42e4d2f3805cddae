//! The quarantine: where skipped records go, so that nothing is dropped without a trace.
//!
//! A [`Quarantine`] is one JSONL file. Each skipped record becomes one line
//! `{"file", "line", "field", "reason", "raw", "raw_bytes"}`: the location and reason of
//! its [`BadRecord`], the record's raw text (lossily decoded, cut to
//! [`MAX_RAW_BYTES`]) and the raw text's length in bytes before the cut, so a reader
//! can tell a cut entry from a whole one.
//!
//! The handle is cheap to clone and every clone writes to the same file, so the readers
//! of one run (corpus, queries, qrels) can share it. Entries are buffered; they reach
//! the disk on [`Quarantine::finish`] or when the last clone is dropped.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;

use super::CorpusError;
use crate::error::BadRecord;

/// The most raw bytes kept per entry. A record is usually a few hundred bytes; 4 KiB
/// keeps enough of a bad one to recognise and fix it, while a corrupt multi-megabyte
/// "line" (a binary file read as text) cannot blow up the quarantine file.
pub const MAX_RAW_BYTES: usize = 4096;

/// A shared, append-only quarantine file. See the module docs.
#[derive(Clone, Debug)]
pub struct Quarantine {
    path: Arc<PathBuf>,
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug)]
struct Inner {
    writer: BufWriter<File>,
    count: u64,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Drop cannot report an error; `finish` is the way to learn that a flush failed.
        let _ = self.writer.flush();
    }
}

/// One line of the quarantine file.
#[derive(Serialize)]
struct Entry<'a> {
    file: String,
    line: u64,
    field: Option<&'a str>,
    reason: &'a str,
    raw: String,
    raw_bytes: usize,
}

impl Quarantine {
    /// Creates (or truncates) the quarantine file at `path`.
    pub fn create(path: &Path) -> Result<Self, CorpusError> {
        let file = File::create(path).map_err(|source| CorpusError::Quarantine {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Quarantine {
            path: Arc::new(path.to_path_buf()),
            inner: Arc::new(Mutex::new(Inner {
                writer: BufWriter::new(file),
                count: 0,
            })),
        })
    }

    /// The quarantine file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one skipped record: its error and its raw bytes.
    pub fn record(&self, bad: &BadRecord, raw: &[u8]) -> Result<(), CorpusError> {
        let entry = Entry {
            file: bad.location.file.display().to_string(),
            line: bad.location.line,
            field: bad.location.field.as_deref(),
            reason: &bad.reason,
            raw: truncate_lossy(raw),
            raw_bytes: raw.len(),
        };
        let mut inner = self.lock();
        let write = serde_json::to_writer(&mut inner.writer, &entry)
            .map_err(std::io::Error::from)
            .and_then(|()| inner.writer.write_all(b"\n"));
        write.map_err(|source| CorpusError::Quarantine {
            path: self.path.to_path_buf(),
            source,
        })?;
        inner.count += 1;
        Ok(())
    }

    /// How many records have been quarantined so far, by every clone of this handle.
    pub fn count(&self) -> u64 {
        self.lock().count
    }

    /// Flushes the entries to disk and returns how many there are.
    pub fn finish(&self) -> Result<u64, CorpusError> {
        let mut inner = self.lock();
        inner
            .writer
            .flush()
            .map_err(|source| CorpusError::Quarantine {
                path: self.path.to_path_buf(),
                source,
            })?;
        Ok(inner.count)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves at worst a half-written line; the count
        // and the writer stay usable, so a poisoned lock is taken over, not propagated.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Decodes `raw` lossily and cuts it to at most [`MAX_RAW_BYTES`] bytes of the input,
/// never inside a UTF-8 sequence that was valid.
fn truncate_lossy(raw: &[u8]) -> String {
    if raw.len() <= MAX_RAW_BYTES {
        return String::from_utf8_lossy(raw).into_owned();
    }
    let mut end = MAX_RAW_BYTES;
    // Back off over continuation bytes (10xxxxxx) so a multi-byte character is either
    // kept whole or dropped, rather than turned into a replacement character.
    while end > 0 && raw[end] & 0b1100_0000 == 0b1000_0000 {
        end -= 1;
    }
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is its job
mod tests {
    use super::*;
    use crate::error::Location;

    fn bad(line: u64, field: Option<&str>, reason: &str) -> BadRecord {
        BadRecord {
            location: Location {
                file: PathBuf::from("corpus.jsonl"),
                line,
                field: field.map(str::to_string),
            },
            reason: reason.to_string(),
        }
    }

    #[test]
    fn entries_are_json_lines_shared_by_clones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.jsonl");
        let q = Quarantine::create(&path).unwrap();
        let clone = q.clone();
        q.record(&bad(3, Some("_id"), "missing"), b"{\"text\":\"x\"}")
            .unwrap();
        clone.record(&bad(7, None, "bad utf-8"), b"a\xffb").unwrap();
        assert_eq!(q.count(), 2);
        assert_eq!(clone.finish().unwrap(), 2);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(
            lines[0],
            serde_json::json!({"file": "corpus.jsonl", "line": 3, "field": "_id",
                "reason": "missing", "raw": "{\"text\":\"x\"}", "raw_bytes": 12})
        );
        assert_eq!(lines[1]["field"], serde_json::Value::Null);
        assert_eq!(lines[1]["raw"], "a\u{fffd}b");
    }

    #[test]
    fn drop_flushes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.jsonl");
        {
            let q = Quarantine::create(&path).unwrap();
            q.record(&bad(1, None, "r"), b"x").unwrap();
        }
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 1);
    }

    #[test]
    fn raw_is_cut_on_a_character_boundary() {
        // 'é' is two bytes; with an odd prefix the cut would split the last one.
        let mut raw = vec![b'a'];
        raw.extend("é".repeat(MAX_RAW_BYTES).as_bytes());
        let cut = truncate_lossy(&raw);
        assert_eq!(cut.len(), MAX_RAW_BYTES - 1);
        assert!(!cut.contains('\u{fffd}'));
        assert_eq!(truncate_lossy(b"short"), "short");
    }

    #[test]
    fn unwritable_path_is_a_quarantine_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = Quarantine::create(&dir.path().join("no/such/dir/q.jsonl")).unwrap_err();
        assert!(matches!(err, CorpusError::Quarantine { .. }), "{err}");
    }
}
