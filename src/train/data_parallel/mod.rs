//! Data-parallel training: the steps of gradient caching shared among the processes of a
//! cluster, with the weights after every step equal, bit for bit, to one process's.
//!
//! A step's accumulated batch is cut into micro-batches of `micro_batch` queries
//! (the memory bound of gradient caching). Process `p` of `P` takes the contiguous
//! micro-batches `[p*M/P, (p+1)*M/P)` of the step's `M` ([`share`]):
//! 1. Each process embeds its micro-batches' queries and passages without gradients;
//!    process 0 gathers the embeddings (every row is the same bits whatever the rows
//!    beside it: the kernels are batch invariant), computes the loss and its gradient
//!    with respect to every embedding, and sends each process its rows' part.
//! 2. Each process back-propagates its micro-batches, each from zero gradients, and adds
//!    them up in a fixed binary tree over the step's micro-batches ([`split`]): node
//!    `[a, b)` is the sum of `[a, mid)` and `[mid, b)`, `mid = a + (b - a) / 2`. A process
//!    sends the sums of the largest nodes its micro-batches fill ([`cover`]; one node
//!    when `P` divides into `M` evenly by halving), and process 0 completes the tree
//!    ([`assemble`]). One process computes the same tree alone, so the summed gradient,
//!    and with it every weight, is the same bits on any number of processes (on CPUs that
//!    run the same kernel path; see `operators/src/cpu_path.rs`).
//! 3. Process 0 clips, steps the optimizer and sends the new weights with the next
//!    step's rows: every process holds the same weights, and only process 0 keeps
//!    optimizer state, checkpoints and exports.
//!
//! A step with fewer micro-batches than processes leaves some processes idle; a step is
//! as parallel as its micro-batches.
//!
//! Bytes per step, for a model of `W` parameters and a batch of `R` rows of `d`
//! dimensions: to each other process the weights (`4W`), its rows' token ids and
//! embedding gradients (`4d` per row); from it its rows' embeddings (`4d` per row) and
//! its tree nodes' gradients (`4W` per node, one node when its share fills one).
//!
//! The exchange is a [`Collective`] (the cluster's [`crate::dataflow::rounds::Rounds`]):
//! process 0 sends requests in one round and reads the replies in the next; the others
//! run [`serve_steps`].

use std::collections::BTreeMap;
use std::ops::Range;

use candle_core::{DType, Tensor};
use distillery_operators::student::{GradientPath, Student};

pub use crate::collective::Collective;
use crate::collective::Writer;
use crate::error::EngineError;
use wire::{decode_reply, decode_requests, encode_reply, encode_request, encode_requests};
use wire::{Reply, Request};

mod wire;

/// Parameter gradients, one slot per variable of [`Student::vars`].
pub type Grads = Vec<Option<Tensor>>;

/// [`Grads`] as they travel: per variable its values, flat, or none.
pub(crate) type FlatGrads = Vec<Option<Vec<f32>>>;

/// The micro-batches `[p*m/n, (p+1)*m/n)` of process `p` of `n`, of a step of `m`.
pub fn share(m: usize, n: usize, p: usize) -> Range<usize> {
    let n = n.max(1);
    (p * m / n)..((p + 1) * m / n)
}

/// A tree node's two children.
pub fn split(node: &Range<usize>) -> (Range<usize>, Range<usize>) {
    let mid = node.start + (node.end - node.start) / 2;
    (node.start..mid, mid..node.end)
}

/// The largest nodes of the tree under `node` that lie inside `share`, left to right.
pub fn cover(share: &Range<usize>, node: Range<usize>, out: &mut Vec<Range<usize>>) {
    if node.is_empty() || share.start >= node.end || share.end <= node.start {
        return;
    }
    if share.start <= node.start && node.end <= share.end {
        out.push(node);
        return;
    }
    let (left, right) = split(&node);
    cover(share, left, out);
    cover(share, right, out);
}

