//! The training losses of RECIPE.md section 5, as differentiable candle ops: listwise
//! distillation (KL from the teacher's distribution over a query's list to the student's)
//! plus InfoNCE over the whole accumulated batch.
//!
//! # Inputs
//!
//! One accumulated batch of `Q` queries, each with a list of at most `L` passages in
//! teacher order, the first being the positive:
//!
//! - `queries: [Q, d]` and `passages: [Q, L, d]`, the student's L2-normalised embeddings
//!   (so a dot product is a cosine), in `F32` or `F64`. The loss is differentiable with
//!   respect to both. A list shorter than `L` is padded; padding slots must hold finite
//!   values (zeros): they never change the loss, but a non-finite value in **any** slot,
//!   padding included, makes the loss non-finite, so bad embeddings are never hidden.
//! - [`TeacherLists`]: per query, the interned passage ids and normalised teacher scores of
//!   its list, validated on [`TeacherLists::push`].
//!
//! # The losses
//!
//! - **Listwise KL.** For query `i`, over the valid entries of its list: student logits
//!   `cos(q_i, p_ij) / student_temperature`, teacher logits `t_ij / teacher_temperature`,
//!   `KL_i = sum_j P_ij (log P_ij - log S_ij)` with `P`, `S` their softmaxes. The term is
//!   the mean of `KL_i` over queries: PyTorch's `F.kl_div(log_softmax(student),
//!   softmax(teacher), reduction="batchmean")` with one row per query.
//! - **InfoNCE.** For query `i`, logits `cos(q_i, c) / infonce_temperature` over a candidate
//!   set, cross-entropy with `i`'s own positive as the target, mean over queries. The
//!   candidates are every distinct passage of the batch (all queries' positives and hard
//!   negatives), each counted once: a passage id that occurs in several lists enters the
//!   softmax at its first valid occurrence in batch order (query-major, then list
//!   position). Copies of one passage have equal embeddings, so the choice of copy only
//!   decides which row receives the gradient. Then, for query `i`:
//!   - the target is `i`'s own first entry, even when its passage occurs earlier in the
//!     batch; every other occurrence of that passage is dropped (a copy of the positive);
//!   - a passage is a false negative of `i` when it is in `i`'s list (not first) with
//!     `t_ij > false_negative_ratio * t_i0` (compared in f64); it is dropped from `i`'s
//!     candidates wherever in the batch it occurs. Teacher scores of other queries' lists
//!     say nothing about `i`, so no other passage is dropped.
//! - **Total** by [`LossMode`]: `KL + infonce_weight * InfoNCE` (the recipe), `KL` alone,
//!   or `InfoNCE` alone with weight 1 (the contrastive-only baseline, where a weight would
//!   only rescale the learning rate).
//!
//! # Numerics
//!
//! Every softmax is a log-softmax with the row maximum subtracted (the maximum is detached:
//! a shift leaves the log-softmax and its gradient unchanged). Excluded entries get
//! [`MASKED_LOGIT`] added to their logit, never written over it, so NaN is never created
//! and never hidden. The InfoNCE logits are one dense `[Q, Q * L]` matrix; at the recipe's
//! batch (4,096 x 81,920) that is 1.3 GB per copy in `F32`, a few copies with the backward
//! pass.

use std::collections::{BTreeMap, HashMap, HashSet};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

/// The logit offset of an entry that must not take part in a softmax. Added, so a NaN or
/// infinity in the slot still reaches the loss. `exp(-1e9)` is exactly 0 in `F32` and
/// `F64`, whatever the other logits (at most `1 / temperature` in magnitude), and 1e9 is
/// exactly representable in both, so adding it back restores an exact 0 offset.
pub const MASKED_LOGIT: f64 = -1e9;

