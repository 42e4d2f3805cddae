//! distillery's model-facing operators: BERT-family encoders (in candle, and a faster
//! CPU-only kernel), their sentence-transformers configuration, tokenisation and
//! token-budget batching; decoder LLMs for query generation (`llm`).
//! Everything here is synchronous and single-model; the engine (crate `distillery`)
//! owns threads, channels and the dataflow.

pub mod backend;
pub mod batcher;
pub mod bert;
pub mod cpu_bert;
pub mod cpu_path;
pub mod cross_encoder;
pub mod embedder;
pub mod error;
pub mod llm;
pub mod st_config;
pub mod student;
pub mod tiny;
pub(crate) mod vector_math;

pub use backend::Backend;
pub use batcher::{TokenBatch, TokenBudgetBatcher, TokenizedText};
pub use cpu_path::{cpu_report, CpuPath, CpuPathError, CPU_ENV};
pub use cross_encoder::{CrossEncoder, CrossEncoderOptions};
pub use embedder::{Embedder, EmbedderOptions, TextKind};
pub use error::{OperatorError, Result};
pub use st_config::{Pooling, SentenceTransformerSpec};
pub use student::{Student, StudentOptions};