/// `a + b`, slot by slot (a slot without gradient adds nothing).
fn add(a: Grads, b: Grads) -> Result<Grads, EngineError> {
    a.into_iter()
        .zip(b)
        .map(|pair| {
            Ok(match pair {
                (Some(x), Some(y)) => Some((x + y)?),
                (x, None) => x,
                (None, y) => y,
            })
        })
        .collect()
}

/// The sum over `node`'s micro-batches, `leaf(i)` giving micro-batch `i`'s gradient, in
/// the tree's order.
fn node_sum(
    node: &Range<usize>,
    leaf: &mut dyn FnMut(usize) -> Result<Grads, EngineError>,
) -> Result<Grads, EngineError> {
    if node.len() == 1 {
        return leaf(node.start);
    }
    let (l, r) = split(node);
    let a = node_sum(&l, leaf)?;
    let b = node_sum(&r, leaf)?;
    add(a, b)
}

/// The sum over `node`, from the sums of nodes under it in `known`.
pub fn assemble(
    node: Range<usize>,
    known: &mut BTreeMap<(usize, usize), Grads>,
) -> Result<Grads, EngineError> {
    if let Some(g) = known.remove(&(node.start, node.end)) {
        return Ok(g);
    }
    if node.len() <= 1 {
        return Err(EngineError::Dataflow(format!(
            "no process sent the gradient of micro-batches {node:?}; this is a bug"
        )));
    }
    let (l, r) = split(&node);
    let a = assemble(l, known)?;
    let b = assemble(r, known)?;
    add(a, b)
}

/// One process's part of a step: the token ids of its micro-batches.
#[derive(Debug, Clone, PartialEq)]
pub struct ShareRows {
    /// The step's micro-batches this share holds, by index.
    pub micro_batches: Range<usize>,
    /// The step's micro-batch count.
    pub total: usize,
    /// Queries per micro-batch (the last of the step may hold fewer).
    pub micro_batch: usize,
    /// The share's queries, in step order.
    pub queries: Vec<Vec<u32>>,
    /// Per query its list's passages, in teacher order; `None` when the passages'
    /// embeddings are fixed (a frozen passage encoder: nothing to embed, nothing flows
    /// back).
    pub passages: Option<Vec<Vec<Vec<u32>>>>,
}

/// A share's embeddings: `[queries, d]` and `[passage rows, d]` (none when fixed).
pub struct ShareEmbeddings {
    pub queries: Tensor,
    pub passages: Option<Tensor>,
}

impl ShareRows {
    fn rows<'a>(lists: impl Iterator<Item = &'a Vec<u32>>) -> Vec<&'a [u32]> {
        lists.map(Vec::as_slice).collect()
    }

    /// Embeddings of the share's rows without gradients.
    pub fn embed(&self, student: &Student) -> Result<ShareEmbeddings, EngineError> {
        if self.queries.is_empty() {
            let none = || Tensor::zeros((0, student.dim()), DType::F32, student.device());
            return Ok(ShareEmbeddings {
                queries: none()?,
                passages: self.passages.as_ref().map(|_| none()).transpose()?,
            });
        }
        let queries = student.embed_rows(&Self::rows(self.queries.iter()))?;
        let passages = match &self.passages {
            Some(lists) => Some(student.embed_rows(&Self::rows(lists.iter().flatten()))?),
            None => None,
        };
        Ok(ShareEmbeddings { queries, passages })
    }

    /// The gradient sums of the tree nodes the share fills ([`cover`]), given the loss's
    /// gradient with respect to the share's query rows `dq` and passage rows `dp`.
    pub fn gradients(
        &self,
        student: &Student,
        path: GradientPath,
        dq: &Tensor,
        dp: Option<&Tensor>,
    ) -> Result<Vec<(Range<usize>, Grads)>, EngineError> {
        let first = self.micro_batches.start;
        let micro = self.micro_batch.max(1);
        // Each micro-batch's first passage row within the share.
        let lens: Vec<usize> = match &self.passages {
            Some(lists) => lists.iter().map(Vec::len).collect(),
            None => vec![0; self.queries.len()],
        };
        let mut leaf = |i: usize| -> Result<Grads, EngineError> {
            let start = (i - first) * micro;
            let end = (start + micro).min(self.queries.len());
            if start >= end {
                return Err(EngineError::Dataflow(format!(
                    "micro-batch {i} has no queries in this share; this is a bug"
                )));
            }
            let mut g = student.zero_gradients_on(path);
            let q = Self::rows(self.queries[start..end].iter());
            student.accumulate_gradients(&q, &dq.narrow(0, start, end - start)?, &mut g)?;
            if let (Some(lists), Some(dp)) = (&self.passages, dp) {
                let at: usize = lens[..start].iter().sum();
                let rows = Self::rows(lists[start..end].iter().flatten());
                student.accumulate_gradients(&rows, &dp.narrow(0, at, rows.len())?, &mut g)?;
            }
            Ok(student.gradient_tensors(g)?)
        };
        let mut nodes = Vec::new();
        cover(&self.micro_batches, 0..self.total, &mut nodes);
        nodes
            .into_iter()
            .map(|node| {
                let sum = node_sum(&node, &mut leaf)?;
                Ok((node, sum))
            })
            .collect()
    }
}

