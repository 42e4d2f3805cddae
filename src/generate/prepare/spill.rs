//! Preparation's memory bound: what it must keep of every passage until the last one
//! is read goes to disk once it passes a budget.
//!
//! - [`ExternalSorter`] sorts `(index, string)` items by string, then by index from the
//!   largest (the near-duplicate rule's order, see `dedup`): it keeps up to a byte
//!   budget in memory, writes each full buffer to disk as a sorted run, and merges the
//!   runs when read. A sorter that never filled its buffer never touches the disk.
//! - [`TextSpill`] keeps the passages' titles and texts in push order the same way:
//!   a buffer, appended to one file when full, read back in order.
//!
//! Files live in one spill directory ([`SpillDir`]) that is removed when preparation
//! ends; its name is a temporary name of the run directory (`.prepare.tmp`), which the
//! store's recovery deletes if a killed run left it behind.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use super::PrepareError;

/// Bytes of strings one buffer holds before it is written out. Preparation keeps three
/// buffers (two sort orders and the texts): about 100 MB at most, whatever the corpus.
pub const SPILL_BUFFER_BYTES: usize = 32 << 20;

/// Bytes of bookkeeping per buffered item counted against the budget (the `String`'s
/// header and the index), so a corpus of tiny strings is bounded too.
const ITEM_OVERHEAD: usize = 32;

/// A directory for spill files, created on first use and removed when dropped.
#[derive(Debug)]
pub struct SpillDir {
    path: PathBuf,
    created: bool,
}

impl SpillDir {
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            created: false,
        }
    }

    /// A new file in the directory, created empty.
    fn create(&mut self, name: &str) -> Result<(PathBuf, File), PrepareError> {
        if !self.created {
            // A directory left by a run killed before recovery ran is stale: start clean.
            let _ = std::fs::remove_dir_all(&self.path);
            std::fs::create_dir_all(&self.path).map_err(|e| spill_error(&self.path, e))?;
            self.created = true;
        }
        let path = self.path.join(name);
        let file = File::create(&path).map_err(|e| spill_error(&path, e))?;
        Ok((path, file))
    }
}

