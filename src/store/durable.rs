//! Durable, atomic file publication: the one write protocol every file of a run goes
//! through. A file is written under a temporary name in its final directory, synced,
//! renamed into place and the directory synced, so after a crash a reader sees either the
//! old file or the complete new one, never a prefix.
//!
//! Temporary names start with `.` and end with `.tmp`; readers never list them and
//! [`crate::store::StageStore::open`] deletes the ones a killed run left behind.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::error::StoreError;

/// The temporary name a file is written under before it is renamed to `final_name`.
pub(crate) fn temp_name(final_name: &str) -> String {
    format!(".{final_name}.tmp")
}

/// Whether `name` is a temporary name made by [`temp_name`].
pub(crate) fn is_temp_name(name: &str) -> bool {
    name.len() > ".tmp".len() + 1 && name.starts_with('.') && name.ends_with(".tmp")
}

/// Flushes a directory's entries (creations, renames) to disk.
///
/// On Unix a rename is durable only once its directory is synced. Other platforms cannot
/// open a directory as a file; there the rename itself is the best available.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    #[cfg(unix)]
    {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(StoreError::io("sync directory", dir))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Renames the synced temporary file `tmp` to `dir/final_name` and syncs `dir`.
pub(crate) fn publish(tmp: &Path, dir: &Path, final_name: &str) -> Result<PathBuf, StoreError> {
    let target = dir.join(final_name);
    std::fs::rename(tmp, &target).map_err(StoreError::io("rename into place", tmp))?;
    sync_dir(dir)?;
    Ok(target)
}

/// Writes `bytes` as `dir/final_name` through the temporary-name protocol.
pub(crate) fn write_atomically(
    dir: &Path,
    final_name: &str,
    bytes: &[u8],
) -> Result<(), StoreError> {
    let tmp = dir.join(temp_name(final_name));
    let mut file = File::create(&tmp).map_err(StoreError::io("create", &tmp))?;
    file.write_all(bytes)
        .map_err(StoreError::io("write", &tmp))?;
    crate::crash::point("store.manifest-written");
    file.sync_all().map_err(StoreError::io("sync", &tmp))?;
    drop(file);
    publish(&tmp, dir, final_name)?;
    Ok(())
}

/// Writes `bytes` as the file `path` through the store's durable protocol (temporary
/// name, fsync, rename, fsync of the directory): a reader sees the old file or the whole
/// new one, never a prefix. For the files of a run outside its stages (reports,
/// summaries).
pub fn write_file_atomically(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    write_file_with(path, |file: &mut File, tmp: &Path| {
        std::io::Write::write_all(file, bytes).map_err(StoreError::io("write", tmp))
    })
}

/// [`write_file_atomically`] of what `fill` writes into the temporary file it is given
/// (with its path, for errors): for files written piece by piece (Parquet, JSON lines).
pub fn write_file_with<E: From<StoreError>>(
    path: &Path,
    fill: impl FnOnce(&mut File, &Path) -> Result<(), E>,
) -> Result<(), E> {
    let invalid = || StoreError::Io {
        op: "name",
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file path"),
    };
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(invalid)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let tmp = dir.join(temp_name(name));
    let mut file = File::create(&tmp).map_err(StoreError::io("create", &tmp))?;
    fill(&mut file, &tmp)?;
    crate::crash::point("file.before-rename");
    file.sync_all().map_err(StoreError::io("sync", &tmp))?;
    drop(file);
    publish(&tmp, dir, name)?;
    Ok(())
}

/// Deletes a file, treating "already gone" as success.
pub(crate) fn remove_if_present(path: &Path) -> Result<bool, StoreError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(StoreError::Io {
            op: "remove",
            path: path.to_path_buf(),
            source: e,
        }),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is its job
mod tests {
    use super::*;

    #[test]
    fn temp_names_are_hidden_and_recognised() {
        assert_eq!(temp_name("part-00003.parquet"), ".part-00003.parquet.tmp");
        assert!(is_temp_name(".part-00003.parquet.tmp"));
        assert!(is_temp_name(".manifest.json.tmp"));
        assert!(!is_temp_name("part-00003.parquet"));
        assert!(!is_temp_name(".tmp"));
        assert!(!is_temp_name("x.tmp"));
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        write_atomically(dir.path(), "a.json", b"first").unwrap();
        write_atomically(dir.path(), "a.json", b"second").unwrap();
        assert_eq!(std::fs::read(dir.path().join("a.json")).unwrap(), b"second");
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["a.json".to_string()]);
        assert!(remove_if_present(&dir.path().join("a.json")).unwrap());
        assert!(!remove_if_present(&dir.path().join("a.json")).unwrap());
    }
}
