//! Writing a stage: a [`StageWriter`] owns one stage of the run until it is dropped, and
//! commits its output one Parquet part at a time.
//!
//! Contract of a part: it is written as `.part-NNNNN.parquet.tmp` in the stage directory,
//! synced, renamed to `part-NNNNN.parquet`, the directory synced, and only then added to
//! the manifest (itself rewritten atomically). A part that is in the manifest is therefore
//! whole on disk; a part file that is not in the manifest (a crash between the rename and
//! the manifest write) is an orphan that the next [`super::StageStore::open`] deletes.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use arrow::datatypes::{Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use parquet::arrow::{ArrowSchemaConverter, ArrowWriter};
use parquet::basic::{Compression, Type as PhysicalType, ZstdLevel};
use parquet::errors::ParquetError;
use parquet::file::properties::WriterProperties;

use super::durable::{publish, remove_if_present, temp_name};
use super::error::StoreError;
use super::manifest::{part_file_name, PartEntry, StageEntry, StageKey};
use super::{describe_fields, CompletedStage, Shared};

/// zstd level for part files. 3 is zstd's own default: about as fast to write as level 1
/// on numeric and text columns while compressing noticeably better, and decompression
/// speed hardly depends on the level, so higher levels would only slow the writers.
pub const ZSTD_LEVEL: i32 = 3;

/// A row group is flushed to the file once its estimated size reaches this many bytes.
/// It bounds the memory one open part holds (every worker may hold one per stage it
/// writes; an embedding stage's rows are kilobytes each) while keeping column chunks large
/// enough for sequential reads.
pub const MAX_ROW_GROUP_BYTES: usize = 32 * 1024 * 1024;

/// The properties of a part of `schema`: zstd, except for the columns of floats and of
/// fixed-width bytes (embeddings, scores, content hashes), which are stored plain, with
/// no dictionary: their values are as good as random to a compressor (an embedding
/// stage came out larger than its raw floats), so compressing them, and trying a
/// dictionary first, only cost the time to write and read them.
fn writer_properties(schema: &Schema) -> Result<WriterProperties, ParquetError> {
    let mut builder = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(ZSTD_LEVEL)?))
        .set_max_row_group_bytes(Some(MAX_ROW_GROUP_BYTES));
    for column in ArrowSchemaConverter::new().convert(schema)?.columns() {
        if matches!(
            column.physical_type(),
            PhysicalType::FLOAT | PhysicalType::DOUBLE | PhysicalType::FIXED_LEN_BYTE_ARRAY
        ) {
            builder = builder
                .set_column_compression(column.path().clone(), Compression::UNCOMPRESSED)
                .set_column_dictionary_enabled(column.path().clone(), false);
        }
    }
    Ok(builder.build())
}

/// The exclusive writer of one stage, from [`super::StageStore::begin`].
///
/// When it was begun over an incomplete stage with the same key and schema, the parts
/// committed before stay: [`committed_rows`](Self::committed_rows) rows are durable and
/// the caller skips that many rows of its (deterministic) output before writing more.
/// Dropping the writer without [`finish`](Self::finish) leaves the stage incomplete and
/// resumable.
#[derive(Debug)]
pub struct StageWriter {
    shared: Arc<Shared>,
    stage: String,
    dir: PathBuf,
    key: StageKey,
    schema: SchemaRef,
    committed_rows: u64,
    committed_parts: usize,
}

impl StageWriter {
    /// Called by `begin` with the stage already marked as having an open writer.
    pub(crate) fn new(
        shared: Arc<Shared>,
        stage: String,
        key: StageKey,
        schema: SchemaRef,
        entry: &StageEntry,
    ) -> Self {
        let dir = shared.stage_dir(&stage);
        StageWriter {
            shared,
            stage,
            dir,
            key,
            schema,
            committed_rows: entry.rows(),
            committed_parts: entry.parts.len(),
        }
    }

    /// The stage's name.
    pub fn stage(&self) -> &str {
        &self.stage
    }

