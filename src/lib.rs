//! distillery: a streaming dataflow engine that turns a passage corpus into a fine-tuned
//! dense retriever. See ARCHITECTURE.md for a walk through the modules.

pub mod corpus;
pub mod error;
pub mod eval;
pub mod record;
pub mod store;