fn flat(t: &Tensor) -> Result<Vec<f32>, EngineError> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// The student's weights, one flat vector per variable.
fn weights_of(student: &Student) -> Result<Vec<Vec<f32>>, EngineError> {
    student.vars().iter().map(|v| flat(v.as_tensor())).collect()
}

/// Sets the student's weights from [`weights_of`]'s vectors.
fn set_weights(student: &Student, weights: Vec<Vec<f32>>) -> Result<(), EngineError> {
    let vars = student.vars();
    if weights.len() != vars.len() {
        return Err(EngineError::Invalid(format!(
            "process 0 trains a model of {} variables, this process loaded {}: every \
             process must load the same student",
            weights.len(),
            vars.len()
        )));
    }
    for (var, values) in vars.iter().zip(weights) {
        if values.len() != var.elem_count() {
            return Err(EngineError::Invalid(
                "process 0 trains a model of other shapes than this process loaded: every \
                 process must load the same student"
                    .into(),
            ));
        }
        let t = Tensor::from_vec(values, var.dims(), var.device())?.to_dtype(var.dtype())?;
        var.set(&t)?;
    }
    Ok(())
}

fn grads_to_flat(grads: &Grads) -> Result<FlatGrads, EngineError> {
    grads
        .iter()
        .map(|g| g.as_ref().map(flat).transpose())
        .collect()
}

fn grads_from_flat(student: &Student, flat: FlatGrads) -> Result<Grads, EngineError> {
    let vars = student.vars();
    if flat.len() != vars.len() {
        return Err(EngineError::Dataflow(format!(
            "gradients of {} variables for a model of {}",
            flat.len(),
            vars.len()
        )));
    }
    vars.iter()
        .zip(flat)
        .map(|(var, values)| {
            values
                .map(|v| {
                    if v.len() != var.elem_count() {
                        return Err(EngineError::Dataflow(
                            "a gradient of another shape than its variable".into(),
                        ));
                    }
                    Ok(Tensor::from_vec(v, var.dims(), var.device())?)
                })
                .transpose()
        })
        .collect()
}

/// Process 0's side of a step's exchanges: the other processes of `peers`.
pub struct Peers<'a> {
    collective: &'a mut dyn Collective,
}

impl<'a> Peers<'a> {
    pub fn new(collective: &'a mut dyn Collective) -> Result<Self, EngineError> {
        if collective.process() != 0 {
            return Err(EngineError::Dataflow(
                "only process 0 drives training; this is a bug".into(),
            ));
        }
        Ok(Self { collective })
    }

    /// How many processes share the work.
    pub fn processes(&self) -> usize {
        self.collective.processes()
    }

