//! Gradient caching (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under
//! Memory Limited Setup"): the gradient of a loss over a whole accumulated batch, with
//! memory bounded by one micro-batch.
//!
//! 1. Embed every query and passage of the batch without gradients.
//! 2. Compute the loss on those embeddings (as leaf variables) and its gradient with
//!    respect to each embedding.
//! 3. Re-embed each micro-batch keeping what backward needs, back-propagate
//!    `sum(embedding * cached gradient)`, and add up the parameter gradients: each
//!    micro-batch's from zero, summed in a fixed binary tree over the micro-batches, so
//!    that the micro-batches can be shared among the processes of a cluster with the
//!    same bits as one process ([`crate::train::data_parallel`]).
//!
//! The sum of step 3 is exactly the full-batch parameter gradient (the chain rule through
//! the embeddings), so a step is the same as one giant backward pass (tested). Steps 1
//! and 3 are the student's gradient API: its CPU training kernel on the CPU, candle's
//! autograd elsewhere (`distillery_operators::student::GradientPath`).
//!
//! With a frozen passage encoder ([`PassageInputs::Fixed`]) the passages' embeddings are
//! given (the base model's, as the corpus index holds them): step 1 embeds the queries
//! only, and step 3 back-propagates through the queries alone, so the parameters learn
//! only how queries are embedded.

use std::collections::HashMap;

use candle_core::{DType, Tensor, Var};
use distillery_operators::student::{GradientPath, Student};
use distillery_operators::TextKind;

use crate::error::EngineError;
use crate::mining::Example;
use crate::train::data_parallel::{self, embed_shares, gradient_of_shares, Peers, ShareRows};
use crate::train::loss::{distillation_loss, LossConfig, TeacherLists};

/// One accumulated batch, tokenised: per query its token ids and its list's passages.
pub struct PreparedBatch {
    queries: Vec<Vec<u32>>,
    passages: BatchPassages,
    lists: TeacherLists,
}

/// A batch's passages: what the student embeds, or embeddings given.
enum BatchPassages {
    /// Per query, the token ids of its list's passages, in teacher order.
    Tokens(Vec<Vec<Vec<u32>>>),
    /// Every list's passages' embeddings, `[valid entries, d]`, query by query in
    /// teacher order; no gradient flows into them.
    Fixed(Tensor),
}

/// The passage embeddings of a frozen passage encoder: one row per passage id.
pub struct FixedPassages {
    /// The model directory whose passage encoder gave the rows (the export's document
    /// route).
    pub model: std::path::PathBuf,
    row_of: HashMap<String, usize>,
    dim: usize,
    values: Vec<f32>,
}

