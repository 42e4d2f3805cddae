//! The stage store: where every stage of a run keeps its output, durably and resumably.
//!
//! A run is a directory:
//!
//! ```text
//! <run>/manifest.json                      what is committed (see `manifest`)
//! <run>/stages/<stage>/part-00000.parquet  Arrow batches, zstd-compressed Parquet,
//! <run>/stages/<stage>/part-00001.parquet  Arrow schema embedded
//! ```
//!
//! Contracts:
//!
//! - **Visibility.** A part file appears under its name only once it is whole and synced
//!   (temporary name, fsync, rename, fsync of the directory), and counts as committed only
//!   once the manifest, rewritten atomically the same way, lists it. A killed writer leaves
//!   at most a temporary file and an unlisted part, which [`StageStore::open`] deletes
//!   (see [`RecoveryReport`]). Readers only ever see listed parts.
//! - **Keys.** A stage is recorded with the [`StageKey`] it was produced under: the hash of
//!   its settings and of its inputs. [`StageStore::completed`] returns a stage only when
//!   it was finished under exactly the asked key, so a rerun with unchanged inputs and
//!   settings recomputes nothing. A stage recorded under another key is
//!   [`StageStatus::Stale`]; [`StageStore::begin`] with the new key discards its parts.
//! - **Resume.** [`StageStore::begin`] over an unfinished stage with the same key and
//!   schema keeps its committed parts, and [`StageWriter::committed_rows`] tells the
//!   caller how many rows of its output to skip. A caller whose output is deterministic
//!   and cut into parts at deterministic row counts thus ends with the same parts as an
//!   uninterrupted run.
//! - **One owner.** One process opens a run directory at a time: [`StageStore::open`]
//!   takes an exclusive lock on `<run>/run.lock` and refuses a directory another process
//!   holds ([`StoreError::RunLocked`]). Within a process there is one handle per run
//!   directory: opening a directory that is already open returns the same handle, so
//!   every stage of a command reads and extends one manifest and no stage can write the
//!   manifest from a stale view of it (which once made `mine` delete the query cache
//!   that `generate`, run inside it, had just committed). Each stage has at most one open
//!   [`StageWriter`]; different stages can be written concurrently.
//! - **Names.** Stage names are chosen by the engine (1 to 64 of `a-z`, `0-9`, `-`, `_`),
//!   part names are generated; no name ever comes from document content.

mod durable;
mod error;
mod hash;
mod manifest;
pub mod memo;
mod owner;
mod reader;
mod recovery;
mod writer;

use std::collections::HashSet;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use arrow::datatypes::{Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

pub use durable::{write_file_atomically, write_file_with};
pub use error::StoreError;
pub use hash::{hash_file, hash_settings, memoised_by_files, ContentHasher, HASH_READ_BYTES};
pub use manifest::{validate_stage_name, PartEntry, StageKey, MANIFEST_FILE};
pub use owner::LOCK_FILE;
pub use reader::{StageReader, READ_BATCH_ROWS};
pub use recovery::RecoveryReport;
pub use writer::{PartWriter, StageWriter, MAX_ROW_GROUP_BYTES, ZSTD_LEVEL};

use durable::remove_if_present;
pub(crate) use durable::sync_dir;
use manifest::{Manifest, StageEntry};
use recovery::STAGES_DIR;

/// Read buffer for [`StageStore::verify`]; 1 MiB keeps syscalls few without mattering
/// for memory.
const VERIFY_BUFFER_BYTES: usize = 1 << 20;

/// A handle on an open run directory. Cheap to clone; clones, and every other handle
/// this process opens on the same directory, share the manifest.
#[derive(Debug, Clone)]
pub struct StageStore {
    shared: Arc<Shared>,
}

/// State shared by a store's handles and its writers.
#[derive(Debug)]
pub(crate) struct Shared {
    run_dir: PathBuf,
    state: Mutex<State>,
    recovery: RecoveryReport,
    /// Holds the exclusive lock on [`LOCK_FILE`] while the directory is open.
    _lock: File,
}

#[derive(Debug)]
pub(crate) struct State {
    manifest: Manifest,
    /// Stages with a live [`StageWriter`].
    open_writers: HashSet<String>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while the lock was held cannot have left the manifest half-changed:
        // `update` replaces it only after the new one is on disk.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn stage_dir(&self, stage: &str) -> PathBuf {
        self.run_dir.join(STAGES_DIR).join(stage)
    }

    /// Applies `change` to a copy of the manifest, writes the copy, and only then makes it
    /// the current manifest; on error nothing changes.
    fn update<R>(
        &self,
        state: &mut State,
        change: impl FnOnce(&mut Manifest) -> R,
    ) -> Result<R, StoreError> {
        let mut next = state.manifest.clone();
        let result = change(&mut next);
        next.save(&self.run_dir)?;
        state.manifest = next;
        Ok(result)
    }
}