    /// Sends every other process its share (`shares[p]`) with the current weights.
    fn send_shares(&mut self, student: &Student, shares: &[ShareRows]) -> Result<(), EngineError> {
        // The weights are encoded once, then put before each process's share.
        let mut weights = Writer::default();
        encode_request(&mut weights, &Request::Weights(weights_of(student)?));
        let outgoing = shares
            .iter()
            .enumerate()
            .skip(1)
            .map(|(p, share)| {
                let mut w = Writer::default();
                w.u64(2).0.extend_from_slice(&weights.0);
                encode_request(&mut w, &Request::Embed(share.clone()));
                (p, w.0)
            })
            .collect();
        self.collective.round(outgoing)?;
        Ok(())
    }

    /// The replies of every other process in the next round.
    fn replies(&mut self) -> Result<Vec<Reply>, EngineError> {
        let mut received = self.collective.round(Vec::new())?;
        (1..self.processes())
            .map(|p| {
                let bytes = received.remove(&p).ok_or_else(|| {
                    EngineError::Dataflow(format!(
                        "process {p} sent no answer: it stopped (see its output)"
                    ))
                })?;
                match decode_reply(&bytes, p)? {
                    Reply::Failed(message) => {
                        Err(EngineError::Dataflow(format!("process {p}: {message}")))
                    }
                    reply => Ok(reply),
                }
            })
            .collect()
    }

    /// Tells the other processes training is over (best effort: one that is gone
    /// cannot be told).
    pub fn finish(&mut self) {
        let outgoing = (1..self.processes())
            .map(|p| (p, encode_requests(&[Request::Done])))
            .collect();
        let _ = self.collective.round(outgoing);
    }
}

/// Every share's embeddings, in process order: process 0's computed here, the others'
/// from their processes. Without peers, `shares` is one share.
pub fn embed_shares(
    student: &Student,
    shares: &[ShareRows],
    peers: Option<&mut Peers<'_>>,
) -> Result<Vec<ShareEmbeddings>, EngineError> {
    let Some(peers) = peers else {
        return shares.iter().map(|s| s.embed(student)).collect();
    };
    peers.send_shares(student, shares)?;
    let own = shares
        .first()
        .map(|s| s.embed(student))
        .transpose()?
        .into_iter();
    let d = student.dim();
    let mut out: Vec<ShareEmbeddings> = own.collect();
    for (reply, share) in peers.replies()?.into_iter().zip(&shares[1..]) {
        let Reply::Embedded { queries, passages } = reply else {
            return Err(EngineError::Dataflow(
                "another process answered embeddings with something else".into(),
            ));
        };
        let n = share.queries.len();
        if queries.len() != n * d {
            return Err(EngineError::Dataflow(format!(
                "another process sent {} values for {n} query embeddings of {d}",
                queries.len()
            )));
        }
        let passages = match (passages, &share.passages) {
            (Some(v), Some(lists)) => {
                let rows: usize = lists.iter().map(Vec::len).sum();
                if v.len() != rows * d {
                    return Err(EngineError::Dataflow(format!(
                        "another process sent {} values for {rows} passage embeddings of {d}",
                        v.len()
                    )));
                }
                Some(Tensor::from_vec(v, (rows, d), student.device())?)
            }
            (None, None) => None,
            _ => {
                return Err(EngineError::Dataflow(
                    "another process embedded passages it was not sent, or not those it was".into(),
                ))
            }
        };
        out.push(ShareEmbeddings {
            queries: Tensor::from_vec(queries, (n, d), student.device())?,
            passages,
        });
    }
    Ok(out)
}