    /// The key the stage is being written under.
    pub fn key(&self) -> &StageKey {
        &self.key
    }

    /// The schema every batch of this stage has.
    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    /// Rows already durable in committed parts (from this writer or a resumed run).
    pub fn committed_rows(&self) -> u64 {
        self.committed_rows
    }

    /// Parts already committed; the next part gets this number.
    pub fn committed_parts(&self) -> usize {
        self.committed_parts
    }

    /// Starts the next part, to be filled batch by batch and then committed. Dropping the
    /// part writer without [`PartWriter::commit`] deletes its temporary file.
    pub fn start_part(&mut self) -> Result<PartWriter<'_>, StoreError> {
        let file_name = part_file_name(self.committed_parts);
        let tmp = self.dir.join(temp_name(&file_name));
        let file = File::create(&tmp).map_err(StoreError::io("create", &tmp))?;
        let sink = HashingFile {
            file,
            hasher: blake3::Hasher::new(),
            bytes: 0,
        };
        let parquet = |source| StoreError::Parquet {
            path: tmp.clone(),
            source,
        };
        let props = writer_properties(&self.schema).map_err(parquet)?;
        let arrow =
            ArrowWriter::try_new(sink, self.schema.clone(), Some(props)).map_err(parquet)?;
        Ok(PartWriter {
            stage: self,
            arrow: Some(arrow),
            tmp,
            file_name,
            rows: 0,
            published: false,
        })
    }

    /// Writes `batches` as one part and commits it. An empty slice commits a part with
    /// no rows.
    pub fn write_part(&mut self, batches: &[RecordBatch]) -> Result<PartEntry, StoreError> {
        let mut part = self.start_part()?;
        for batch in batches {
            part.write(batch)?;
        }
        part.commit()
    }

    /// Writes `rows` (the stage's whole output, in order) as parts of `chunk_rows` rows
    /// each, after the rows this writer already committed (a resumed stage): the parts
    /// end up as an uninterrupted writer cuts them, and no row is written twice. The
    /// committed rows must be whole chunks, or all the rows, as this method leaves them.
    pub fn write_rows<T, E: From<StoreError>>(
        &mut self,
        rows: &[T],
        chunk_rows: usize,
        to_batch: impl Fn(&[T]) -> Result<RecordBatch, E>,
    ) -> Result<(), E> {
        self.write_row_ranges(rows.len(), chunk_rows, |range| to_batch(&rows[range]))
    }

    /// [`StageWriter::write_rows`] for an output of `total` rows that is built a chunk at
    /// a time: `to_batch` makes the batch of the rows in a range, so only one chunk of
    /// rows is ever held.
    pub fn write_row_ranges<E: From<StoreError>>(
        &mut self,
        total: usize,
        chunk_rows: usize,
        mut to_batch: impl FnMut(std::ops::Range<usize>) -> Result<RecordBatch, E>,
    ) -> Result<(), E> {
        let chunk_rows = chunk_rows.max(1);
        let done = usize::try_from(self.committed_rows).unwrap_or(usize::MAX);
        if done > total || (done % chunk_rows != 0 && done != total) {
            return Err(StoreError::ResumeMismatch {
                stage: self.stage.clone(),
                committed: self.committed_rows,
                rows: total as u64,
                chunk_rows: chunk_rows as u64,
            }
            .into());
        }
        let mut start = done;
        while start < total {
            let end = (start + chunk_rows).min(total);
            self.write_part(&[to_batch(start..end)?])?;
            start = end;
        }
        Ok(())
    }

    /// Marks the stage complete: from now on `completed` with this key returns it.
    pub fn finish(self) -> Result<CompletedStage, StoreError> {
        let mut state = self.shared.lock();
        let entry = self.shared.update(&mut state, |manifest| {
            let entry = manifest
                .stages
                .entry(self.stage.clone())
                .or_insert_with(|| StageEntry {
                    key: self.key.clone(),
                    parts: Vec::new(),
                    complete: false,
                });
            entry.complete = true;
            entry.clone()
        })?;
        Ok(CompletedStage {
            stage: self.stage.clone(),
            key: entry.key,
            parts: entry.parts,
        })
    }

    fn commit_part(&mut self, part: PartEntry) -> Result<(), StoreError> {
        let mut state = self.shared.lock();
        let rows = part.rows;
        self.shared.update(&mut state, |manifest| {
            manifest
                .stages
                .entry(self.stage.clone())
                .or_insert_with(|| StageEntry {
                    key: self.key.clone(),
                    parts: Vec::new(),
                    complete: false,
                })
                .parts
                .push(part);
        })?;
        self.committed_rows += rows;
        self.committed_parts += 1;
        Ok(())
    }
}