/// The recipe's student temperature: cosines in `[-1, 1]` become logits in `[-20, 20]`.
pub const DEFAULT_STUDENT_TEMPERATURE: f64 = 0.05;
/// The recipe's teacher temperature over normalised scores in `[0, 1]`.
pub const DEFAULT_TEACHER_TEMPERATURE: f64 = 0.3;
/// The recipe's InfoNCE temperature.
pub const DEFAULT_INFONCE_TEMPERATURE: f64 = 0.01;
/// The recipe's weight of InfoNCE next to the KL term.
pub const DEFAULT_INFONCE_WEIGHT: f64 = 0.1;
/// The recipe's false-negative threshold, as a fraction of the query's top teacher score.
pub const DEFAULT_FALSE_NEGATIVE_RATIO: f64 = 0.6;

/// Which terms make up the total loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossMode {
    /// `KL + infonce_weight * InfoNCE`, the recipe.
    #[default]
    ListwiseInfonce,
    /// Listwise KL alone.
    Listwise,
    /// InfoNCE alone, with weight 1 (`infonce_weight` is not used).
    Infonce,
}

/// The loss settings; every default is the recipe's.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LossConfig {
    /// Which terms make up the total.
    pub mode: LossMode,
    /// Divides the student's cosines in the listwise term.
    pub student_temperature: f64,
    /// Divides the normalised teacher scores in the listwise term.
    pub teacher_temperature: f64,
    /// Divides the cosines in the InfoNCE term.
    pub infonce_temperature: f64,
    /// The weight of InfoNCE in [`LossMode::ListwiseInfonce`].
    pub infonce_weight: f64,
    /// A hard negative scored above this fraction of the query's top score is a false
    /// negative, left out of the query's InfoNCE candidates.
    pub false_negative_ratio: f64,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self {
            mode: LossMode::default(),
            student_temperature: DEFAULT_STUDENT_TEMPERATURE,
            teacher_temperature: DEFAULT_TEACHER_TEMPERATURE,
            infonce_temperature: DEFAULT_INFONCE_TEMPERATURE,
            infonce_weight: DEFAULT_INFONCE_WEIGHT,
            false_negative_ratio: DEFAULT_FALSE_NEGATIVE_RATIO,
        }
    }
}

impl LossConfig {
    /// Checks that temperatures are finite and positive, and the weight and ratio finite
    /// and non-negative.
    pub fn validate(&self) -> Result<(), LossError> {
        let checks = [
            ("student_temperature", self.student_temperature, true),
            ("teacher_temperature", self.teacher_temperature, true),
            ("infonce_temperature", self.infonce_temperature, true),
            ("infonce_weight", self.infonce_weight, false),
            ("false_negative_ratio", self.false_negative_ratio, false),
        ];
        for (field, value, positive) in checks {
            let ok = value.is_finite() && if positive { value > 0.0 } else { value >= 0.0 };
            if !ok {
                return Err(LossError::BadConfig { field, value });
            }
        }
        Ok(())
    }
}