/// Where a stage stands relative to the key a caller wants it under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StageStatus {
    /// The run has no record of the stage.
    Absent,
    /// The stage was produced (in part or whole) under another key; its parts are useless
    /// for this key and `begin` will discard them.
    Stale {
        /// The key the recorded parts belong to.
        recorded: StageKey,
    },
    /// Begun under this key and not finished: `begin` resumes after these rows.
    Partial {
        committed_rows: u64,
        committed_parts: usize,
    },
    /// Finished under this key.
    Complete(CompletedStage),
}

/// A stage finished under a key: its parts, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompletedStage {
    pub stage: String,
    pub key: StageKey,
    pub parts: Vec<PartEntry>,
}

impl CompletedStage {
    /// Rows over all parts.
    pub fn rows(&self) -> u64 {
        self.parts.iter().map(|p| p.rows).sum()
    }

    /// A hash of the stage's output: over the blake3 of each part file, in order. Part
    /// files are byte-identical for identical batches and part boundaries, so a downstream
    /// stage can use this as (part of) its input hash.
    pub fn content_hash(&self) -> String {
        let mut hasher = ContentHasher::new();
        for part in &self.parts {
            hasher.field(&part.blake3);
        }
        hasher.finish()
    }
}

impl StageStore {
    /// Opens the run directory, creating it if needed, loads its manifest and repairs what
    /// a killed run left behind (see [`RecoveryReport`], kept as [`Self::recovery`]).
    ///
    /// A directory this process already has open is not opened again: the call returns
    /// the open handle (its recovery happened when it was first opened). A directory
    /// another process has open is [`StoreError::RunLocked`].
    pub fn open(run_dir: impl AsRef<Path>) -> Result<StageStore, StoreError> {
        let run_dir = run_dir.as_ref().to_path_buf();
        let stages = run_dir.join(STAGES_DIR);
        if !stages.is_dir() {
            std::fs::create_dir_all(&stages)
                .map_err(StoreError::io("create directory", &stages))?;
            sync_dir(&run_dir)?;
        }
        let canonical = run_dir
            .canonicalize()
            .map_err(StoreError::io("resolve", &run_dir))?;
        let mut open_runs = owner::OPEN_RUNS
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        open_runs.retain(|_, handle| handle.strong_count() > 0);
        if let Some(shared) = open_runs.get(&canonical).and_then(Weak::upgrade) {
            return Ok(StageStore { shared });
        }
        let lock = owner::lock_run_dir(&run_dir)?;
        let mut manifest = Manifest::load(&run_dir)?;
        let recovery = recovery::recover(&run_dir, &mut manifest)?;
        let shared = Arc::new(Shared {
            run_dir,
            state: Mutex::new(State {
                manifest,
                open_writers: HashSet::new(),
            }),
            recovery,
            _lock: lock,
        });
        open_runs.insert(canonical, Arc::downgrade(&shared));
        Ok(StageStore { shared })
    }

    /// The run directory.
    pub fn run_dir(&self) -> &Path {
        &self.shared.run_dir
    }

    /// What [`Self::open`] repaired.
    pub fn recovery(&self) -> &RecoveryReport {
        &self.shared.recovery
    }

