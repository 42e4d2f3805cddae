//! Gradient caching (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under
//! Memory Limited Setup"): the gradient of a loss over a whole accumulated batch, with
//! memory bounded by one micro-batch.
//!
//! 1. Embed every query and passage of the batch without gradients.
//! 2. Compute the loss on those embeddings (as leaf variables) and its gradient with
//!    respect to each embedding.
//! 3. Re-embed each micro-batch keeping what backward needs, back-propagate
//!    `sum(embedding * cached gradient)`, and add up the parameter gradients.
//!
//! The sum of step 3 is exactly the full-batch parameter gradient (the chain rule through
//! the embeddings), so a step is the same as one giant backward pass (tested). Steps 1
//! and 3 are the student's gradient API: its CPU training kernel on the CPU, candle's
//! autograd elsewhere (`distillery_operators::student::GradientPath`).

use std::collections::HashMap;

use candle_core::{DType, Tensor, Var};
use distillery_operators::student::{GradientPath, Gradients, Student};
use distillery_operators::TextKind;

use crate::error::EngineError;
use crate::mining::Example;
use crate::train::loss::{distillation_loss, LossConfig, TeacherLists};

/// One accumulated batch, tokenised: per query its token ids and its list's passages.
pub struct PreparedBatch {
    queries: Vec<Vec<u32>>,
    /// Per query, the token ids of its list's passages, in teacher order.
    passages: Vec<Vec<Vec<u32>>>,
    lists: TeacherLists,
}

impl PreparedBatch {
    /// A batch from token ids already made: per query its ids, and per query the ids of
    /// its list's passages in teacher order, one row per valid entry of `lists` (the same
    /// count as `lists.lens()`, query by query).
    pub fn from_tokens(
        queries: Vec<Vec<u32>>,
        passages: Vec<Vec<Vec<u32>>>,
        lists: TeacherLists,
    ) -> Result<Self, EngineError> {
        let lens: Vec<usize> = passages.iter().map(Vec::len).collect();
        if queries.len() != lists.num_queries() || lens != lists.lens() {
            return Err(EngineError::Invalid(format!(
                "{} queries with passage lists of {lens:?}, but teacher lists of {:?}",
                queries.len(),
                lists.lens()
            )));
        }
        Ok(Self {
            queries,
            passages,
            lists,
        })
    }

    pub fn len(&self) -> usize {
        self.queries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queries.is_empty()
    }
}

/// Loss values of a batch, as plain numbers for the log.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LossValues {
    pub total: f64,
    pub kl: Option<f64>,
    pub infonce: Option<f64>,
}

fn scalar(t: &Tensor) -> Result<f64, EngineError> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// Tokenises `examples` for the student. `texts` maps passage ids to their text;
/// `intern` gives each passage id a number shared across the batch.
pub fn prepare(
    student: &Student,
    examples: &[&Example],
    texts: &HashMap<String, String>,
    intern: &HashMap<String, u32>,
    list_len: usize,
) -> Result<PreparedBatch, EngineError> {
    let qtexts: Vec<&str> = examples.iter().map(|e| e.query_text.as_str()).collect();
    let queries = student.tokenize(&qtexts, TextKind::Query)?;
    let mut passages = Vec::with_capacity(examples.len());
    let mut lists = TeacherLists::new(list_len);
    for e in examples {
        let n = e.passage_ids.len().min(list_len);
        let mut ptexts = Vec::with_capacity(n);
        let mut ids = Vec::with_capacity(n);
        for pid in &e.passage_ids[..n] {
            let text = texts.get(pid).ok_or_else(|| {
                EngineError::Invalid(format!(
                    "example {}: passage `{pid}` is not in the corpus",
                    e.query_id
                ))
            })?;
            ptexts.push(text.as_str());
            ids.push(*intern.get(pid).ok_or_else(|| {
                EngineError::Dataflow(format!("passage `{pid}` was not interned; this is a bug"))
            })?);
        }
        passages.push(student.tokenize(&ptexts, TextKind::Passage)?);
        lists
            .push(&ids, &e.scores[..n])
            .map_err(|err| EngineError::Invalid(format!("example {}: {err}", e.query_id)))?;
    }
    Ok(PreparedBatch {
        queries,
        passages,
        lists,
    })
}

/// Embeddings of `rows` without gradients, `[rows, d]`.
fn embed_no_grad(student: &Student, rows: &[&Vec<u32>]) -> Result<Tensor, EngineError> {
    let rows: Vec<&[u32]> = rows.iter().map(|r| r.as_slice()).collect();
    Ok(student.embed_rows(&rows)?)
}

/// Adds to `total` the parameter gradient of `sum(embed(rows) * grads)`.
fn backward_cached(
    student: &Student,
    rows: &[&Vec<u32>],
    grads: &Tensor,
    total: &mut Gradients,
) -> Result<(), EngineError> {
    let rows: Vec<&[u32]> = rows.iter().map(|r| r.as_slice()).collect();
    Ok(student.accumulate_gradients(&rows, grads, total)?)
}