/// The step's gradient: every share back-propagated (process 0's here, the others' on
/// their processes, each given its rows of `dq` and `dp`), summed in the tree's order.
pub fn gradient_of_shares(
    student: &Student,
    path: GradientPath,
    shares: &[ShareRows],
    dq: &[Tensor],
    dp: &[Option<Tensor>],
    peers: Option<&mut Peers<'_>>,
) -> Result<Grads, EngineError> {
    let total = shares.first().map_or(0, |s| s.total);
    if total == 0 {
        return Ok(student.gradient_tensors(student.zero_gradients_on(path))?);
    }
    let mut known: BTreeMap<(usize, usize), Grads> = BTreeMap::new();
    let mut collect = |nodes: Vec<(Range<usize>, Grads)>| {
        for (node, g) in nodes {
            known.insert((node.start, node.end), g);
        }
    };
    match peers {
        None => {
            for ((share, dq), dp) in shares.iter().zip(dq).zip(dp) {
                collect(share.gradients(student, path, dq, dp.as_ref())?);
            }
        }
        Some(peers) => {
            let outgoing = (1..shares.len())
                .map(|p| {
                    Ok((
                        p,
                        encode_requests(&[Request::Backward {
                            path,
                            dq: flat(&dq[p])?,
                            dp: dp[p].as_ref().map(flat).transpose()?,
                        }]),
                    ))
                })
                .collect::<Result<Vec<_>, EngineError>>()?;
            peers.collective.round(outgoing)?;
            collect(shares[0].gradients(student, path, &dq[0], dp[0].as_ref())?);
            for reply in peers.replies()? {
                let Reply::Gradients(nodes) = reply else {
                    return Err(EngineError::Dataflow(
                        "another process answered gradients with something else".into(),
                    ));
                };
                for (node, vars) in nodes {
                    known.insert((node.start, node.end), grads_from_flat(student, vars)?);
                }
            }
        }
    }
    assemble(0..total, &mut known)
}

/// What a process other than 0 did for training.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServedSteps {
    /// Shares embedded (every step's and every dev-loss batch's).
    pub embedded: u64,
    /// Micro-batches back-propagated.
    pub micro_batches: u64,
}

/// A process other than 0 during training: embeds and back-propagates the shares process
/// 0 sends, with the weights it sends, until it says training is over (or stops without
/// saying: its rounds then bring nothing).
pub fn serve_steps(
    student: &Student,
    collective: &mut dyn Collective,
) -> Result<ServedSteps, EngineError> {
    let mut served = ServedSteps::default();
    let mut kept: Option<ShareRows> = None;
    loop {
        let mut received = collective.round(Vec::new())?;
        let Some(bytes) = received.remove(&0) else {
            return Err(EngineError::Dataflow(
                "process 0 stopped training without saying so (see its output)".into(),
            ));
        };
        let requests = decode_requests(&bytes, 0)?;
        let mut reply = None;
        for request in requests {
            let answered = match request {
                Request::Done => return Ok(served),
                Request::Weights(w) => set_weights(student, w).map(|()| None),
                Request::Embed(share) => share.embed(student).and_then(|e| {
                    served.embedded += 1;
                    let queries = flat(&e.queries)?;
                    let passages = e.passages.as_ref().map(flat).transpose()?;
                    kept = Some(share);
                    Ok(Some(Reply::Embedded { queries, passages }))
                }),
                Request::Backward { path, dq, dp } => {
                    backward(student, kept.as_ref(), path, dq, dp).map(|nodes| {
                        served.micro_batches +=
                            nodes.iter().map(|(n, _)| n.len() as u64).sum::<u64>();
                        Some(Reply::Gradients(nodes))
                    })
                }
            };
            match answered {
                Ok(Some(r)) => reply = Some(r),
                Ok(None) => {}
                Err(e) => {
                    reply = Some(Reply::Failed(e.to_string()));
                    break;
                }
            }
        }
        let outgoing = reply
            .map(|r| vec![(0, encode_reply(&r))])
            .unwrap_or_default();
        let mut received = collective.round(outgoing)?;
        // Process 0 ends training in the round that would carry its next request when
        // it stops early (an error between the two rounds of an exchange).
        if let Some(bytes) = received.remove(&0) {
            if decode_requests(&bytes, 0)?
                .iter()
                .any(|r| matches!(r, Request::Done))
            {
                return Ok(served);
            }
        }
    }
}

/// A process other than 0 that cannot train (its student did not load): answers process
/// 0's first request with `error`.
pub fn refuse_steps(
    collective: &mut dyn Collective,
    error: &EngineError,
) -> Result<(), EngineError> {
    collective.round(Vec::new())?;
    collective.round(vec![(0, encode_reply(&Reply::Failed(error.to_string())))])?;
    Ok(())
}