/// Why a loss could not be computed.
#[derive(Debug, thiserror::Error)]
pub enum LossError {
    /// A setting is out of range.
    #[error("loss setting {field} = {value} is out of range")]
    BadConfig { field: &'static str, value: f64 },
    /// A list has no entries (it needs at least its positive).
    #[error("query {query}: empty list")]
    EmptyList { query: usize },
    /// A list is longer than the batch's list length.
    #[error("query {query}: list of {len} entries, the batch holds at most {list_len}")]
    ListTooLong {
        query: usize,
        len: usize,
        list_len: usize,
    },
    /// A list has a different number of passage ids and scores.
    #[error("query {query}: {ids} passage ids but {scores} scores")]
    LengthMismatch {
        query: usize,
        ids: usize,
        scores: usize,
    },
    /// A teacher score is NaN or infinite.
    #[error("query {query}, entry {entry}: teacher score {score} is not finite")]
    NonFiniteScore {
        query: usize,
        entry: usize,
        score: f32,
    },
    /// A later entry outscores the first, which must be the positive and the largest.
    #[error("query {query}: entry {entry} scores {score}, above the positive's {top}")]
    PositiveNotTop {
        query: usize,
        entry: usize,
        score: f32,
        top: f32,
    },
    /// A passage occurs twice in one list.
    #[error("query {query}: passage id {passage} occurs twice in the list")]
    DuplicateInList { query: usize, passage: u32 },
    /// The embeddings' shapes disagree with each other or with the lists.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// Embeddings in a dtype the loss does not support (only `F32` and `F64`: the masked
    /// logit overflows half precision).
    #[error("embeddings in {0:?}: the loss needs F32 or F64")]
    UnsupportedDType(DType),
    /// A tensor operation failed.
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

/// The teacher side of one batch: per query, the passage ids (interned by the caller:
/// equal ids are the same passage) and normalised teacher scores of its list, in teacher
/// order, padded to a fixed list length.
#[derive(Debug, Clone)]
pub struct TeacherLists {
    list_len: usize,
    /// `num_queries * list_len`; padding slots hold 0 and are never read.
    passage_ids: Vec<u32>,
    /// `num_queries * list_len`; padding slots hold 0 and are never read.
    scores: Vec<f32>,
    lens: Vec<usize>,
}

impl TeacherLists {
    /// An empty batch whose lists hold at most `list_len` entries.
    pub fn new(list_len: usize) -> Self {
        Self {
            list_len,
            passage_ids: Vec::new(),
            scores: Vec::new(),
            lens: Vec::new(),
        }
    }

    /// Appends one query's list: between 1 and `list_len` entries, distinct ids, finite
    /// scores, the first score not below any other. Nothing is appended on error.
    pub fn push(&mut self, passage_ids: &[u32], scores: &[f32]) -> Result<(), LossError> {
        let query = self.lens.len();
        let len = passage_ids.len();
        if len != scores.len() {
            return Err(LossError::LengthMismatch {
                query,
                ids: len,
                scores: scores.len(),
            });
        }
        let Some(&top) = scores.first() else {
            return Err(LossError::EmptyList { query });
        };
        if len > self.list_len {
            return Err(LossError::ListTooLong {
                query,
                len,
                list_len: self.list_len,
            });
        }
        for (entry, &score) in scores.iter().enumerate() {
            if !score.is_finite() {
                return Err(LossError::NonFiniteScore {
                    query,
                    entry,
                    score,
                });
            }
            if score > top {
                return Err(LossError::PositiveNotTop {
                    query,
                    entry,
                    score,
                    top,
                });
            }
        }
        let mut seen = HashSet::with_capacity(len);
        if let Some(&passage) = passage_ids.iter().find(|&&id| !seen.insert(id)) {
            return Err(LossError::DuplicateInList { query, passage });
        }
        let padding = self.list_len - len;
        self.passage_ids.extend_from_slice(passage_ids);
        self.passage_ids.extend(std::iter::repeat_n(0, padding));
        self.scores.extend_from_slice(scores);
        self.scores.extend(std::iter::repeat_n(0.0, padding));
        self.lens.push(len);
        Ok(())
    }

    /// How many lists (queries) the batch holds.
    pub fn num_queries(&self) -> usize {
        self.lens.len()
    }

    /// The padded list length `L`.
    pub fn list_len(&self) -> usize {
        self.list_len
    }

    /// The number of valid entries of each list.
    pub fn lens(&self) -> &[usize] {
        &self.lens
    }

    fn is_valid(&self, flat: usize) -> bool {
        flat % self.list_len < self.lens[flat / self.list_len]
    }
}

/// The loss terms of one batch, each a scalar (rank 0) tensor in the embeddings' dtype.
#[derive(Debug, Clone)]
pub struct LossTerms {
    /// The loss to back-propagate, as [`LossMode`] defines it.
    pub total: Tensor,
    /// The listwise KL term; absent in [`LossMode::Infonce`].
    pub kl: Option<Tensor>,
    /// The (unweighted) InfoNCE term; absent in [`LossMode::Listwise`].
    pub infonce: Option<Tensor>,
}

/// Computes the losses of one batch (see the module docs for the definitions and the
/// contract on `queries: [Q, d]` and `passages: [Q, L, d]`).
pub fn distillation_loss(
    config: &LossConfig,
    queries: &Tensor,
    passages: &Tensor,
    lists: &TeacherLists,
) -> Result<LossTerms, LossError> {
    config.validate()?;
    check_inputs(queries, passages, lists)?;
    Ok(match config.mode {
        LossMode::ListwiseInfonce => {
            let kl = listwise_kl(config, queries, passages, lists)?;
            let nce = infonce(config, queries, passages, lists)?;
            LossTerms {
                total: (&kl + nce.affine(config.infonce_weight, 0.0)?)?,
                kl: Some(kl),
                infonce: Some(nce),
            }
        }
        LossMode::Listwise => {
            let kl = listwise_kl(config, queries, passages, lists)?;
            LossTerms {
                total: kl.clone(),
                kl: Some(kl),
                infonce: None,
            }
        }
        LossMode::Infonce => {
            let nce = infonce(config, queries, passages, lists)?;
            LossTerms {
                total: nce.clone(),
                kl: None,
                infonce: Some(nce),
            }
        }
    })
}

fn check_inputs(
    queries: &Tensor,
    passages: &Tensor,
    lists: &TeacherLists,
) -> Result<(), LossError> {
    for dtype in [queries.dtype(), passages.dtype()] {
        if !matches!(dtype, DType::F32 | DType::F64) {
            return Err(LossError::UnsupportedDType(dtype));
        }
    }
    let (q, l) = (lists.num_queries(), lists.list_len());
    let expected = match queries.dims() {
        &[nq, d] if nq == q && q > 0 && l > 0 => d,
        dims => {
            return Err(LossError::Shape(format!(
                "queries {dims:?}, expected [{q}, d] with {q} lists of length {l} (both > 0)"
            )))
        }
    };
    if passages.dims() != [q, l, expected] || passages.dtype() != queries.dtype() {
        return Err(LossError::Shape(format!(
            "passages {:?} {:?}, expected [{q}, {l}, {expected}] {:?}",
            passages.dims(),
            passages.dtype(),
            queries.dtype()
        )));
    }
    if q.checked_mul(q * l).is_none_or(|n| n > u32::MAX as usize) {
        return Err(LossError::Shape(format!(
            "{q} queries x {} candidates do not fit u32 indexing",
            q * l
        )));
    }
    Ok(())
}

/// `log_softmax` over dim 1 of a rank-2 tensor, with the (detached) row maximum subtracted.
fn log_softmax_rows(logits: &Tensor) -> candle_core::Result<Tensor> {
    let shifted = logits.broadcast_sub(&logits.max_keepdim(1)?.detach())?;
    shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(1)?.log()?)
}

/// A host vector as a tensor of `dtype` on `device`.
fn constant(
    values: Vec<f64>,
    shape: (usize, usize),
    dtype: DType,
    device: &Device,
) -> candle_core::Result<Tensor> {
    Tensor::from_vec(values, shape, device)?.to_dtype(dtype)
}

fn listwise_kl(
    config: &LossConfig,
    queries: &Tensor,
    passages: &Tensor,
    lists: &TeacherLists,
) -> Result<Tensor, LossError> {
    let (q, l) = (lists.num_queries(), lists.list_len());
    let mut bias = vec![MASKED_LOGIT; q * l];
    let mut prob = vec![0.0; q * l];
    let mut log_prob = vec![0.0; q * l];
    for (i, &len) in lists.lens().iter().enumerate() {
        let row = i * l..i * l + len;
        // Scores were checked finite and the first is the largest: a stable log-softmax.
        let top = f64::from(lists.scores[i * l]);
        let logit = |k: usize| (f64::from(lists.scores[k]) - top) / config.teacher_temperature;
        let log_norm = row.clone().map(|k| logit(k).exp()).sum::<f64>().ln();
        for k in row {
            bias[k] = 0.0;
            log_prob[k] = logit(k) - log_norm;
            prob[k] = log_prob[k].exp();
        }
    }
    let (dtype, device) = (queries.dtype(), queries.device());
    let cosines = passages.broadcast_mul(&queries.unsqueeze(1)?)?.sum(2)?;
    let logits = (cosines.affine(1.0 / config.student_temperature, 0.0)?
        + constant(bias, (q, l), dtype, device)?)?;
    let student = log_softmax_rows(&logits)?;
    // Padding has prob 0 and log_prob 0 against a finite student log-probability: a 0 term.
    let terms = ((constant(log_prob, (q, l), dtype, device)? - student)?
        * constant(prob, (q, l), dtype, device)?)?;
    Ok(terms.sum_all()?.affine(1.0 / q as f64, 0.0)?)
}

/// The additive mask of the InfoNCE logits, `[Q, Q * L]`, as a per-candidate base (valid
/// first occurrences open) plus per-query corrections, so the host never builds the dense
/// matrix.
struct InfonceMask {
    column: Vec<f64>,
    /// Flat indices into `[Q * Q * L]` and the offsets to add there.
    fix_at: Vec<u32>,
    fix_by: Vec<f64>,
}

impl InfonceMask {
    fn new(config: &LossConfig, lists: &TeacherLists) -> Self {
        let (q, l) = (lists.num_queries(), lists.list_len());
        let n = q * l;
        let mut first: HashMap<u32, usize> = HashMap::new();
        for k in (0..n).filter(|&k| lists.is_valid(k)) {
            first.entry(lists.passage_ids[k]).or_insert(k);
        }
        let column: Vec<f64> = (0..n)
            .map(|k| {
                let open = lists.is_valid(k) && first.get(&lists.passage_ids[k]) == Some(&k);
                if open {
                    0.0
                } else {
                    MASKED_LOGIT
                }
            })
            .collect();
        let (mut fix_at, mut fix_by) = (Vec::new(), Vec::new());
        for (i, &len) in lists.lens().iter().enumerate() {
            let target = i * l;
            let top = f64::from(lists.scores[target]);
            let threshold = config.false_negative_ratio * top;
            // Passages dropped for query i: its positive's copies and its false negatives;
            // only their first occurrences are open in `column`.
            let mut wanted: BTreeMap<usize, f64> = BTreeMap::new();
            let false_negatives =
                (target + 1..target + len).filter(|&k| f64::from(lists.scores[k]) > threshold);
            for k in std::iter::once(target).chain(false_negatives) {
                if let Some(&at) = first.get(&lists.passage_ids[k]) {
                    wanted.insert(at, MASKED_LOGIT);
                }
            }
            wanted.insert(target, 0.0);
            for (k, value) in wanted {
                if value != column[k] {
                    // Bounded by u32::MAX in check_inputs.
                    fix_at.push((i * n + k) as u32);
                    fix_by.push(value - column[k]);
                }
            }
        }
        Self {
            column,
            fix_at,
            fix_by,
        }
    }