impl Drop for StageWriter {
    fn drop(&mut self) {
        self.shared.lock().open_writers.remove(&self.stage);
    }
}

/// One part being written. Batches must have the stage's schema.
pub struct PartWriter<'w> {
    stage: &'w mut StageWriter,
    /// `None` once the file has been closed by `commit`.
    arrow: Option<ArrowWriter<HashingFile>>,
    tmp: PathBuf,
    file_name: String,
    rows: u64,
    published: bool,
}

impl PartWriter<'_> {
    /// Appends a batch to the part. Rows reach the temporary file as row groups fill.
    pub fn write(&mut self, batch: &RecordBatch) -> Result<(), StoreError> {
        if batch.schema_ref().fields() != self.stage.schema.fields() {
            return Err(StoreError::SchemaMismatch {
                stage: self.stage.stage.clone(),
                expected: describe_fields(&self.stage.schema),
                found: describe_fields(batch.schema_ref()),
            });
        }
        let Some(arrow) = self.arrow.as_mut() else {
            return Err(closed(&self.tmp));
        };
        arrow.write(batch).map_err(|source| StoreError::Parquet {
            path: self.tmp.clone(),
            source,
        })?;
        self.rows += batch.num_rows() as u64;
        Ok(())
    }

    /// Rows written into this part so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Closes the file, makes it durable and visible, and records it in the manifest.
    pub fn commit(mut self) -> Result<PartEntry, StoreError> {
        let Some(arrow) = self.arrow.take() else {
            return Err(closed(&self.tmp));
        };
        let sink = arrow.into_inner().map_err(|source| StoreError::Parquet {
            path: self.tmp.clone(),
            source,
        })?;
        let HashingFile {
            mut file,
            hasher,
            bytes,
        } = sink;
        file.flush().map_err(StoreError::io("write", &self.tmp))?;
        crate::crash::point_in("store.part-written", &self.stage.stage);
        file.sync_all().map_err(StoreError::io("sync", &self.tmp))?;
        drop(file);
        publish(&self.tmp, &self.stage.dir, &self.file_name)?;
        self.published = true;
        crate::crash::point_in("store.part-renamed", &self.stage.stage);
        let entry = PartEntry {
            file: self.file_name.clone(),
            rows: self.rows,
            bytes,
            blake3: hasher.finalize().to_hex().to_string(),
        };
        self.stage.commit_part(entry.clone())?;
        Ok(entry)
    }
}

impl Drop for PartWriter<'_> {
    fn drop(&mut self) {
        if !self.published {
            // Best effort: a leftover temporary file is harmless (readers ignore it and the
            // next open deletes it), and a destructor has nowhere to report the failure.
            self.arrow = None;
            let _ = remove_if_present(&self.tmp);
        }
    }
}

fn closed(tmp: &std::path::Path) -> StoreError {
    StoreError::Parquet {
        path: tmp.to_path_buf(),
        source: ParquetError::General("part writer already closed".into()),
    }
}

/// The part file, hashing and counting every byte on its way to disk so that committing
/// does not read the file back.
struct HashingFile {
    file: File,
    hasher: blake3::Hasher,
    bytes: u64,
}

impl Write for HashingFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let written = self.file.write(buf)?;
        self.hasher.update(&buf[..written]);
        self.bytes += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is its job
