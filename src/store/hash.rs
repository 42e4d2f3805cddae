//! Hashes that make stage keys: [`hash_settings`] for the settings a stage ran with and
//! [`ContentHasher`] for the content of its inputs. Both are blake3, written as 64
//! lowercase hex digits, so a reader can check one with `b3sum`.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::SystemTime;

use serde::Serialize;
use serde_json::{Map, Value};

use super::error::StoreError;

/// blake3 of the settings' canonical JSON: the value serde produces, with every object's
/// keys sorted and no whitespace. Two settings that serialize to the same JSON value hash
/// equally whatever their field order or map type (a `HashMap` hashes like a `BTreeMap`).
///
/// Fails only when serde cannot express the value as JSON (a map with non-string keys).
pub fn hash_settings<T: Serialize + ?Sized>(settings: &T) -> Result<String, StoreError> {
    let value = serde_json::to_value(settings).map_err(|source| StoreError::Settings { source })?;
    let bytes =
        serde_json::to_vec(&canonical(value)).map_err(|source| StoreError::Settings { source })?;
    Ok(blake3::hash(&bytes).to_hex().to_string())
}

/// Rebuilds objects with their keys inserted in sorted order. serde_json keeps insertion
/// order when some crate in the build turns on its `preserve_order` feature, so sorting
/// here makes the output canonical either way.
fn canonical(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(String, Value)> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            let mut sorted = Map::new();
            for (key, inner) in entries {
                sorted.insert(key, canonical(inner));
            }
            Value::Object(sorted)
        }
        Value::Array(items) => Value::Array(items.into_iter().map(canonical).collect()),
        scalar => scalar,
    }
}

/// Bytes from which one update is worth splitting over the cores (blake3's advice: below
/// about 128 KiB the threads cost more than they save).
const PARALLEL_HASH_BYTES: usize = 128 * 1024;

/// What a large file is read in to be hashed: big enough that each read is hashed on
/// every core ([`PARALLEL_HASH_BYTES`] many times over).
pub const HASH_READ_BYTES: usize = 4 << 20;

/// A streaming blake3 hasher for a stage's inputs.
///
/// [`update`](Self::update) appends raw bytes (hashing a whole file through it gives the
/// file's plain blake3). [`field`](Self::field) appends one value of a sequence prefixed by
/// its length, so that `("ab", "c")` and `("a", "bc")` hash differently; use it to hash
/// records field by field.
#[derive(Debug, Clone, Default)]
pub struct ContentHasher {
    inner: blake3::Hasher,
}

impl ContentHasher {
    /// A hasher that has seen nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends raw bytes; a large slice is hashed on every core (the same hash).
    pub fn update(&mut self, bytes: impl AsRef<[u8]>) -> &mut Self {
        let bytes = bytes.as_ref();
        if bytes.len() >= PARALLEL_HASH_BYTES {
            self.inner.update_rayon(bytes);
        } else {
            self.inner.update(bytes);
        }
        self
    }

    /// Appends one length-prefixed value (the length as 8 little-endian bytes, then the bytes).
    pub fn field(&mut self, bytes: impl AsRef<[u8]>) -> &mut Self {
        let bytes = bytes.as_ref();
        self.inner.update(&(bytes.len() as u64).to_le_bytes());
        self.inner.update(bytes);
        self
    }

    /// The hash of everything appended so far, as 64 hex digits. The hasher can go on.
    pub fn finish(&self) -> String {
        self.inner.finalize().to_hex().to_string()
    }
}

impl std::io::Write for ContentHasher {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.inner.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A content hash of a file's bytes, streamed; computed once per process while the file
/// stays as it is ([`memoised_by_files`]).
pub fn hash_file(path: &Path) -> Result<String, StoreError> {
    memoised_by_files("file", &[path.to_path_buf()], || {
        let mut f = std::fs::File::open(path).map_err(StoreError::io("open", path))?;
        let mut h = ContentHasher::new();
        let mut buf = vec![0u8; HASH_READ_BYTES];
        loop {
            let n = f.read(&mut buf).map_err(StoreError::io("read", path))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        Ok(h.finish())
    })
}

/// What tells a file's bytes apart for the life of this process: its path, length,
/// modification time and inode (`None` inside: absent). Rewriting a file changes its
/// modification time (nanoseconds here) or its inode.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct FileStamp {
    path: PathBuf,
    state: Option<(u64, Option<SystemTime>, u64)>,
}

impl FileStamp {
    /// `None` when the file's metadata cannot be read for another reason than absence.
    fn of(path: &Path) -> Option<FileStamp> {
        let state = match std::fs::metadata(path) {
            Ok(m) => {
                #[cfg(unix)]
                let inode = std::os::unix::fs::MetadataExt::ino(&m);
                #[cfg(not(unix))]
                let inode = 0;
                Some((m.len(), m.modified().ok(), inode))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(_) => return None,
        };
        Some(FileStamp {
            path: path.to_path_buf(),
            state,
        })
    }
}

type Memo = HashMap<(String, Vec<FileStamp>), String>;

/// `compute`'s answer for `what`, a hash of the contents of `files` (and of settings
/// that `what` names), computed once per process while every file keeps its stamp
/// (path, length, modification time, inode, or its absence): a run asks for the same
/// model's fingerprint and the same corpus's hash at every stage that keys on them, and
/// a model's weights are hundreds of megabytes. A file that changes while it is hashed
/// leaves nothing kept; one whose stamp cannot be read is hashed every time.
pub fn memoised_by_files<E>(
    what: &str,
    files: &[PathBuf],
    compute: impl FnOnce() -> Result<String, E>,
) -> Result<String, E> {
    static MEMO: OnceLock<Mutex<Memo>> = OnceLock::new();
    let memo = MEMO.get_or_init(Default::default);
    let stamps = || {
        files
            .iter()
            .map(|f| FileStamp::of(f))
            .collect::<Option<Vec<_>>>()
    };
    let Some(before) = stamps() else {
        return compute();
    };
    let key = (what.to_string(), before);
    // A poisoned lock means a panic elsewhere mid-insert: entries are whole, still sound.
    if let Some(hit) = memo.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Ok(hit.clone());
    }
    let answer = compute()?;
    if stamps().as_ref() == Some(&key.1) {
        memo.lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, answer.clone());
    }
    Ok(answer)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is its job
mod tests {
    use super::*;

