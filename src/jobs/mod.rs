//! The CLI's standalone commands, as library functions: `embed`, `score` and `eval`
//! each take one resolved settings struct, run their stages through the dataflow and the
//! store, and return what they measured. The recipe's commands (`generate`, `mine`,
//! `label`, `train`, `run`) are the driver's ([`crate::driver`]).

pub mod embed;
pub mod eval;
pub mod score;
