//! Hashes that make stage keys: [`hash_settings`] for the settings a stage ran with and
//! [`ContentHasher`] for the content of its inputs. Both are blake3, written as 64
//! lowercase hex digits, so a reader can check one with `b3sum`.

use std::io::Read;
use std::path::Path;

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

    /// Appends raw bytes.
    pub fn update(&mut self, bytes: impl AsRef<[u8]>) -> &mut Self {
        self.inner.update(bytes.as_ref());
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

/// A content hash of a file's bytes, streamed.
pub fn hash_file(path: &Path) -> Result<String, StoreError> {
    let mut f = std::fs::File::open(path).map_err(StoreError::io("open", path))?;
    let mut h = ContentHasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(StoreError::io("read", path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finish())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is its job
mod tests {
    use super::*;
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
