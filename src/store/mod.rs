//! The stage store (being written).
