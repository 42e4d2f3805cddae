//! Reading a stage back: a streaming iterator over the batches of its committed parts, in
//! commit order. Only one part file is open at a time and it is decoded a batch at a time,
//! so reading a stage costs memory for one batch, not for the stage.

use std::fs::File;
use std::path::{Path, PathBuf};

use arrow::record_batch::RecordBatch;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};

use super::error::StoreError;
use super::manifest::PartEntry;

/// Rows per batch when reading parts back: large enough that per-batch overhead vanishes,
/// small enough that a batch of embedding rows stays in the tens of megabytes.
pub const READ_BATCH_ROWS: usize = 8192;

/// Batches of a stage's committed parts, from [`super::StageStore::read`]. It reads the
/// parts that were committed when it was created. After the first error it yields nothing.
pub struct StageReader {
    dir: PathBuf,
    parts: std::vec::IntoIter<PartEntry>,
    current: Option<(PathBuf, ParquetRecordBatchReader)>,
    failed: bool,
}

impl StageReader {
    pub(crate) fn new(dir: PathBuf, parts: Vec<PartEntry>) -> Self {
        StageReader {
            dir,
            parts: parts.into_iter(),
            current: None,
            failed: false,
        }
    }

    /// Opens the next part, checking that it holds the rows the manifest says.
    fn open_next(&mut self) -> Option<Result<(), StoreError>> {
        let part = self.parts.next()?;
        let path = self.dir.join(&part.file);
        Some(open_part(&path, &part).map(|reader| self.current = Some((path, reader))))
    }
}

fn open_part(path: &Path, part: &PartEntry) -> Result<ParquetRecordBatchReader, StoreError> {
    let file = File::open(path).map_err(StoreError::io("open", path))?;
    let parquet = |source| StoreError::Parquet {
        path: path.to_path_buf(),
        source,
    };
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(parquet)?;
    let rows = builder.metadata().file_metadata().num_rows();
    if u64::try_from(rows).ok() != Some(part.rows) {
        return Err(StoreError::PartDamaged {
            path: path.to_path_buf(),
            reason: format!("holds {rows} rows, the manifest recorded {}", part.rows),
        });
    }
    builder
        .with_batch_size(READ_BATCH_ROWS)
        .build()
        .map_err(parquet)
}

impl Iterator for StageReader {
    type Item = Result<RecordBatch, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        loop {
            if let Some((path, reader)) = self.current.as_mut() {
                match reader.next() {
                    Some(Ok(batch)) => return Some(Ok(batch)),
                    Some(Err(source)) => {
                        self.failed = true;
                        return Some(Err(StoreError::Arrow {
                            path: path.clone(),
                            source,
                        }));
                    }
                    None => self.current = None,
                }
            }
            match self.open_next()? {
                Ok(()) => {}
                Err(e) => {
                    self.failed = true;
                    return Some(Err(e));
                }
            }
        }
    }
}