/// Flat valid-passage rows -> `[Q, L, d]` with zero padding, and the flat row index of each
/// valid slot (`q * L + j`).
fn pad_lists(
    flat: &Tensor,
    lens: &[usize],
    list_len: usize,
) -> Result<(Tensor, Vec<u32>), EngineError> {
    let d = flat.dim(1)?;
    let mut slots = Vec::with_capacity(flat.dim(0)?);
    let mut parts = Vec::with_capacity(lens.len() * 2);
    let mut at = 0;
    for (q, &len) in lens.iter().enumerate() {
        parts.push(flat.narrow(0, at, len)?);
        if len < list_len {
            parts.push(Tensor::zeros(
                (list_len - len, d),
                flat.dtype(),
                flat.device(),
            )?);
        }
        slots.extend((0..len).map(|j| (q * list_len + j) as u32));
        at += len;
    }
    let padded = Tensor::cat(&parts, 0)?.reshape((lens.len(), list_len, d))?;
    Ok((padded, slots))
}

/// The full-batch gradient of the loss with respect to every variable of
/// [`Student::vars`] (in that order), computed micro-batch by micro-batch on the
/// student's default path; and the loss values.
pub fn batch_gradients(
    student: &Student,
    loss: &LossConfig,
    batch: &PreparedBatch,
    micro_batch: usize,
) -> Result<(Vec<Option<Tensor>>, LossValues), EngineError> {
    batch_gradients_on(
        student,
        student.default_gradient_path(),
        loss,
        batch,
        micro_batch,
    )
}

/// [`batch_gradients`] on a chosen gradient path.
pub fn batch_gradients_on(
    student: &Student,
    path: GradientPath,
    loss: &LossConfig,
    batch: &PreparedBatch,
    micro_batch: usize,
) -> Result<(Vec<Option<Tensor>>, LossValues), EngineError> {
    let q_count = batch.len();
    let micro = micro_batch.max(1);
    let ranges: Vec<std::ops::Range<usize>> = (0..q_count)
        .step_by(micro)
        .map(|s| s..(s + micro).min(q_count))
        .collect();

    // 1. Embeddings without gradients.
    let q_rows: Vec<&Vec<u32>> = batch.queries.iter().collect();
    let p_rows: Vec<&Vec<u32>> = batch.passages.iter().flatten().collect();
    let q_all = Var::from_tensor(&embed_no_grad(student, &q_rows)?)?;
    let p_flat = embed_no_grad(student, &p_rows)?;
    let list_len = batch.lists.list_len();
    let (p_padded, slots) = pad_lists(&p_flat, batch.lists.lens(), list_len)?;
    let p_all = Var::from_tensor(&p_padded)?;

    // 2. The loss and its gradient with respect to the embeddings.
    let terms = distillation_loss(loss, q_all.as_tensor(), p_all.as_tensor(), &batch.lists)
        .map_err(|e| EngineError::Invalid(format!("loss: {e}")))?;
    let values = LossValues {
        total: scalar(&terms.total)?,
        kl: terms.kl.as_ref().map(scalar).transpose()?,
        infonce: terms.infonce.as_ref().map(scalar).transpose()?,
    };
    let grads = terms.total.backward()?;
    let d = q_all.as_tensor().dim(1)?;
    let zeros_q = q_all.as_tensor().zeros_like()?;
    let zeros_p = p_all.as_tensor().zeros_like()?;
    let dq = grads.get(q_all.as_tensor()).unwrap_or(&zeros_q).clone();
    let dp = grads
        .get(p_all.as_tensor())
        .unwrap_or(&zeros_p)
        .reshape((q_count * list_len, d))?;
    let slot_index = Tensor::from_vec(slots, (p_flat.dim(0)?,), dp.device())?;
    let dp_flat = dp.index_select(&slot_index, 0)?;

    // 3. Re-embed each micro-batch with gradients, a chunk at a time, and
    // back-propagate the cached gradients.
    let mut total = student.zero_gradients_on(path);
    let mut p_at = 0;
    for r in &ranges {
        let q_mb: Vec<&Vec<u32>> = batch.queries[r.clone()].iter().collect();
        let p_mb: Vec<&Vec<u32>> = batch.passages[r.clone()].iter().flatten().collect();
        let dq_mb = dq.narrow(0, r.start, r.len())?;
        let dp_mb = dp_flat.narrow(0, p_at, p_mb.len())?;
        p_at += p_mb.len();
        backward_cached(student, &q_mb, &dq_mb, &mut total)?;
        backward_cached(student, &p_mb, &dp_mb, &mut total)?;
    }
    Ok((student.gradient_tensors(total)?, values))
}

/// The loss of a batch without any gradient (dev evaluation).
pub fn batch_loss(
    student: &Student,
    loss: &LossConfig,
    batch: &PreparedBatch,
) -> Result<LossValues, EngineError> {
    let q_rows: Vec<&Vec<u32>> = batch.queries.iter().collect();
    let p_rows: Vec<&Vec<u32>> = batch.passages.iter().flatten().collect();
    let q_all = embed_no_grad(student, &q_rows)?;
    let (p_all, _) = pad_lists(
        &embed_no_grad(student, &p_rows)?,
        batch.lists.lens(),
        batch.lists.list_len(),
    )?;
    let terms = distillation_loss(loss, &q_all, &p_all, &batch.lists)
        .map_err(|e| EngineError::Invalid(format!("loss: {e}")))?;
    Ok(LossValues {
        total: scalar(&terms.total)?,
        kl: terms.kl.as_ref().map(scalar).transpose()?,
        infonce: terms.infonce.as_ref().map(scalar).transpose()?,
    })
}