    #[test]
    fn large_inputs_hashed_on_every_core_hash_as_plain_blake3() {
        // Past PARALLEL_HASH_BYTES and past one HASH_READ_BYTES read, with a ragged end.
        let bytes: Vec<u8> = (0..HASH_READ_BYTES + 3 * PARALLEL_HASH_BYTES + 17)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let plain = blake3::hash(&bytes).to_hex().to_string();
        assert_eq!(ContentHasher::new().update(&bytes).finish(), plain);
        // A small update then a large one: still the stream's plain hash.
        let mut h = ContentHasher::new();
        h.update(&bytes[..5]).update(&bytes[5..]);
        assert_eq!(h.finish(), plain);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("large.bin");
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(hash_file(&path).unwrap(), plain);
    }

    #[test]
    fn a_file_hash_is_kept_while_the_file_stays_and_redone_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("weights.bin");
        std::fs::write(&path, b"first").unwrap();
        let calls = std::cell::Cell::new(0);
        let count = || -> Result<String, StoreError> {
            calls.set(calls.get() + 1);
            hash_file(&path)
        };
        let first = memoised_by_files("test", std::slice::from_ref(&path), count).unwrap();
        let again = memoised_by_files("test", std::slice::from_ref(&path), count).unwrap();
        assert_eq!((first.clone(), calls.get()), (again, 1));
        assert_eq!(first, blake3::hash(b"first").to_hex().to_string());
        // Rewritten (another length, so another stamp whatever the clock's grain).
        std::fs::write(&path, b"second!").unwrap();
        let changed = memoised_by_files("test", std::slice::from_ref(&path), count).unwrap();
        assert_eq!(calls.get(), 2);
        assert_eq!(changed, blake3::hash(b"second!").to_hex().to_string());
        assert_eq!(hash_file(&path).unwrap(), changed);
        // Another `what` over the same file is its own entry; an absent file is a stamp.
        memoised_by_files("other", std::slice::from_ref(&path), count).unwrap();
        assert_eq!(calls.get(), 3);
        let gone = dir.path().join("absent");
        let absent = || -> Result<String, StoreError> { Ok("none".into()) };
        assert_eq!(memoised_by_files("test", &[gone], absent).unwrap(), "none");
    }
    use std::collections::{BTreeMap, HashMap};

    #[test]
    fn settings_hash_is_blake3_of_sorted_compact_json() {
        let settings = serde_json::json!({"b": 1, "a": [true, null, {"y": 2.5, "x": "q"}]});
        let expected = blake3::hash(br#"{"a":[true,null,{"x":"q","y":2.5}],"b":1}"#);
        assert_eq!(
            hash_settings(&settings).unwrap(),
            expected.to_hex().to_string()
        );
    }

    #[test]
    fn settings_hash_ignores_field_order_and_map_type() {
        #[derive(Serialize)]
        struct Ab {
            a: u32,
            b: &'static str,
        }
        #[derive(Serialize)]
        struct Ba {
            b: &'static str,
            a: u32,
        }
        let hash = hash_settings(&Ab { a: 7, b: "x" }).unwrap();
        assert_eq!(hash, hash_settings(&Ba { b: "x", a: 7 }).unwrap());
        let hashed: HashMap<&str, i32> = [("z", 1), ("m", 2), ("a", 3)].into_iter().collect();
        let ordered: BTreeMap<&str, i32> = [("a", 3), ("m", 2), ("z", 1)].into_iter().collect();
        assert_eq!(
            hash_settings(&hashed).unwrap(),
            hash_settings(&ordered).unwrap()
        );
        assert_ne!(hash, hash_settings(&Ab { a: 8, b: "x" }).unwrap());
        assert_eq!(hash.len(), 64);
    }

    #[test]
    fn settings_that_are_not_json_are_an_error() {
        let bad: BTreeMap<(u8, u8), u8> = [((1, 2), 3)].into_iter().collect();
        assert!(matches!(
            hash_settings(&bad),
            Err(StoreError::Settings { .. })
        ));
    }

    #[test]
    fn content_hasher_update_is_plain_blake3_and_field_separates_values() {
        let mut raw = ContentHasher::new();
        raw.update("ab").update(b"c");
        assert_eq!(raw.finish(), blake3::hash(b"abc").to_hex().to_string());

        let one = ContentHasher::new().field("ab").field("c").finish();
        let two = ContentHasher::new().field("a").field("bc").finish();
        assert_ne!(one, two);
        let mut manual = Vec::new();
        manual.extend_from_slice(&2u64.to_le_bytes());
        manual.extend_from_slice(b"ab");
        manual.extend_from_slice(&1u64.to_le_bytes());
        manual.extend_from_slice(b"c");
        assert_eq!(one, blake3::hash(&manual).to_hex().to_string());
    }
}