    /// Where `stage` stands relative to `key`.
    pub fn status(&self, stage: &str, key: &StageKey) -> Result<StageStatus, StoreError> {
        validate_stage_name(stage)?;
        let state = self.shared.lock();
        Ok(match state.manifest.stages.get(stage) {
            None => StageStatus::Absent,
            Some(entry) if entry.key != *key => StageStatus::Stale {
                recorded: entry.key.clone(),
            },
            Some(entry) if entry.complete => StageStatus::Complete(CompletedStage {
                stage: stage.to_string(),
                key: entry.key.clone(),
                parts: entry.parts.clone(),
            }),
            Some(entry) => StageStatus::Partial {
                committed_rows: entry.rows(),
                committed_parts: entry.parts.len(),
            },
        })
    }

    /// The stage, if it was finished under exactly `key`.
    pub fn completed(
        &self,
        stage: &str,
        key: &StageKey,
    ) -> Result<Option<CompletedStage>, StoreError> {
        Ok(match self.status(stage, key)? {
            StageStatus::Complete(done) => Some(done),
            _ => None,
        })
    }

    /// A stage finished under exactly `key`, whatever its name (the first by name):
    /// two stages with equal keys hold the same rows, so a caller can read the one
    /// that exists instead of computing another.
    pub fn find_completed(&self, key: &StageKey) -> Result<Option<CompletedStage>, StoreError> {
        let state = self.shared.lock();
        Ok(state
            .manifest
            .stages
            .iter()
            .find(|(_, entry)| entry.complete && entry.key == *key)
            .map(|(name, entry)| CompletedStage {
                stage: name.clone(),
                key: entry.key.clone(),
                parts: entry.parts.clone(),
            }))
    }

    /// The stage as it was last finished, under whatever key: what an incremental stage
    /// repairs from. `None` while it is absent or being written again.
    pub fn last_completed(&self, stage: &str) -> Result<Option<CompletedStage>, StoreError> {
        validate_stage_name(stage)?;
        let state = self.shared.lock();
        Ok(state
            .manifest
            .stages
            .get(stage)
            .filter(|entry| entry.complete)
            .map(|entry| CompletedStage {
                stage: stage.to_string(),
                key: entry.key.clone(),
                parts: entry.parts.clone(),
            }))
    }

    /// Takes ownership of `stage` to write it under `key` with `schema`.
    ///
    /// - Unfinished under the same key, and its parts have `schema`'s fields: resumes,
    ///   keeping the committed parts.
    /// - Absent, stale (another key) or with other fields: starts over; the manifest first
    ///   forgets the old parts, then their files are deleted (readers of the old parts
    ///   must be done by then).
    /// - Already complete under `key`: [`StoreError::AlreadyComplete`]; a writer open on
    ///   the stage: [`StoreError::StageBusy`].
    pub fn begin(
        &self,
        stage: &str,
        key: StageKey,
        schema: SchemaRef,
    ) -> Result<StageWriter, StoreError> {
        validate_stage_name(stage)?;
        let dir = self.shared.stage_dir(stage);
        let mut state = self.shared.lock();
        if state.open_writers.contains(stage) {
            return Err(StoreError::StageBusy {
                stage: stage.to_string(),
            });
        }
        let existing = state.manifest.stages.get(stage).cloned();
        let resumable = match &existing {
            Some(entry) if entry.key == key && entry.complete => {
                return Err(StoreError::AlreadyComplete {
                    stage: stage.to_string(),
                })
            }
            Some(entry) if entry.key == key => parts_have_fields(&dir, entry, &schema)?,
            _ => false,
        };
        if !dir.is_dir() {
            std::fs::create_dir_all(&dir).map_err(StoreError::io("create directory", &dir))?;
            sync_dir(&self.shared.run_dir.join(STAGES_DIR))?;
        }
        let entry = match existing {
            Some(entry) if resumable => entry,
            old => {
                let fresh = StageEntry {
                    key: key.clone(),
                    parts: Vec::new(),
                    complete: false,
                };
                self.shared.update(&mut state, |manifest| {
                    manifest.stages.insert(stage.to_string(), fresh.clone())
                })?;
                for part in old.map(|e| e.parts).unwrap_or_default() {
                    remove_if_present(&dir.join(&part.file))?;
                }
                fresh
            }
        };
        state.open_writers.insert(stage.to_string());
        drop(state);
        Ok(StageWriter::new(
            self.shared.clone(),
            stage.to_string(),
            key,
            schema,
            &entry,
        ))
    }