    fn tensor(self, q: usize, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        let n = self.column.len();
        let dense = constant(self.column, (1, n), dtype, device)?
            .broadcast_as((q, n))?
            .contiguous()?
            .flatten_all()?;
        if self.fix_at.is_empty() {
            return dense.reshape((q, n));
        }
        let m = self.fix_at.len();
        let at = Tensor::from_vec(self.fix_at, m, device)?;
        let by = Tensor::from_vec(self.fix_by, m, device)?.to_dtype(dtype)?;
        dense.index_add(&at, &by, 0)?.reshape((q, n))
    }
}

fn infonce(
    config: &LossConfig,
    queries: &Tensor,
    passages: &Tensor,
    lists: &TeacherLists,
) -> Result<Tensor, LossError> {
    let (q, l) = (lists.num_queries(), lists.list_len());
    let (dtype, device) = (queries.dtype(), queries.device());
    let candidates = passages.reshape((q * l, passages.dim(2)?))?;
    let bias = InfonceMask::new(config, lists).tensor(q, dtype, device)?;
    let logits = (queries
        .matmul(&candidates.t()?)?
        .affine(1.0 / config.infonce_temperature, 0.0)?
        + bias)?;
    let targets: Vec<u32> = (0..q).map(|i| (i * l) as u32).collect();
    let target_logits = logits.gather(&Tensor::from_vec(targets, (q, 1), device)?, 1)?;
    let max = logits.max_keepdim(1)?.detach();
    let log_norm = (logits.broadcast_sub(&max)?.exp()?.sum_keepdim(1)?.log()? + max)?;
    Ok((log_norm - target_logits)?.mean_all()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open_columns(config: &LossConfig, lists: &TeacherLists) -> Vec<Vec<usize>> {
        let q = lists.num_queries();
        let mask = InfonceMask::new(config, lists).tensor(q, DType::F64, &Device::Cpu);
        let rows = mask.unwrap().to_vec2::<f64>().unwrap();
        let open = |row: &Vec<f64>| (0..row.len()).filter(|&k| row[k] == 0.0).collect();
        rows.iter().map(open).collect()
    }

    #[test]
    fn infonce_opens_each_passage_once_per_query() {
        // Flat entries 0..6: query 0 = [A, C, B], query 1 = [C, A, D]: 0.7 > 0.6 makes C a
        // false negative of query 0 and A one of query 1; entry 5 is padding.
        let mut lists = TeacherLists::new(3);
        lists.push(&[1, 3, 2], &[1.0, 0.7, 0.2]).unwrap();
        lists.push(&[3, 1], &[1.0, 0.7]).unwrap();
        let open = open_columns(&LossConfig::default(), &lists);
        // Query 0: its A, B; not C (at 1 or 3). Query 1: its own C at 3, B; not A, not the
        // earlier C at 1.
        assert_eq!(open, vec![vec![0, 2], vec![2, 3]]);
        // Without false negatives, query 0 sees A, C, B; query 1 its C, A, B.
        let lenient = LossConfig {
            false_negative_ratio: 0.8,
            ..LossConfig::default()
        };
        assert_eq!(
            open_columns(&lenient, &lists),
            vec![vec![0, 1, 2], vec![0, 2, 3]]
        );
    }

    #[test]
    fn push_rejects_bad_lists_and_keeps_the_batch() {
        let mut lists = TeacherLists::new(3);
        let err = |r: Result<(), LossError>| r.unwrap_err().to_string();
        assert!(err(lists.push(&[], &[])).contains("empty list"));
        assert!(err(lists.push(&[1, 2, 3, 4], &[1.0; 4])).contains("at most 3"));
        assert!(err(lists.push(&[1, 2], &[1.0])).contains("2 passage ids but 1 scores"));
        assert!(err(lists.push(&[1, 2], &[1.0, f32::NAN])).contains("not finite"));
        assert!(err(lists.push(&[1, 2], &[0.5, 0.9])).contains("above the positive"));
        assert!(err(lists.push(&[1, 2, 1], &[1.0, 0.5, 0.2])).contains("id 1 occurs twice"));
        assert_eq!(lists.num_queries(), 0);
        lists.push(&[7, 8], &[1.0, 1.0]).unwrap();
        assert_eq!((lists.num_queries(), lists.lens()), (1, &[2][..]));
        assert!(lists.is_valid(1) && !lists.is_valid(2));
    }

    #[test]
    fn config_defaults_are_the_recipe() {
        let config: LossConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(config, LossConfig::default());
        assert_eq!(config.mode, LossMode::ListwiseInfonce);
        let temperatures = (config.student_temperature, config.teacher_temperature);
        assert_eq!(temperatures, (0.05, 0.3));
        assert_eq!(config.infonce_temperature, 0.01);
        assert_eq!(
            (config.infonce_weight, config.false_negative_ratio),
            (0.1, 0.6)
        );
        let infonce: LossConfig = serde_json::from_str(r#"{"mode": "infonce"}"#).unwrap();
        assert_eq!(infonce.mode, LossMode::Infonce);
        assert!(serde_json::from_str::<LossConfig>(r#"{"temperature": 1}"#).is_err());
        let cold = LossConfig {
            infonce_temperature: 0.0,
            ..LossConfig::default()
        };
        assert!(cold.validate().is_err());
        let nan = LossConfig {
            infonce_weight: f64::NAN,
            ..LossConfig::default()
        };
        assert!(nan.validate().is_err());
    }
}
