//! distillery: a streaming dataflow engine that turns a passage corpus into a fine-tuned
//! dense retriever. See ARCHITECTURE.md for a walk through the modules.

pub mod bad_record;
pub mod collective;
pub mod config;
pub mod corpus;
pub mod crash;
pub mod dataflow;
pub mod doctor;
pub mod driver;
pub mod error;
pub mod eval;
pub mod executor;
pub mod generate;
pub mod jobs;
pub mod mining;
pub mod model;
pub mod progress;
pub mod record;
pub mod retrieval;
pub mod schema;
pub mod store;
pub mod train;