    /// Appends `line` (one JSON object, no newline) to the run's journal file `name`
    /// (chosen by the engine, e.g. `device-stages.jsonl`): a record of what ran, kept
    /// across invocations. Not a stage: a kill can cut its last line, which readers skip.
    pub fn append_journal(&self, name: &'static str, line: &str) -> Result<(), StoreError> {
        use std::io::Write;
        let path = self.shared.run_dir.join(name);
        let _state = self.shared.lock();
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(StoreError::io("open", &path))?;
        file.write_all(format!("{line}\n").as_bytes())
            .map_err(StoreError::io("append to", &path))
    }

    /// Streams the batches of the stage's committed parts in order (complete or not).
    pub fn read(&self, stage: &str) -> Result<StageReader, StoreError> {
        let parts = self.committed_parts(stage)?;
        Ok(StageReader::new(self.shared.stage_dir(stage), parts))
    }

    /// Streams the batches of `parts` (committed parts of `stage`, as the manifest lists
    /// them), in the order given.
    pub(crate) fn read_parts(&self, stage: &str, parts: Vec<PartEntry>) -> StageReader {
        StageReader::new(self.shared.stage_dir(stage), parts)
    }

    /// All batches of the stage in memory; for tests and small stages.
    pub fn read_all(&self, stage: &str) -> Result<Vec<RecordBatch>, StoreError> {
        self.read(stage)?.collect()
    }

    /// Re-reads every committed part of the stage and checks its size and blake3 against
    /// the manifest. [`StoreError::PartDamaged`] names the first part that differs.
    pub fn verify(&self, stage: &str) -> Result<(), StoreError> {
        let dir = self.shared.stage_dir(stage);
        for part in self.committed_parts(stage)? {
            let path = dir.join(&part.file);
            let mut file = std::fs::File::open(&path).map_err(StoreError::io("open", &path))?;
            let mut hasher = ContentHasher::new();
            let mut buffer = vec![0u8; VERIFY_BUFFER_BYTES];
            let mut bytes = 0u64;
            loop {
                let n = file
                    .read(&mut buffer)
                    .map_err(StoreError::io("read", &path))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buffer[..n]);
                bytes += n as u64;
            }
            let hash = hasher.finish();
            if bytes != part.bytes || hash != part.blake3 {
                return Err(StoreError::PartDamaged {
                    path,
                    reason: format!(
                        "{bytes} bytes with blake3 {hash}, the manifest recorded {} bytes with {}",
                        part.bytes, part.blake3
                    ),
                });
            }
        }
        Ok(())
    }

    fn committed_parts(&self, stage: &str) -> Result<Vec<PartEntry>, StoreError> {
        validate_stage_name(stage)?;
        let state = self.shared.lock();
        match state.manifest.stages.get(stage) {
            Some(entry) => Ok(entry.parts.clone()),
            None => Err(StoreError::UnknownStage {
                stage: stage.to_string(),
            }),
        }
    }
}

/// Whether the stage's committed parts were written with `schema`'s fields (read from the
/// Arrow schema embedded in the first part). No parts: nothing to contradict.
fn parts_have_fields(dir: &Path, entry: &StageEntry, schema: &Schema) -> Result<bool, StoreError> {
    let Some(first) = entry.parts.first() else {
        return Ok(true);
    };
    let path = dir.join(&first.file);
    let file = std::fs::File::open(&path).map_err(StoreError::io("open", &path))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|source| StoreError::Parquet { path, source })?;
    Ok(builder.schema().fields() == schema.fields())
}