impl Drop for SpillDir {
    fn drop(&mut self) {
        if self.created {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

pub(super) fn spill_error(path: &Path, e: std::io::Error) -> PrepareError {
    PrepareError::Spill {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// Writes `string` as its length (u32, little-endian) and its bytes.
fn write_string(out: &mut impl Write, path: &Path, string: &str) -> Result<(), PrepareError> {
    let len = u32::try_from(string.len()).map_err(|_| PrepareError::Spill {
        path: path.to_path_buf(),
        reason: "a text over 4 GiB".into(),
    })?;
    out.write_all(&len.to_le_bytes())
        .and_then(|()| out.write_all(string.as_bytes()))
        .map_err(|e| spill_error(path, e))
}

/// Reads a string [`write_string`] wrote.
fn read_string(reader: &mut impl Read, path: &Path) -> Result<String, PrepareError> {
    let mut len = [0u8; 4];
    reader
        .read_exact(&mut len)
        .map_err(|e| spill_error(path, e))?;
    let mut bytes = vec![0u8; u32::from_le_bytes(len) as usize];
    reader
        .read_exact(&mut bytes)
        .map_err(|e| spill_error(path, e))?;
    String::from_utf8(bytes).map_err(|_| PrepareError::Spill {
        path: path.to_path_buf(),
        reason: "a spill file holds invalid UTF-8 (it was changed)".into(),
    })
}

/// The near-duplicate rule's order: by string, then the larger index first.
fn order(a: &(u32, String), b: &(u32, String)) -> Ordering {
    a.1.cmp(&b.1).then(b.0.cmp(&a.0))
}

/// Sorts `(index, string)` items within a memory budget (see the module docs).
#[derive(Debug)]
pub struct ExternalSorter {
    name: &'static str,
    budget: usize,
    buffer: Vec<(u32, String)>,
    bytes: usize,
    runs: Vec<PathBuf>,
}

impl ExternalSorter {
    /// A sorter whose run files are named `<name>-<n>.run`; `budget` bytes of strings
    /// are kept in memory (`usize::MAX`: never spill).
    pub fn new(name: &'static str, budget: usize) -> Self {
        Self {
            name,
            budget,
            buffer: Vec::new(),
            bytes: 0,
            runs: Vec::new(),
        }
    }

    pub fn push(
        &mut self,
        index: u32,
        string: String,
        dir: &mut SpillDir,
    ) -> Result<(), PrepareError> {
        self.bytes += string.len() + ITEM_OVERHEAD;
        self.buffer.push((index, string));
        if self.bytes >= self.budget {
            self.spill(dir)?;
        }
        Ok(())
    }

    /// Runs written so far.
    #[cfg(test)]
    fn runs(&self) -> usize {
        self.runs.len()
    }

    fn spill(&mut self, dir: &mut SpillDir) -> Result<(), PrepareError> {
        self.buffer.sort_unstable_by(order);
        let (path, file) = dir.create(&format!("{}-{}.run", self.name, self.runs.len()))?;
        let mut out = BufWriter::new(file);
        for (index, string) in self.buffer.drain(..) {
            out.write_all(&index.to_le_bytes())
                .map_err(|e| spill_error(&path, e))?;
            write_string(&mut out, &path, &string)?;
        }
        out.flush().map_err(|e| spill_error(&path, e))?;
        self.bytes = 0;
        self.runs.push(path);
        Ok(())
    }

    /// Every item pushed, in order.
    pub fn into_sorted(mut self, dir: &mut SpillDir) -> Result<Sorted, PrepareError> {
        if self.runs.is_empty() {
            self.buffer.sort_unstable_by(order);
            return Ok(Sorted::Memory(self.buffer.into_iter()));
        }
        if !self.buffer.is_empty() {
            self.spill(dir)?;
        }
        let mut merge = Merge {
            readers: Vec::new(),
            heap: BinaryHeap::new(),
        };
        for (run, path) in self.runs.into_iter().enumerate() {
            let file = File::open(&path).map_err(|e| spill_error(&path, e))?;
            merge.readers.push((path, BufReader::new(file)));
            merge.refill(run)?;
        }
        Ok(Sorted::Merge(merge))
    }
}

/// The items of an [`ExternalSorter`], in order.
pub enum Sorted {
    Memory(std::vec::IntoIter<(u32, String)>),
    Merge(Merge),
}

impl Iterator for Sorted {
    type Item = Result<(u32, String), PrepareError>;

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Sorted::Memory(items) => items.next().map(Ok),
            Sorted::Merge(merge) => merge.next(),
        }
    }
}

/// A k-way merge of sorted runs: the heap holds each run's next item.
pub struct Merge {
    readers: Vec<(PathBuf, BufReader<File>)>,
    heap: BinaryHeap<Head>,
}

struct Head {
    item: (u32, String),
    run: usize,
}

impl PartialEq for Head {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Head {}
impl PartialOrd for Head {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Head {
    /// Reversed: `BinaryHeap` pops the largest, the merge wants the smallest.
    fn cmp(&self, other: &Self) -> Ordering {
        order(&other.item, &self.item)
    }
}

impl Merge {
    /// Reads run `run`'s next item onto the heap (nothing at its end).
    fn refill(&mut self, run: usize) -> Result<(), PrepareError> {
        let (path, reader) = &mut self.readers[run];
        let mut index = [0u8; 4];
        match reader.read_exact(&mut index) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(spill_error(path, e)),
        }
        let index = u32::from_le_bytes(index);
        let string = read_string(reader, path)?;
        self.heap.push(Head {
            item: (index, string),
            run,
        });
        Ok(())
    }

    fn next(&mut self) -> Option<Result<(u32, String), PrepareError>> {
        let Head { item, run } = self.heap.pop()?;
        if let Err(e) = self.refill(run) {
            return Some(Err(e));
        }
        Some(Ok(item))
    }
}

/// The titles and texts of the passages kept for preparation, in push order, within a
/// memory budget (see the module docs).
#[derive(Debug)]
pub struct TextSpill {
    budget: usize,
    buffer: Vec<(String, String)>,
    bytes: usize,
    file: Option<(PathBuf, BufWriter<File>)>,
    spilled: usize,
}

impl TextSpill {
    pub fn new(budget: usize) -> Self {
        Self {
            budget,
            buffer: Vec::new(),
            bytes: 0,
            file: None,
            spilled: 0,
        }
    }

    pub fn push(
        &mut self,
        title: String,
        text: String,
        dir: &mut SpillDir,
    ) -> Result<(), PrepareError> {
        self.bytes += title.len() + text.len() + 2 * ITEM_OVERHEAD;
        self.buffer.push((title, text));
        if self.bytes >= self.budget {
            self.spill(dir)?;
        }
        Ok(())
    }

    fn spill(&mut self, dir: &mut SpillDir) -> Result<(), PrepareError> {
        if self.file.is_none() {
            let (path, file) = dir.create("texts.bin")?;
            self.file = Some((path, BufWriter::new(file)));
        }
        let Some((path, out)) = self.file.as_mut() else {
            return Ok(());
        };
        for (title, text) in self.buffer.drain(..) {
            write_string(out, path, &title)?;
            write_string(out, path, &text)?;
            self.spilled += 1;
        }
        self.bytes = 0;
        Ok(())
    }

    /// Every `(title, text)` pushed, in push order.
    pub fn read_back(
        self,
    ) -> Result<impl Iterator<Item = Result<(String, String), PrepareError>>, PrepareError> {
        let from_file = match self.file {
            Some((path, out)) => {
                let file = out
                    .into_inner()
                    .map_err(|e| spill_error(&path, e.into_error()))?;
                drop(file);
                let file = File::open(&path).map_err(|e| spill_error(&path, e))?;
                Some((path, BufReader::new(file), self.spilled))
            }
            None => None,
        };
        let file_items = from_file.into_iter().flat_map(|(path, mut reader, count)| {
            (0..count).map(move |_| {
                let title = read_string(&mut reader, &path)?;
                Ok((title, read_string(&mut reader, &path)?))
            })
        });
        Ok(file_items.chain(self.buffer.into_iter().map(Ok)))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is its job
mod tests {
    use super::*;

    fn items() -> Vec<(u32, String)> {
        // Equal strings, prefixes, non-ASCII, and an empty-ish spread of lengths.
        let words = [
            "kiwi",
            "apple",
            "kiwi",
            "é",
            "apple pie",
            "zebra",
            "kiwi",
            "a",
        ];
        (0..200u32)
            .map(|i| {
                (
                    i,
                    words[(i as usize * 7) % words.len()].repeat(1 + i as usize % 3),
                )
            })
            .collect()
    }

    fn sorted_in_memory(mut items: Vec<(u32, String)>) -> Vec<(u32, String)> {
        items.sort_by(order);
        items
    }

    #[test]
    fn runs_on_disk_merge_to_the_in_memory_order() {
        let tmp = tempfile::tempdir().unwrap();
        let mut dir = SpillDir::new(tmp.path().join(".prepare.tmp"));
        // A budget of ~3 items a run: dozens of runs.
        let mut sorter = ExternalSorter::new("forward", 100);
        for (i, s) in items() {
            sorter.push(i, s, &mut dir).unwrap();
        }
        assert!(sorter.runs() > 20, "{} runs", sorter.runs());
        let merged: Vec<_> = sorter
            .into_sorted(&mut dir)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(merged, sorted_in_memory(items()));
        // Equal strings come larger index first.
        let kiwis: Vec<u32> = merged
            .iter()
            .filter(|(_, s)| s == "kiwi")
            .map(|(i, _)| *i)
            .collect();
        assert!(kiwis.windows(2).all(|w| w[0] > w[1]), "{kiwis:?}");
        drop(dir);
        assert!(!tmp.path().join(".prepare.tmp").exists());
    }

    #[test]
    fn a_sorter_under_its_budget_never_touches_the_disk() {
        let tmp = tempfile::tempdir().unwrap();
        let mut dir = SpillDir::new(tmp.path().join(".prepare.tmp"));
        let mut sorter = ExternalSorter::new("forward", usize::MAX);
        for (i, s) in items() {
            sorter.push(i, s, &mut dir).unwrap();
        }
        let sorted: Vec<_> = sorter
            .into_sorted(&mut dir)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(sorted, sorted_in_memory(items()));
        assert!(!tmp.path().join(".prepare.tmp").exists());
    }

    #[test]
    fn texts_come_back_in_push_order_across_the_file_and_the_buffer() {
        let tmp = tempfile::tempdir().unwrap();
        let mut dir = SpillDir::new(tmp.path().join(".prepare.tmp"));
        let mut texts = TextSpill::new(200);
        let pairs: Vec<(String, String)> = (0..50)
            .map(|i| (format!("title {i}"), format!("text ünï {i} ").repeat(i % 4)))
            .collect();
        for (title, text) in pairs.clone() {
            texts.push(title, text, &mut dir).unwrap();
        }
        assert!(tmp.path().join(".prepare.tmp/texts.bin").exists());
        let back: Vec<_> = texts
            .read_back()
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(back, pairs);
    }
}
