//! What [`super::StageStore::open`] does to a run directory a killed or damaged run left
//! behind, before anything reads it: the manifest is the truth, and the files are brought
//! in line with it.
//!
//! - Temporary files (`.<name>.tmp`) in stage directories and the manifest's temporary
//!   file are deleted: they are writes that never committed. So are temporary
//!   directories at the top of the run directory (scratch space of a killed stage).
//! - A stage whose listed part is missing or has another size than recorded is dropped
//!   from the manifest (it will be recomputed) and reported.
//! - Part files that the manifest does not list are deleted: a crash between a part's
//!   rename and the manifest write, or the parts of a discarded stage.
//!
//! Only directories under `stages/` with valid stage names and files with part or
//! temporary names are touched; anything else in the run directory is left alone.

use std::collections::HashSet;
use std::path::Path;

use super::durable::{is_temp_name, remove_if_present};
use super::error::StoreError;
use super::manifest::{is_part_file_name, validate_stage_name, Manifest};

/// The stage directories' parent inside the run directory.
pub(crate) const STAGES_DIR: &str = "stages";

/// What opening a run directory repaired.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Temporary files of uncommitted writes that were deleted.
    pub temp_files_removed: usize,
    /// Part files not listed in the manifest that were deleted.
    pub orphan_parts_removed: usize,
    /// Stages dropped from the manifest because a listed part was missing or truncated.
    pub damaged_stages: Vec<String>,
}