/// `name: type` for each field (`?` marks nullable), for error messages.
pub(crate) fn describe_fields(schema: &Schema) -> String {
    schema
        .fields()
        .iter()
        .map(|f| {
            let null = if f.is_nullable() { "?" } else { "" };
            format!("{}: {}{null}", f.name(), f.data_type())
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Batches and keys shared by the store's unit tests.
#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is its job
pub(crate) mod fixtures;

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is its job
mod tests {
    use super::fixtures::{batch, key, ns, schema};
    use super::*;

    #[test]
    fn completed_stage_survives_reopen_and_is_found_by_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let done = {
            let store = StageStore::open(dir.path()).unwrap();
            let mut writer = store.begin("passages", key("s1", "i1"), schema()).unwrap();
            writer.write_part(&[batch(0, 3)]).unwrap();
            writer.write_part(&[batch(3, 2)]).unwrap();
            writer.finish().unwrap()
        };
        assert_eq!(done.rows(), 5);
        let store = StageStore::open(dir.path()).unwrap();
        assert_eq!(store.recovery(), &RecoveryReport::default());
        let found = store
            .completed("passages", &key("s1", "i1"))
            .unwrap()
            .unwrap();
        assert_eq!(found, done);
        assert_eq!(
            ns(&store.read_all("passages").unwrap()),
            vec![0, 1, 2, 3, 4]
        );
        store.verify("passages").unwrap();
        // Finished under this key: beginning it again is a caller bug, not a rewrite.
        assert!(matches!(
            store.begin("passages", key("s1", "i1"), schema()),
            Err(StoreError::AlreadyComplete { .. })
        ));
    }

    #[test]
    fn other_key_is_stale_and_begin_rewrites_the_stage() {
        let dir = tempfile::tempdir().unwrap();
        let store = StageStore::open(dir.path()).unwrap();
        let mut writer = store.begin("queries", key("s1", "i1"), schema()).unwrap();
        writer.write_part(&[batch(0, 2)]).unwrap();
        writer.write_part(&[batch(2, 2)]).unwrap();
        writer.finish().unwrap();

        for other in [key("s2", "i1"), key("s1", "i2")] {
            assert_eq!(store.completed("queries", &other).unwrap(), None);
            assert_eq!(
                store.status("queries", &other).unwrap(),
                StageStatus::Stale {
                    recorded: key("s1", "i1")
                }
            );
        }
        let mut writer = store.begin("queries", key("s2", "i1"), schema()).unwrap();
        assert_eq!(writer.committed_rows(), 0);
        writer.write_part(&[batch(100, 1)]).unwrap();
        writer.finish().unwrap();

        let stage_dir = dir.path().join("stages/queries");
        assert!(stage_dir.join("part-00000.parquet").is_file());
        assert!(!stage_dir.join("part-00001.parquet").exists());
        assert_eq!(ns(&store.read_all("queries").unwrap()), vec![100]);
        assert_eq!(store.completed("queries", &key("s1", "i1")).unwrap(), None);
        assert_eq!(
            store.status("absent", &key("s1", "i1")).unwrap(),
            StageStatus::Absent
        );
    }

    #[test]
    fn begin_resumes_after_the_committed_parts_of_an_unfinished_stage() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = StageStore::open(dir.path()).unwrap();
            let mut writer = store.begin("teacher", key("s", "i"), schema()).unwrap();
            writer.write_part(&[batch(0, 3)]).unwrap();
            writer.write_part(&[batch(3, 2), batch(5, 2)]).unwrap();
            // Dropped without finish: the run was interrupted.
        }
        let store = StageStore::open(dir.path()).unwrap();
        assert_eq!(
            store.status("teacher", &key("s", "i")).unwrap(),
            StageStatus::Partial {
                committed_rows: 7,
                committed_parts: 2
            }
        );
        assert_eq!(store.completed("teacher", &key("s", "i")).unwrap(), None);
        let mut writer = store.begin("teacher", key("s", "i"), schema()).unwrap();
        assert_eq!(writer.committed_rows(), 7);
        assert_eq!(writer.committed_parts(), 2);
        let part = writer.write_part(&[batch(7, 4)]).unwrap();
        assert_eq!(part.file, "part-00002.parquet");
        let done = writer.finish().unwrap();
        assert_eq!(done.rows(), 11);
        assert_eq!(
            ns(&store.read_all("teacher").unwrap()),
            (0..11).collect::<Vec<_>>()
        );
    }

    #[test]
    fn resuming_with_other_fields_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        let store = StageStore::open(dir.path()).unwrap();
        let mut writer = store.begin("examples", key("s", "i"), schema()).unwrap();
        writer.write_part(&[batch(0, 3)]).unwrap();
        drop(writer);

        let narrow = Arc::new(Schema::new(vec![schema().field(1).clone()]));
        let mut writer = store
            .begin("examples", key("s", "i"), narrow.clone())
            .unwrap();
        assert_eq!(writer.committed_rows(), 0);
        let only_n = batch(10, 2).project(&[1]).unwrap();
        writer.write_part(&[only_n]).unwrap();
        writer.finish().unwrap();
        let read = store.read_all("examples").unwrap();
        assert_eq!(read.len(), 1);
        assert_eq!(read[0].schema().fields(), narrow.fields());
        assert_eq!(read[0].num_rows(), 2);
    }

    #[test]
    fn one_writer_per_stage_and_names_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let store = StageStore::open(dir.path()).unwrap();
        let writer = store.begin("candidates", key("s", "i"), schema()).unwrap();
        assert!(matches!(
            store.clone().begin("candidates", key("s", "i"), schema()),
            Err(StoreError::StageBusy { .. })
        ));
        // Another stage can be written at the same time.
        let other = store.begin("embeddings", key("s", "i"), schema()).unwrap();
        drop(writer);
        drop(other);
        assert!(store.begin("candidates", key("s", "i"), schema()).is_ok());

        for bad in ["../escape", "Upper", "", "a/b"] {
            assert!(matches!(
                store.begin(bad, key("s", "i"), schema()),
                Err(StoreError::InvalidStageName { .. })
            ));
            assert!(matches!(
                store.read(bad),
                Err(StoreError::InvalidStageName { .. })
            ));
        }
        assert!(matches!(
            store.read("never"),
            Err(StoreError::UnknownStage { .. })
        ));
    }

    #[test]
    fn content_hash_is_equal_for_equal_output_in_different_runs() {
        let write = |rows: usize| {
            let dir = tempfile::tempdir().unwrap();
            let store = StageStore::open(dir.path()).unwrap();
            let mut writer = store.begin("passages", key("s", "i"), schema()).unwrap();
            writer.write_part(&[batch(0, rows)]).unwrap();
            writer.finish().unwrap().content_hash()
        };
        assert_eq!(write(5), write(5));
        assert_ne!(write(5), write(6));
    }

    /// Regression: `label` opened the run, then `mine` and `generate` inside it each
    /// opened their own handle; the outer handle's next manifest write dropped the query
    /// cache the inner one had committed, and recovery then deleted its parts.
    #[test]
    fn handles_opened_on_one_directory_share_one_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let outer = StageStore::open(dir.path()).unwrap();
        {
            let inner = StageStore::open(dir.path().join(".")).unwrap();
            let mut writer = inner.begin("queries", key("q", "i"), schema()).unwrap();
            writer.write_part(&[batch(0, 2)]).unwrap();
            writer.finish().unwrap();
        }
        let mut writer = outer.begin("candidates", key("c", "i"), schema()).unwrap();
        writer.write_part(&[batch(0, 1)]).unwrap();
        writer.finish().unwrap();
        drop(outer);

        let reopened = StageStore::open(dir.path()).unwrap();
        assert_eq!(reopened.recovery(), &RecoveryReport::default());
        for (stage, k) in [("queries", key("q", "i")), ("candidates", key("c", "i"))] {
            assert!(
                reopened.completed(stage, &k).unwrap().is_some(),
                "{stage} was lost"
            );
            reopened.verify(stage).unwrap();
        }
    }

    #[test]
    fn a_directory_locked_by_another_owner_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        // Another process's lock, as flock sees it: another open file description.
        let held = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.path().join(LOCK_FILE))
            .unwrap();
        held.lock().unwrap();
        let err = StageStore::open(dir.path()).unwrap_err();
        assert!(matches!(err, StoreError::RunLocked { .. }), "{err}");
        assert!(err.to_string().contains("in use by another"), "{err}");
        held.unlock().unwrap();
        let store = StageStore::open(dir.path()).unwrap();
        drop(store);
        // Released with the last handle: the directory opens again.
        StageStore::open(dir.path()).unwrap();
    }

    #[test]
    fn a_stage_is_found_by_its_key_under_any_name_once_complete() {
        let dir = tempfile::tempdir().unwrap();
        let store = StageStore::open(dir.path()).unwrap();
        let mut writer = store.begin("r0-passages", key("m", "c"), schema()).unwrap();
        writer.write_part(&[batch(0, 2)]).unwrap();
        assert_eq!(store.find_completed(&key("m", "c")).unwrap(), None);
        let done = writer.finish().unwrap();
        assert_eq!(store.find_completed(&key("m", "c")).unwrap(), Some(done));
        assert_eq!(store.find_completed(&key("m", "other")).unwrap(), None);
    }

    /// Regression: `mine` and `label` wrote their whole output again into a resumed
    /// stage, after the parts a killed run had committed: every row twice.
    #[test]
    fn write_rows_into_a_resumed_stage_writes_each_row_once_in_the_same_parts() {
        let rows: Vec<i64> = (0..7).collect();
        let to_batch =
            |chunk: &[i64]| -> Result<RecordBatch, StoreError> { Ok(batch(chunk[0], chunk.len())) };
        let whole = tempfile::tempdir().unwrap();
        let store = StageStore::open(whole.path()).unwrap();
        let mut writer = store.begin("examples", key("s", "i"), schema()).unwrap();
        writer.write_rows(&rows, 3, to_batch).unwrap();
        let expected = writer.finish().unwrap();

        let killed = tempfile::tempdir().unwrap();
        {
            let store = StageStore::open(killed.path()).unwrap();
            let mut writer = store.begin("examples", key("s", "i"), schema()).unwrap();
            writer.write_part(&[batch(0, 3)]).unwrap();
            // Killed here: one part committed, the stage not finished.
        }
        let store = StageStore::open(killed.path()).unwrap();
        let mut writer = store.begin("examples", key("s", "i"), schema()).unwrap();
        assert_eq!(writer.committed_rows(), 3);
        writer.write_rows(&rows, 3, to_batch).unwrap();
        let resumed = writer.finish().unwrap();
        assert_eq!(ns(&store.read_all("examples").unwrap()), rows);
        assert_eq!(resumed.parts, expected.parts);
        // More committed rows than the output has is refused, not silently kept.
        let mut writer = store.begin("other", key("s", "i"), schema()).unwrap();
        writer.write_part(&[batch(0, 3)]).unwrap();
        assert!(matches!(
            writer.write_rows(&rows[..2], 3, to_batch),
            Err(StoreError::ResumeMismatch { .. })
        ));
    }

    #[test]
    fn verify_names_a_part_whose_bytes_changed() {
        let dir = tempfile::tempdir().unwrap();
        let store = StageStore::open(dir.path()).unwrap();
        let mut writer = store.begin("passages", key("s", "i"), schema()).unwrap();
        writer.write_part(&[batch(0, 4)]).unwrap();
        writer.finish().unwrap();
        let path = dir.path().join("stages/passages/part-00000.parquet");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[10] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        match store.verify("passages") {
            Err(StoreError::PartDamaged { path: named, .. }) => assert_eq!(named, path),
            other => panic!("expected PartDamaged, got {other:?}"),
        }
    }
}