fn backward(
    student: &Student,
    share: Option<&ShareRows>,
    path: GradientPath,
    dq: Vec<f32>,
    dp: Option<Vec<f32>>,
) -> Result<Vec<(Range<usize>, FlatGrads)>, EngineError> {
    let share = share.ok_or_else(|| {
        EngineError::Dataflow("process 0 asked for gradients before sending rows".into())
    })?;
    let d = student.dim();
    let dq = Tensor::from_vec(dq, (share.queries.len(), d), student.device())?;
    let dp = dp
        .map(|v| {
            let rows = v.len() / d.max(1);
            Tensor::from_vec(v, (rows, d), student.device())
        })
        .transpose()?;
    share
        .gradients(student, path, &dq, dp.as_ref())?
        .into_iter()
        .map(|(node, g)| Ok((node, grads_to_flat(&g)?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(share: Range<usize>, total: usize) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        cover(&share, 0..total, &mut out);
        out.into_iter().map(|n| (n.start, n.end)).collect()
    }

    #[test]
    fn shares_split_the_micro_batches_contiguously_and_completely() {
        assert_eq!(
            (0..2).map(|p| share(2, 2, p)).collect::<Vec<_>>(),
            [0..1, 1..2]
        );
        assert_eq!(
            (0..3).map(|p| share(7, 3, p)).collect::<Vec<_>>(),
            [0..2, 2..4, 4..7]
        );
        // Fewer micro-batches than processes: some shares are empty.
        assert_eq!(
            (0..4).map(|p| share(2, 4, p)).collect::<Vec<_>>(),
            [0..0, 0..1, 1..1, 1..2]
        );
        assert_eq!(share(5, 1, 0), 0..5);
    }

    #[test]
    fn a_share_covers_its_micro_batches_with_the_largest_whole_nodes() {
        // Halving shares are whole nodes: one sum each.
        assert_eq!(nodes(0..4, 8), [(0, 4)]);
        assert_eq!(nodes(4..8, 8), [(4, 8)]);
        assert_eq!(nodes(0..3, 6), [(0, 3)]);
        // The tree of 7: [0,3) [3,7); [0,1) [1,3); [3,5) [5,7).
        assert_eq!(nodes(2..4, 7), [(2, 3), (3, 4)]);
        assert_eq!(nodes(4..7, 7), [(4, 5), (5, 7)]);
        assert_eq!(nodes(0..7, 7), [(0, 7)]);
        assert_eq!(nodes(3..3, 7), []);
    }

    /// Gradients as one-slot vectors of scalars whose sums round differently in another
    /// order: the tree gives the same bits however it was shared.
    #[test]
    fn assembling_shared_nodes_sums_in_the_same_order_as_one_process() {
        let dev = candle_core::Device::Cpu;
        let values = [1.0f32, 1e8, -1e8, 0.5, 3.5e-3, 7.0, 1e-7];
        let leaf = |i: usize| -> Result<Grads, EngineError> {
            Ok(vec![Some(Tensor::new(&[values[i]], &dev)?), None])
        };
        let m = values.len();
        let whole = node_sum(&(0..m), &mut { leaf })
            .unwrap()
            .remove(0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        // Left to right the first 1.0 is lost in 1e8; the tree adds 1e8 - 1e8 first.
        let sequential = values.iter().fold(0f32, |a, &b| a + b);
        assert_ne!(whole[0].to_bits(), sequential.to_bits());
        for processes in 1..=m {
            let mut known = BTreeMap::new();
            for p in 0..processes {
                let mut out = Vec::new();
                cover(&share(m, processes, p), 0..m, &mut out);
                for node in out {
                    known.insert(
                        (node.start, node.end),
                        node_sum(&node, &mut { leaf }).unwrap(),
                    );
                }
            }
            let g = assemble(0..m, &mut known).unwrap();
            assert!(g[1].is_none());
            let got = g[0].as_ref().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(
                got[0].to_bits(),
                whole[0].to_bits(),
                "{processes} processes"
            );
            assert!(known.is_empty());
        }
    }
}