/// Brings `run_dir` in line with `manifest` (loaded from it), saving the manifest if a
/// damaged stage had to be dropped from it.
pub(crate) fn recover(
    run_dir: &Path,
    manifest: &mut Manifest,
) -> Result<RecoveryReport, StoreError> {
    let mut report = RecoveryReport::default();
    // The run directory's own files (the manifest, reports, summaries) are written
    // through the same temporary names.
    let entries = std::fs::read_dir(run_dir).map_err(StoreError::io("list", run_dir))?;
    for entry in entries {
        let entry = entry.map_err(StoreError::io("list", run_dir))?;
        let is_temp = entry.file_name().to_str().is_some_and(is_temp_name);
        if !is_temp {
            continue;
        }
        let path = entry.path();
        if path.is_file() && remove_if_present(&path)? {
            report.temp_files_removed += 1;
        } else if path.is_dir() {
            // A directory of scratch files (generation's `.prepare.tmp`).
            std::fs::remove_dir_all(&path).map_err(StoreError::io("remove", &path))?;
            report.temp_files_removed += 1;
        }
    }

    let stages_dir = run_dir.join(STAGES_DIR);
    for (stage, entry) in &manifest.stages {
        let dir = stages_dir.join(stage);
        let intact = entry.parts.iter().all(|part| {
            std::fs::metadata(dir.join(&part.file))
                .is_ok_and(|m| m.is_file() && m.len() == part.bytes)
        });
        if !intact {
            report.damaged_stages.push(stage.clone());
        }
    }
    if !report.damaged_stages.is_empty() {
        let mut repaired = manifest.clone();
        for stage in &report.damaged_stages {
            repaired.stages.remove(stage);
        }
        repaired.save(run_dir)?;
        *manifest = repaired;
    }

    let entries = std::fs::read_dir(&stages_dir).map_err(StoreError::io("list", &stages_dir))?;
    for entry in entries {
        let entry = entry.map_err(StoreError::io("list", &stages_dir))?;
        let Ok(stage) = entry.file_name().into_string() else {
            continue;
        };
        let dir = entry.path();
        if validate_stage_name(&stage).is_err() || !dir.is_dir() {
            continue;
        }
        let listed: HashSet<&str> = manifest
            .stages
            .get(&stage)
            .map(|e| e.parts.iter().map(|p| p.file.as_str()).collect())
            .unwrap_or_default();
        let files = std::fs::read_dir(&dir).map_err(StoreError::io("list", &dir))?;
        for file in files {
            let file = file.map_err(StoreError::io("list", &dir))?;
            let Ok(name) = file.file_name().into_string() else {
                continue;
            };
            if is_temp_name(&name) {
                if remove_if_present(&file.path())? {
                    report.temp_files_removed += 1;
                }
            } else if is_part_file_name(&name)
                && !listed.contains(name.as_str())
                && remove_if_present(&file.path())?
            {
                report.orphan_parts_removed += 1;
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is its job
mod tests {
    use crate::store::fixtures::{batch, key, ns, schema};
    use crate::store::{RecoveryReport, StageStatus, StageStore};

    #[test]
    fn open_deletes_temporaries_and_orphans_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = StageStore::open(dir.path()).unwrap();
            let mut writer = store.begin("passages", key("s", "i"), schema()).unwrap();
            writer.write_part(&[batch(0, 3)]).unwrap();
        }
        let stage = dir.path().join("stages/passages");
        let foreign = dir.path().join("stages/Foreign");
        std::fs::create_dir(&foreign).unwrap();
        // A killed stage's scratch directory, and a user's directory that only looks alike.
        let scratch = dir.path().join(".prepare.tmp");
        std::fs::create_dir(&scratch).unwrap();
        std::fs::write(scratch.join("forward-0.run"), b"run").unwrap();
        let users = dir.path().join("prepare.tmp");
        std::fs::create_dir(&users).unwrap();
        for (path, bytes) in [
            (stage.join(".part-00001.parquet.tmp"), &b"half"[..]),
            (stage.join("part-00001.parquet"), b"renamed, never listed"),
            (stage.join("notes.txt"), b"not ours"),
            (dir.path().join(".manifest.json.tmp"), b"{"),
            (foreign.join("part-00000.parquet"), b"not ours"),
        ] {
            std::fs::write(path, bytes).unwrap();
        }

        let store = StageStore::open(dir.path()).unwrap();
        assert_eq!(
            store.recovery(),
            &RecoveryReport {
                temp_files_removed: 3,
                orphan_parts_removed: 1,
                damaged_stages: vec![],
            }
        );
        assert!(!stage.join(".part-00001.parquet.tmp").exists());
        assert!(!stage.join("part-00001.parquet").exists());
        assert!(!dir.path().join(".manifest.json.tmp").exists());
        assert!(!scratch.exists());
        assert!(users.exists());
        assert!(stage.join("notes.txt").exists());
        assert!(foreign.join("part-00000.parquet").exists());
        assert_eq!(ns(&store.read_all("passages").unwrap()), vec![0, 1, 2]);
    }

    #[test]
    fn a_stage_with_a_truncated_part_is_dropped_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = StageStore::open(dir.path()).unwrap();
            for stage in ["passages", "queries"] {
                let mut writer = store.begin(stage, key("s", "i"), schema()).unwrap();
                writer.write_part(&[batch(0, 3)]).unwrap();
                writer.finish().unwrap();
            }
        }
        let part = dir.path().join("stages/queries/part-00000.parquet");
        let bytes = std::fs::read(&part).unwrap();
        std::fs::write(&part, &bytes[..bytes.len() / 2]).unwrap();

        let store = StageStore::open(dir.path()).unwrap();
        assert_eq!(store.recovery().damaged_stages, vec!["queries".to_string()]);
        assert_eq!(store.recovery().orphan_parts_removed, 1);
        assert!(!part.exists());
        assert_eq!(
            store.status("queries", &key("s", "i")).unwrap(),
            StageStatus::Absent
        );
        assert!(store
            .completed("passages", &key("s", "i"))
            .unwrap()
            .is_some());
        // The repair is in the manifest: a further open finds nothing to do.
        drop(store);
        let store = StageStore::open(dir.path()).unwrap();
        assert_eq!(store.recovery(), &RecoveryReport::default());
    }
}