mod tests {
    use super::*;
    use crate::store::fixtures::{batch, key, schema};
    use crate::store::StageStore;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    #[test]
    fn parts_round_trip_as_parquet_zstd_but_for_floats_with_the_recorded_hash() {
        let dir = tempfile::tempdir().unwrap();
        let store = StageStore::open(dir.path()).unwrap();
        let mut writer = store.begin("passages", key("s", "i"), schema()).unwrap();
        let first = writer.write_part(&[batch(0, 3)]).unwrap();
        writer.write_part(&[batch(3, 2)]).unwrap();
        writer.finish().unwrap();

        // Equal batches: same schema, same values, same nulls (row 0 and 3 have no score).
        let read = store.read_all("passages").unwrap();
        assert_eq!(read, vec![batch(0, 3), batch(3, 2)]);

        let path = dir.path().join("stages/passages/part-00000.parquet");
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(first.file, "part-00000.parquet");
        assert_eq!(first.rows, 3);
        assert_eq!(first.bytes, bytes.len() as u64);
        assert_eq!(first.blake3, blake3::hash(&bytes).to_hex().to_string());

        let builder =
            ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&path).unwrap()).unwrap();
        let meta = builder.metadata();
        // Parquet records the codec, not its level (a reader reports the default level).
        // The ids and integers are zstd; the floats (a score, a vector's items) plain,
        // without a dictionary.
        let codecs: Vec<(String, Compression, bool)> = meta
            .row_group(0)
            .columns()
            .iter()
            .map(|c| {
                let dictionary = c.dictionary_page_offset().is_some();
                (c.column_path().string(), c.compression(), dictionary)
            })
            .collect();
        assert_eq!(codecs.len(), 4);
        for (path, codec, dictionary) in &codecs {
            match path.as_str() {
                "id" | "n" => assert!(matches!(codec, Compression::ZSTD(_)), "{path}"),
                "score" | "vec.list.item" => {
                    assert_eq!(*codec, Compression::UNCOMPRESSED, "{path}");
                    assert!(!dictionary, "{path}");
                }
                other => panic!("unexpected column {other}"),
            }
        }
        let embedded = meta.file_metadata().key_value_metadata().unwrap();
        assert!(embedded.iter().any(|kv| kv.key == "ARROW:schema"));
    }

    #[test]
    fn batch_with_other_columns_is_refused_and_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = StageStore::open(dir.path()).unwrap();
        let mut writer = store.begin("teacher", key("s", "i"), schema()).unwrap();
        let mut part = writer.start_part().unwrap();
        let tmp = dir.path().join("stages/teacher/.part-00000.parquet.tmp");
        assert!(tmp.is_file());
        part.write(&batch(0, 2)).unwrap();
        let wrong = batch(0, 2).project(&[1, 0]).unwrap();
        match part.write(&wrong) {
            Err(StoreError::SchemaMismatch {
                expected, found, ..
            }) => {
                assert_eq!(
                    expected,
                    "id: Utf8, n: Int64, score: Float32?, vec: FixedSizeList(2 x non-null Float32)"
                );
                assert_eq!(found, "n: Int64, id: Utf8");
            }
            other => panic!("expected SchemaMismatch, got {other:?}"),
        }
        assert_eq!(part.rows(), 2);
        drop(part);
        assert!(!tmp.exists());
        assert_eq!(writer.committed_rows(), 0);
        assert_eq!(
            store.read_all("teacher").unwrap(),
            Vec::<RecordBatch>::new()
        );
    }

    #[test]
    fn an_empty_part_commits_zero_rows() {
        let dir = tempfile::tempdir().unwrap();
        let store = StageStore::open(dir.path()).unwrap();
        let mut writer = store.begin("queries", key("s", "i"), schema()).unwrap();
        let part = writer.write_part(&[]).unwrap();
        assert_eq!((part.file.as_str(), part.rows), ("part-00000.parquet", 0));
        assert_eq!(writer.committed_parts(), 1);
        let done = writer.finish().unwrap();
        assert_eq!(done.rows(), 0);
        assert!(store.read_all("queries").unwrap().is_empty());
    }
}
