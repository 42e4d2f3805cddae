//! A write killed in the middle of a part leaves no visible partial part.
//!
//! The test re-executes its own binary as a child process that writes one committed part,
//! then starts a large second part and calls `std::process::abort()` as soon as the second
//! part's temporary file has received bytes: the process dies with a half-written Parquet
//! file on disk and the stage still open. The parent then checks what a later run sees.

#![allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is its job

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use arrow::array::{Array, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use distillery::store::{StageKey, StageStatus, StageStore};

/// Set (to the run directory) in the child's environment: the child is the writer.
const CHILD_ENV: &str = "DISTILLERY_STORE_CRASH_WRITER";
/// The name of the test, so the child runs only it.
const TEST_NAME: &str = "killed_write_leaves_no_visible_partial_part";
const STAGE: &str = "passages";
/// Rows of the part committed before the crash.
const FIRST_ROWS: usize = 1000;
/// Rows per batch of the interrupted part; with `TEXT_BYTES` a batch is about 1 MiB.
const BATCH_ROWS: usize = 4096;
/// Bytes of text per row of the interrupted part.
const TEXT_BYTES: usize = 256;
/// The child gives up (and exits with `CHILD_NEVER_FLUSHED`) if this many batches leave
/// the temporary file empty: 256 MiB of rows, eight times the store's row group size.
const MAX_BATCHES: usize = 256;
const CHILD_NEVER_FLUSHED: i32 = 3;

fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("n", DataType::Int64, false),
        Field::new("text", DataType::Utf8, false),
    ]))
}

fn key() -> StageKey {
    StageKey {
        settings_hash: "settings".into(),
        input_hash: "inputs".into(),
    }
}

/// Rows `first..first + rows`; each text is `text_bytes` pseudo-random letters (an
/// xorshift stream), so zstd cannot shrink a row group to nothing.
fn batch(first: usize, rows: usize, text_bytes: usize) -> RecordBatch {
    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ first as u64;
    let texts = (0..rows).map(|_| {
        (0..text_bytes)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                char::from(b'a' + (state % 26) as u8)
            })
            .collect::<String>()
    });
    let ns = Int64Array::from_iter_values((first..first + rows).map(|n| n as i64));
    RecordBatch::try_new(
        schema(),
        vec![Arc::new(ns), Arc::new(StringArray::from_iter_values(texts))],
    )
    .unwrap()
}

fn ns(batches: &[RecordBatch]) -> Vec<i64> {
    batches
        .iter()
        .flat_map(|b| {
            let n = b.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
            n.values().to_vec()
        })
        .collect()
}

fn temp_file(run: &Path) -> PathBuf {
    run.join("stages")
        .join(STAGE)
        .join(".part-00001.parquet.tmp")
}

/// The child: commit part 0, then die while part 1 is being written.
fn write_then_abort(run: &Path) -> ! {
    let store = StageStore::open(run).unwrap();
    let mut writer = store.begin(STAGE, key(), schema()).unwrap();
    writer.write_part(&[batch(0, FIRST_ROWS, 8)]).unwrap();
    let mut part = writer.start_part().unwrap();
    let tmp = temp_file(run);
    for i in 0..MAX_BATCHES {
        part.write(&batch(FIRST_ROWS + i * BATCH_ROWS, BATCH_ROWS, TEXT_BYTES))
            .unwrap();
        if std::fs::metadata(&tmp).unwrap().len() > 0 {
            std::process::abort();
        }
    }
    std::process::exit(CHILD_NEVER_FLUSHED);
}

#[test]
fn killed_write_leaves_no_visible_partial_part() {
    if let Some(run) = std::env::var_os(CHILD_ENV) {
        write_then_abort(Path::new(&run));
    }
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path();
    let status = Command::new(std::env::current_exe().unwrap())
        .args([TEST_NAME, "--exact", "--test-threads=1", "-q"])
        .env(CHILD_ENV, run)
        .status()
        .unwrap();
    assert_ne!(
        status.code(),
        Some(CHILD_NEVER_FLUSHED),
        "the child never reached the disk"
    );
    assert!(!status.success(), "the child was meant to abort: {status}");
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        const SIGABRT: i32 = 6;
        assert_eq!(status.signal(), Some(SIGABRT), "{status}");
    }

    // The child died mid-part: its temporary file holds bytes, but only part 0 is visible.
    let stage_dir = run.join("stages").join(STAGE);
    assert!(std::fs::metadata(temp_file(run)).unwrap().len() > 0);
    let mut visible: Vec<String> = std::fs::read_dir(&stage_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|name| !name.starts_with('.'))
        .collect();
    visible.sort();
    assert_eq!(visible, vec!["part-00000.parquet".to_string()]);

    // The manifest is whole and lists exactly the committed part.
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("manifest.json")).unwrap()).unwrap();
    let stage = &manifest["stages"][STAGE];
    assert_eq!(stage["complete"], serde_json::json!(false));
    let parts = stage["parts"].as_array().unwrap();
    assert_eq!(parts.len(), 1);
    assert_eq!(parts[0]["file"], serde_json::json!("part-00000.parquet"));
    assert_eq!(parts[0]["rows"], serde_json::json!(FIRST_ROWS));

    // Reopening deletes the temporary file; reading gives exactly part 0's rows.
    let store = StageStore::open(run).unwrap();
    assert_eq!(store.recovery().temp_files_removed, 1);
    assert_eq!(store.recovery().orphan_parts_removed, 0);
    assert!(store.recovery().damaged_stages.is_empty());
    assert!(!temp_file(run).exists());
    let expected: Vec<i64> = (0..FIRST_ROWS as i64).collect();
    assert_eq!(ns(&store.read_all(STAGE).unwrap()), expected);
    store.verify(STAGE).unwrap();

    // Resuming keeps part 0 and writes part 1 afresh.
    assert_eq!(
        store.status(STAGE, &key()).unwrap(),
        StageStatus::Partial {
            committed_rows: FIRST_ROWS as u64,
            committed_parts: 1
        }
    );
    let mut writer = store.begin(STAGE, key(), schema()).unwrap();
    assert_eq!(writer.committed_rows(), FIRST_ROWS as u64);
    let part = writer.write_part(&[batch(FIRST_ROWS, 500, 8)]).unwrap();
    assert_eq!((part.file.as_str(), part.rows), ("part-00001.parquet", 500));
    let done = writer.finish().unwrap();
    assert_eq!(done.rows(), FIRST_ROWS as u64 + 500);
    let expected: Vec<i64> = (0..(FIRST_ROWS + 500) as i64).collect();
    assert_eq!(ns(&store.read_all(STAGE).unwrap()), expected);
    store.verify(STAGE).unwrap();
}