impl FixedPassages {
    /// Rows `values` (`ids.len() x dim`, row-major) of passages `ids`, embedded by the
    /// passage encoder of `model`.
    pub fn new(
        model: std::path::PathBuf,
        ids: Vec<String>,
        dim: usize,
        values: Vec<f32>,
    ) -> Result<Self, EngineError> {
        if values.len() != ids.len() * dim {
            return Err(EngineError::Dataflow(format!(
                "{} passage embeddings of {dim} dimensions but {} values; this is a bug",
                ids.len(),
                values.len()
            )));
        }
        let row_of = ids.into_iter().enumerate().map(|(i, id)| (id, i)).collect();
        Ok(Self {
            model,
            row_of,
            dim,
            values,
        })
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    fn row(&self, id: &str) -> Option<&[f32]> {
        let r = *self.row_of.get(id)?;
        Some(&self.values[r * self.dim..(r + 1) * self.dim])
    }
}

/// Where a batch's passages come from: their texts, embedded by the student (both
/// encoders train), or fixed embeddings (the passage encoder is frozen).
#[derive(Clone, Copy)]
pub enum PassageInputs<'a> {
    Texts(&'a HashMap<String, String>),
    Fixed(&'a FixedPassages),
}

impl<'a> From<&'a HashMap<String, String>> for PassageInputs<'a> {
    fn from(texts: &'a HashMap<String, String>) -> Self {
        PassageInputs::Texts(texts)
    }
}

impl<'a> From<&'a FixedPassages> for PassageInputs<'a> {
    fn from(fixed: &'a FixedPassages) -> Self {
        PassageInputs::Fixed(fixed)
    }
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
            passages: BatchPassages::Tokens(passages),
            lists,
        })
    }

    /// A batch whose passages are embeddings given (a frozen passage encoder): per query
    /// its token ids, and `[valid entries, d]` passage rows query by query in teacher
    /// order (as many as `lists.lens()` sums to).
    pub fn with_fixed_passages(
        queries: Vec<Vec<u32>>,
        passages: Tensor,
        lists: TeacherLists,
    ) -> Result<Self, EngineError> {
        let valid: usize = lists.lens().iter().sum();
        if queries.len() != lists.num_queries() || passages.dim(0)? != valid {
            return Err(EngineError::Invalid(format!(
                "{} queries and {} passage rows, but teacher lists of {:?}",
                queries.len(),
                passages.dim(0)?,
                lists.lens()
            )));
        }
        Ok(Self {
            queries,
            passages: BatchPassages::Fixed(passages),
            lists,
        })
    }

    pub fn len(&self) -> usize {
        self.queries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queries.is_empty()
    }

    /// The batch's micro-batches of `micro_batch` queries, shared among `processes`
    /// ([`data_parallel::share`]): each share's token rows.
    fn shares(&self, micro_batch: usize, processes: usize) -> Vec<ShareRows> {
        let micro = micro_batch.max(1);
        let q = self.queries.len();
        let total = q.div_ceil(micro);
        (0..processes.max(1))
            .map(|p| {
                let micro_batches = data_parallel::share(total, processes, p);
                let rows = (micro_batches.start * micro).min(q)..(micro_batches.end * micro).min(q);
                ShareRows {
                    micro_batches,
                    total,
                    micro_batch: micro,
                    queries: self.queries[rows.clone()].to_vec(),
                    passages: match &self.passages {
                        BatchPassages::Tokens(lists) => Some(lists[rows].to_vec()),
                        BatchPassages::Fixed(_) => None,
                    },
                }
            })
            .collect()
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

/// Tokenises `examples` for the student. `passages` gives each passage id its text (or
/// its fixed embedding); `intern` gives each passage id a number shared across the
/// batch.
pub fn prepare(
    student: &Student,
    examples: &[&Example],
    passages: PassageInputs<'_>,
    intern: &HashMap<String, u32>,
    list_len: usize,
) -> Result<PreparedBatch, EngineError> {
    let qtexts: Vec<&str> = examples.iter().map(|e| e.query_text.as_str()).collect();
    let queries = student.tokenize(&qtexts, TextKind::Query)?;
    let mut tokens = Vec::with_capacity(examples.len());
    let mut rows: Vec<f32> = Vec::new();
    let mut lists = TeacherLists::new(list_len);
    let missing = |e: &Example, pid: &str| {
        EngineError::Invalid(format!(
            "example {}: passage `{pid}` is not in the corpus",
            e.query_id
        ))
    };
    for e in examples {
        let n = e.passage_ids.len().min(list_len);
        let mut ptexts = Vec::with_capacity(n);
        let mut ids = Vec::with_capacity(n);
        for pid in &e.passage_ids[..n] {
            match passages {
                PassageInputs::Texts(texts) => {
                    ptexts.push(texts.get(pid).ok_or_else(|| missing(e, pid))?.as_str())
                }
                PassageInputs::Fixed(fixed) => {
                    rows.extend_from_slice(fixed.row(pid).ok_or_else(|| missing(e, pid))?)
                }
            }
            ids.push(*intern.get(pid).ok_or_else(|| {
                EngineError::Dataflow(format!("passage `{pid}` was not interned; this is a bug"))
            })?);
        }
        if let PassageInputs::Texts(_) = passages {
            tokens.push(student.tokenize(&ptexts, TextKind::Passage)?);
        }
        lists
            .push(&ids, &e.scores[..n])
            .map_err(|err| EngineError::Invalid(format!("example {}: {err}", e.query_id)))?;
    }
    let passages = match passages {
        PassageInputs::Texts(_) => BatchPassages::Tokens(tokens),
        PassageInputs::Fixed(fixed) => {
            if fixed.dim() != student.dim() {
                return Err(EngineError::Invalid(format!(
                    "the frozen passage encoder of {} embeds in {} dimensions, the student in {}",
                    fixed.model.display(),
                    fixed.dim(),
                    student.dim()
                )));
            }
            let n = rows.len() / fixed.dim().max(1);
            BatchPassages::Fixed(Tensor::from_vec(rows, (n, fixed.dim()), student.device())?)
        }
    };
    Ok(PreparedBatch {
        queries,
        passages,
        lists,
    })
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
    batch_gradients_shared(student, path, loss, batch, micro_batch, None)
}

/// [`batch_gradients_on`] with the micro-batches shared among the processes of `peers`
/// (see [`crate::train::data_parallel`]): the same bits as on one process.
pub fn batch_gradients_shared(
    student: &Student,
    path: GradientPath,
    loss: &LossConfig,
    batch: &PreparedBatch,
    micro_batch: usize,
    mut peers: Option<&mut Peers<'_>>,
) -> Result<(Vec<Option<Tensor>>, LossValues), EngineError> {
    let q_count = batch.len();
    let shares = batch.shares(micro_batch, peers.as_ref().map_or(1, |p| p.processes()));

    // 1. Embeddings without gradients, each share's where it is computed.
    let (q_flat, p_flat) = embeddings(student, batch, &shares, peers.as_deref_mut())?;
    let q_all = Var::from_tensor(&q_flat)?;
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

    // 3. Each share's rows of the cached gradients; each share re-embeds its
    // micro-batches with gradients and back-propagates them (a frozen passage encoder's
    // embeddings are constants: nothing flows back into them), and the micro-batches'
    // gradients are summed in the fixed tree of `data_parallel`.
    let (mut dqs, mut dps) = (Vec::new(), Vec::new());
    let (mut q_at, mut p_at) = (0, 0);
    for share in &shares {
        let n = share.queries.len();
        dqs.push(dq.narrow(0, q_at, n)?);
        q_at += n;
        dps.push(match &share.passages {
            Some(lists) => {
                let rows: usize = lists.iter().map(Vec::len).sum();
                let part = dp_flat.narrow(0, p_at, rows)?;
                p_at += rows;
                Some(part)
            }
            None => None,
        });
    }
    let total = gradient_of_shares(student, path, &shares, &dqs, &dps, peers)?;
    Ok((total, values))
}

/// The batch's query embeddings `[queries, d]` and passage embeddings `[valid entries,
/// d]` (the fixed ones, or the student's), every share embedded where it is computed.
fn embeddings(
    student: &Student,
    batch: &PreparedBatch,
    shares: &[ShareRows],
    peers: Option<&mut Peers<'_>>,
) -> Result<(Tensor, Tensor), EngineError> {
    let embedded = embed_shares(student, shares, peers)?;
    let cat = |parts: Vec<&Tensor>| -> Result<Tensor, EngineError> {
        let parts: Vec<&Tensor> = parts
            .into_iter()
            .filter(|t| t.dim(0).is_ok_and(|n| n > 0))
            .collect();
        if parts.is_empty() {
            return Ok(Tensor::zeros(
                (0, student.dim()),
                DType::F32,
                student.device(),
            )?);
        }
        Ok(Tensor::cat(&parts, 0)?)
    };
    let queries = cat(embedded.iter().map(|e| &e.queries).collect())?;
    let passages = match &batch.passages {
        BatchPassages::Fixed(rows) => rows.clone(),
        BatchPassages::Tokens(_) => cat(embedded
            .iter()
            .filter_map(|e| e.passages.as_ref())
            .collect())?,
    };
    Ok((queries, passages))
}

/// The loss of a batch without any gradient (dev evaluation), its embeddings shared
/// among the processes of `peers` as a step's are.
pub fn batch_loss(
    student: &Student,
    loss: &LossConfig,
    batch: &PreparedBatch,
    micro_batch: usize,
    peers: Option<&mut Peers<'_>>,
) -> Result<LossValues, EngineError> {
    let shares = batch.shares(micro_batch, peers.as_ref().map_or(1, |p| p.processes()));
    let (q_all, p_flat) = embeddings(student, batch, &shares, peers)?;
    let (p_all, _) = pad_lists(&p_flat, batch.lists.lens(), batch.lists.list_len())?;
    let terms = distillation_loss(loss, &q_all, &p_all, &batch.lists)
        .map_err(|e| EngineError::Invalid(format!("loss: {e}")))?;
    Ok(LossValues {
        total: scalar(&terms.total)?,
        kl: terms.kl.as_ref().map(scalar).transpose()?,
        infonce: terms.infonce.as_ref().map(scalar).transpose()?,
    })
}
