//! Training the student retriever (RECIPE.md section 5).
//!
//! - [`loss`]: the listwise KL and InfoNCE losses over one accumulated batch of embeddings,
//!   as differentiable candle ops.
//! - [`gradcache`]: the full-batch gradient, micro-batch by micro-batch.
//! - [`optim`]: AdamW with checkpointable state; gradient clipping.
//! - [`schedule`]: warm-up then linear decay to a floor.
//! - [`data`]: train/dev sets, the seeded order of each epoch.
//! - [`trainer`]: the loop, dev loss, early stopping, checkpoints, export.
//! - [`report`]: the loss and learning-rate plot of a run.
//! - [`warm_start`]: the model a run of changed inputs starts from, when told to continue
//!   from the last run's.

pub mod data;
pub mod data_parallel;
pub mod gradcache;
pub mod loss;
pub mod optim;
pub mod report;
pub mod schedule;
pub mod trainer;
pub mod warm_start;
