//! Line-at-a-time reading of text files as bytes, so that invalid UTF-8 is reported on
//! the line that holds it instead of failing the whole file.
//!
//! Lines end with `\n`; a `\r` before it is dropped, as is a UTF-8 byte-order mark at the
//! start of the file. Memory is bounded by [`MAX_LINE_BYTES`]: a longer line is
//! returned as [`Line::TooLong`] with only its first bytes, and the rest is skipped.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use super::CorpusError;

/// The longest line read whole. The longest passage of the BEIR corpora is well under a
/// megabyte; 64 MiB leaves room for any real record while a newline-free binary file
/// read by mistake cannot exhaust memory.
pub const MAX_LINE_BYTES: usize = 64 << 20;

/// How many bytes of an over-long line are kept, for the quarantine.
const TOO_LONG_PREFIX_BYTES: usize = 4096;

/// The read buffer. Large sequential reads; 256 KiB amortises system calls well.
const READ_BUFFER_BYTES: usize = 256 << 10;

/// One line of the file (1-based number), without its line ending.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Line {
    /// A whole line.
    Text { number: u64, bytes: Vec<u8> },
    /// A line over [`MAX_LINE_BYTES`]: only its first bytes.
    TooLong { number: u64, prefix: Vec<u8> },
}

/// Reads a file line by line as bytes.
pub(crate) struct ByteLines<R = File> {
    reader: BufReader<R>,
    path: PathBuf,
    number: u64,
}

impl ByteLines<File> {
    /// Opens `path`; a missing or unreadable file is an error naming it.
    pub(crate) fn open(path: &Path) -> Result<Self, CorpusError> {
        let file = File::open(path).map_err(|source| CorpusError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self::new(file, path))
    }
}

impl<R: Read> ByteLines<R> {
    pub(crate) fn new(reader: R, path: &Path) -> Self {
        ByteLines {
            reader: BufReader::with_capacity(READ_BUFFER_BYTES, reader),
            path: path.to_path_buf(),
            number: 0,
        }
    }

    /// The file being read.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The next line, or `None` at the end of the file.
    pub(crate) fn next_line(&mut self) -> Result<Option<Line>, CorpusError> {
        self.read_line().map_err(|source| CorpusError::Io {
            path: self.path.clone(),
            source,
        })
    }

    fn read_line(&mut self) -> io::Result<Option<Line>> {
        let mut bytes = Vec::new();
        let limit = MAX_LINE_BYTES as u64 + 1;
        let n = (&mut self.reader)
            .take(limit)
            .read_until(b'\n', &mut bytes)?;
        if n == 0 {
            return Ok(None);
        }
        self.number += 1;
        let number = self.number;
        let ended = bytes.last() == Some(&b'\n');
        if !ended && bytes.len() > MAX_LINE_BYTES {
            self.skip_rest_of_line()?;
            bytes.truncate(TOO_LONG_PREFIX_BYTES);
            return Ok(Some(Line::TooLong {
                number,
                prefix: bytes,
            }));
        }
        if ended {
            bytes.pop();
            if bytes.last() == Some(&b'\r') {
                bytes.pop();
            }
        }
        if number == 1 && bytes.starts_with(b"\xEF\xBB\xBF") {
            bytes.drain(..3);
        }
        Ok(Some(Line::Text { number, bytes }))
    }

    fn skip_rest_of_line(&mut self) -> io::Result<()> {
        loop {
            let buf = self.reader.fill_buf()?;
            if buf.is_empty() {
                return Ok(());
            }
            if let Some(pos) = buf.iter().position(|&b| b == b'\n') {
                self.reader.consume(pos + 1);
                return Ok(());
            }
            let len = buf.len();
            self.reader.consume(len);
        }
    }
}

/// True for a line that holds no record: empty or only ASCII whitespace.
pub(crate) fn is_blank(bytes: &[u8]) -> bool {
    bytes.iter().all(u8::is_ascii_whitespace)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is its job
mod tests {
    use super::*;

    fn lines(input: &[u8]) -> Vec<Line> {
        let mut reader = ByteLines::new(input, Path::new("t"));
        let mut out = Vec::new();
        while let Some(line) = reader.next_line().unwrap() {
            out.push(line);
        }
        out
    }

    fn text(number: u64, bytes: &[u8]) -> Line {
        Line::Text {
            number,
            bytes: bytes.to_vec(),
        }
    }

    #[test]
    fn splits_crlf_lf_and_unterminated_last_line() {
        assert_eq!(
            lines(b"a\r\nb\n\nc"),
            vec![text(1, b"a"), text(2, b"b"), text(3, b""), text(4, b"c")]
        );
        assert_eq!(lines(b""), vec![]);
    }

    #[test]
    fn drops_a_leading_byte_order_mark_only_on_line_one() {
        assert_eq!(
            lines(b"\xEF\xBB\xBFx\n\xEF\xBB\xBFy\n"),
            vec![text(1, b"x"), text(2, b"\xEF\xBB\xBFy")]
        );
    }

    #[test]
    fn keeps_invalid_utf8_bytes_for_the_caller() {
        assert_eq!(
            lines(b"ok\n\xff\xfe\n"),
            vec![text(1, b"ok"), text(2, b"\xff\xfe")]
        );
    }

    #[test]
    fn an_over_long_line_is_cut_and_the_next_line_still_read() {
        let mut input = vec![b'x'; MAX_LINE_BYTES + 10];
        input.extend_from_slice(b"\nnext\n");
        let got = lines(&input);
        assert_eq!(got.len(), 2);
        match &got[0] {
            Line::TooLong { number, prefix } => {
                assert_eq!(*number, 1);
                assert_eq!(prefix.len(), TOO_LONG_PREFIX_BYTES);
            }
            other => panic!("expected TooLong, got {other:?}"),
        }
        assert_eq!(got[1], text(2, b"next"));
    }

    #[test]
    fn blank_lines() {
        assert!(is_blank(b""));
        assert!(is_blank(b" \t "));
        assert!(!is_blank(b" x"));
    }

    #[test]
    fn missing_file_names_the_path() {
        let err = match ByteLines::open(Path::new("/no/such/corpus.jsonl")) {
            Err(e) => e,
            Ok(_) => panic!("opened a missing file"),
        };
        assert!(err.to_string().contains("/no/such/corpus.jsonl"), "{err}");
    }
}
