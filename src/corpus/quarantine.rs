//! The quarantine: where skipped records go, so that nothing is dropped without a trace.
//!
//! A [`Quarantine`] is one JSONL file. Each skipped record becomes one line
//! `{"file", "line", "field", "reason", "raw", "raw_bytes"}`: the location and reason of
//! its [`BadRecord`], the record's raw text (lossily decoded, cut to
//! [`MAX_RAW_BYTES`]) and the raw text's length in bytes before the cut, so a reader
//! can tell a cut entry from a whole one.
//!
//! The file belongs to a run and outlives a command: [`Quarantine::open`] appends to it,
//! and an entry already in it (the same file, line, field, reason and raw bytes) is not
//! written again, so however many stages and commands read a bad record, it is listed
//! once. Within a process there is one handle per file: opening a path that is open
//! returns the open handle, so every reader of a command (corpus, queries, qrels, in
//! every stage) shares it. [`Quarantine::count`] is how many distinct bad records this
//! handle met, the ones listed by earlier commands included: what the command skipped.
//! Entries are buffered; they reach the disk on [`Quarantine::finish`] or when the last
//! clone is dropped.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, Weak};

use serde::Serialize;

use super::CorpusError;
use crate::bad_record::BadRecord;

/// The most raw bytes kept per entry. A record is usually a few hundred bytes; 4 KiB
/// keeps enough of a bad one to recognise and fix it, while a corrupt multi-megabyte
/// "line" (a binary file read as text) cannot blow up the quarantine file.
pub const MAX_RAW_BYTES: usize = 4096;

/// The quarantine files this process has open, by absolute path.
static OPEN_QUARANTINES: LazyLock<Mutex<HashMap<PathBuf, Weak<Mutex<Inner>>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// A shared, append-only quarantine file. See the module docs.
#[derive(Clone, Debug)]
pub struct Quarantine {
    path: Arc<PathBuf>,
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug)]
struct Inner {
    writer: BufWriter<File>,
    /// blake3 of every entry line in the file (written earlier or by this handle).
    listed: HashSet<[u8; 32]>,
    /// The entries this handle met, written now or listed before.
    met: HashSet<[u8; 32]>,
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
    /// Opens the quarantine file at `path` for appending, creating it if needed; the
    /// handle already open on it, when there is one in this process.
    pub fn open(path: &Path) -> Result<Self, CorpusError> {
        let error = |source| CorpusError::Quarantine {
            path: path.to_path_buf(),
            source,
        };
        let absolute = std::path::absolute(path).map_err(error)?;
        let mut open = OPEN_QUARANTINES
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        open.retain(|_, inner| inner.strong_count() > 0);
        if let Some(inner) = open.get(&absolute).and_then(Weak::upgrade) {
            return Ok(Quarantine {
                path: Arc::new(path.to_path_buf()),
                inner,
            });
        }
        let existing = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(error(e)),
        };
        let listed = existing
            .split(|&b| b == b'\n')
            .filter(|line| !line.is_empty())
            .map(|line| *blake3::hash(line).as_bytes())
            .collect();
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(error)?;
        let mut writer = BufWriter::new(file);
        // A run killed while writing can leave a last line without its newline; the
        // next entry starts on a line of its own.
        if existing.last().is_some_and(|&b| b != b'\n') {
            writer.write_all(b"\n").map_err(error)?;
        }
        let inner = Arc::new(Mutex::new(Inner {
            writer,
            listed,
            met: HashSet::new(),
        }));
        open.insert(absolute, Arc::downgrade(&inner));
        Ok(Quarantine {
            path: Arc::new(path.to_path_buf()),
            inner,
        })
    }

    /// The quarantine file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records one skipped record, its error and its raw bytes: appended unless the file
    /// lists it already.
    pub fn record(&self, bad: &BadRecord, raw: &[u8]) -> Result<(), CorpusError> {
        let entry = Entry {
            file: bad.location.file.display().to_string(),
            line: bad.location.line,
            field: bad.location.field.as_deref(),
            reason: &bad.reason,
            raw: truncate_lossy(raw),
            raw_bytes: raw.len(),
        };
        let error = |source| CorpusError::Quarantine {
            path: self.path.to_path_buf(),
            source,
        };
        let line = serde_json::to_vec(&entry).map_err(|e| error(e.into()))?;
        let id = *blake3::hash(&line).as_bytes();
        let mut inner = self.lock();
        inner.met.insert(id);
        if inner.listed.insert(id) {
            inner.writer.write_all(&line).map_err(error)?;
            inner.writer.write_all(b"\n").map_err(error)?;
        }
        Ok(())
    }

    /// How many distinct bad records this handle met (and so its readers skipped),
    /// whether this handle wrote them or the file listed them already.
    pub fn count(&self) -> u64 {
        self.lock().met.len() as u64
    }

    /// Flushes the entries to disk and returns [`Self::count`].
    pub fn finish(&self) -> Result<u64, CorpusError> {
        let mut inner = self.lock();
        inner
            .writer
            .flush()
            .map_err(|source| CorpusError::Quarantine {
                path: self.path.to_path_buf(),
                source,
            })?;
        Ok(inner.met.len() as u64)
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
    use crate::bad_record::Location;

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
        let q = Quarantine::open(&path).unwrap();
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
    fn a_record_met_again_is_counted_but_listed_once_across_handles() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("quarantine.jsonl");
        {
            let first = Quarantine::open(&path).unwrap();
            first
                .record(&bad(3, Some("_id"), "missing"), b"{}")
                .unwrap();
            // A second reader of the same command: the same handle, the same record.
            let second = Quarantine::open(&path).unwrap();
            second
                .record(&bad(3, Some("_id"), "missing"), b"{}")
                .unwrap();
            second.record(&bad(9, None, "bad utf-8"), b"\xff").unwrap();
            assert_eq!(first.finish().unwrap(), 2);
        }
        // A later command meets one of them again and one new record.
        let later = Quarantine::open(&path).unwrap();
        later.record(&bad(9, None, "bad utf-8"), b"\xff").unwrap();
        later
            .record(&bad(12, Some("text"), "not a string"), b"1")
            .unwrap();
        assert_eq!(later.finish().unwrap(), 2);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<u64> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["line"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(lines, vec![3, 9, 12]);
    }

    #[test]
    fn an_entry_cut_by_a_kill_does_not_swallow_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("quarantine.jsonl");
        std::fs::write(&path, "{\"file\":\"c.jsonl\",\"li").unwrap();
        let q = Quarantine::open(&path).unwrap();
        q.record(&bad(2, None, "r"), b"x").unwrap();
        q.finish().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        assert_eq!(last["line"], 2);
    }

    #[test]
    fn drop_flushes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.jsonl");
        {
            let q = Quarantine::open(&path).unwrap();
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
        let err = Quarantine::open(&dir.path().join("no/such/dir/q.jsonl")).unwrap_err();
        assert!(matches!(err, CorpusError::Quarantine { .. }), "{err}");
    }
}
