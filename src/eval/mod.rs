//! BEIR evaluation (being written).
