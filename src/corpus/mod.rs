//! Corpus and dataset readers (being written).
