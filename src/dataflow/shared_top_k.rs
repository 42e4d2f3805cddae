//! Exact top-k retrieval shared among the processes of a cluster.
//!
//! Process 0 reads the passage stage as a single process does and cuts it into blocks
//! from position 0 ([`PASSAGE_BLOCK`] passages, fewer when the stage is small, so that
//! every process gets some: [`block_rows`]). Block `b` goes to process `b mod P`: process 0 keeps its own, sends the
//! others theirs, a row of `P` blocks per round of the cluster's [`Rounds`], and scores
//! its block while the others score theirs. Every process keeps each query's best `k`
//! over its blocks, and process 0 merges the lists at the end: the union's best `k` in
//! [`better`]'s order. A score is the same bits in any block and for any set of
//! queries (`retrieval`'s tests: a score does not depend on the block it is computed in),
//! so every list is one process's, ties included.
//!
//! What travels: the queries to every other process once (4 bytes a dimension), each
//! passage vector to the process that scores it ((P-1)/P of them leave process 0), and
//! `k` hits (8 bytes each) per query back from every other process.
//!
//! The other processes run [`serve_top_k`] (announced as [`FollowerJob::Retrieve`]).

use std::sync::MutexGuard;

use crate::collective::{Collective, Reader, Writer};
use crate::config::cluster::Sharing;
use crate::dataflow::cluster::{self, FollowerJob};
use crate::dataflow::rounds::Rounds;
use crate::error::EngineError;
use crate::retrieval::{better, Hit, TopK, PASSAGE_BLOCK};

const MSG_START: u8 = 1;
const MSG_BLOCK: u8 = 2;
const MSG_FINISH: u8 = 3;

/// A top-k over passages to come, on this process or shared among the cluster's.
pub enum TopKOver<'q> {
    Local(TopK<'q>),
    Shared(Box<SharedTopK<'q>>),
}

impl<'q> TopKOver<'q> {
    /// Top-`k` of each of `queries` (`nq x dim`, row-major) over `passages` passages to
    /// come: shared as `sharing` says (this process must be process 0), on `threads`
    /// threads here.
    pub fn open(
        sharing: &Sharing,
        queries: &'q [f32],
        (dim, k): (usize, usize),
        passages: usize,
        threads: usize,
    ) -> Result<Self, EngineError> {
        let cluster = &sharing.cluster;
        let scores = (queries.len().checked_div(dim).unwrap_or(0) as u64) * passages as u64;
        if !cluster.is_distributed() || scores < sharing.min_scores {
            return Ok(Self::Local(TopK::new(queries, dim, k, threads)));
        }
        if !cluster.is_leader() {
            return Err(EngineError::Dataflow(
                "only process 0 retrieves; this is a bug".into(),
            ));
        }
        let turn = super::CLUSTER_STAGE
            .lock()
            .map_err(|_| EngineError::Dataflow("a distributed stage panicked".into()))?;
        cluster::announce(cluster, sharing.workers, FollowerJob::Retrieve)?;
        let rounds = Rounds::open(cluster)?;
        let mut top = SharedTopK::over(Box::new(rounds), queries, (dim, k), passages, threads)?;
        top._turn = Some(turn);
        Ok(Self::Shared(Box::new(top)))
    }

    /// The next passages, `n x dim` row-major; their positions follow the ones before.
    pub fn push(&mut self, passages: &[f32]) -> Result<(), EngineError> {
        match self {
            Self::Local(top) => Ok(top.push(passages)?),
            Self::Shared(top) => top.push(passages),
        }
    }

    /// The `k` best passages of each query, best first.
    pub fn finish(self) -> Result<Vec<Vec<Hit>>, EngineError> {
        match self {
            Self::Local(top) => Ok(top.finish()?),
            Self::Shared(top) => top.finish(),
        }
    }
}

/// Passages per block for `passages` passages over `processes`: [`PASSAGE_BLOCK`], or
/// fewer so that every process gets a block (at least [`MIN_SHARED_BLOCK`]).
pub fn block_rows(passages: usize, processes: usize) -> usize {
    passages
        .div_ceil(processes.max(1))
        .clamp(MIN_SHARED_BLOCK, PASSAGE_BLOCK)
}

/// The fewest passages a shared block holds: below it a block's product is too small to
/// be worth a round.
pub const MIN_SHARED_BLOCK: usize = 16;

/// Process 0's side of a shared top-k.
pub struct SharedTopK<'q> {
    local: TopK<'q>,
    rounds: Box<dyn Collective>,
    processes: usize,
    /// Passages per block.
    rows: usize,
    nq: usize,
    k: usize,
    dim: usize,
    /// Passages waiting for a whole block.
    pending: Vec<f32>,
    /// The next block's index.
    block: usize,
    /// This row's blocks for the other processes.
    outgoing: Vec<(usize, Vec<u8>)>,
    /// This row's block of process 0: its position and vectors.
    own: Option<(usize, Vec<f32>)>,
    /// One distributed computation at a time in this process.
    _turn: Option<MutexGuard<'static, ()>>,
}

impl<'q> SharedTopK<'q> {
    /// Process 0's shared top-k over the processes of `rounds` (the others in
    /// [`serve_top_k`]): sends them the queries.
    pub fn over(
        mut rounds: Box<dyn Collective>,
        queries: &'q [f32],
        (dim, k): (usize, usize),
        passages: usize,
        threads: usize,
    ) -> Result<Self, EngineError> {
        let processes = rounds.processes();
        let mut start = Writer::default();
        start.u8(MSG_START).u64(dim).u64(k).f32s(queries);
        let outgoing = (1..processes).map(|p| (p, start.0.clone())).collect();
        rounds.round(outgoing)?;
        let rows = block_rows(passages, processes);
        Ok(Self {
            local: TopK::new(queries, dim, k, threads),
            rounds,
            processes,
            rows,
            nq: queries.len().checked_div(dim).unwrap_or(0),
            k,
            dim,
            pending: Vec::with_capacity(rows * dim),
            block: 0,
            outgoing: Vec::new(),
            own: None,
            _turn: None,
        })
    }

    /// The next passages, `n x dim` row-major; their positions follow the ones before.
    pub fn push(&mut self, passages: &[f32]) -> Result<(), EngineError> {
        if self.dim == 0 {
            return Ok(());
        }
        let whole = self.rows * self.dim;
        let mut rest = passages;
        while !rest.is_empty() {
            let take = (whole - self.pending.len()).min(rest.len());
            self.pending.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.pending.len() == whole {
                self.cut_block()?;
            }
        }
        Ok(())
    }

    /// The pending passages as the next block, to its process; a full row is sent.
    fn cut_block(&mut self) -> Result<(), EngineError> {
        let values = std::mem::replace(&mut self.pending, Vec::with_capacity(self.rows * self.dim));
        let p0 = self.block * self.rows;
        let owner = self.block % self.processes;
        self.block += 1;
        if owner == 0 {
            self.own = Some((p0, values));
        } else {
            let mut w = Writer::default();
            w.u8(MSG_BLOCK).u64(p0).f32s(&values);
            self.outgoing.push((owner, w.0));
        }
        if owner == self.processes - 1 {
            self.send_row()?;
        }
        Ok(())
    }

    /// Sends this row's blocks, then scores process 0's while the others score theirs.
    fn send_row(&mut self) -> Result<(), EngineError> {
        if !self.outgoing.is_empty() {
            self.rounds.round(std::mem::take(&mut self.outgoing))?;
        }
        if let Some((p0, values)) = self.own.take() {
            self.local.push_block_at(p0, &values)?;
        }
        Ok(())
    }

    /// The `k` best passages of each query, best first: process 0's lists merged with
    /// every other process's.
    pub fn finish(mut self) -> Result<Vec<Vec<Hit>>, EngineError> {
        if !self.pending.is_empty() {
            self.cut_block()?;
        }
        self.send_row()?;
        let mut finish = Writer::default();
        finish.u8(MSG_FINISH);
        let outgoing = (1..self.processes).map(|p| (p, finish.0.clone())).collect();
        self.rounds.round(outgoing)?;
        let mut replies = self.rounds.round(Vec::new())?;
        let mut lists = self.local.finish()?;
        for p in 1..self.processes {
            let bytes = replies.remove(&p).ok_or_else(|| {
                EngineError::Dataflow(format!(
                    "process {p} sent no retrieval lists: it stopped (see its output)"
                ))
            })?;
            let theirs = decode_lists(&bytes, p, self.nq)?;
            for (list, more) in lists.iter_mut().zip(theirs) {
                list.extend(more);
                list.sort_by(better);
                list.truncate(self.k);
            }
        }
        Ok(lists)
    }
}

fn encode_lists(lists: &[Vec<Hit>]) -> Vec<u8> {
    let mut w = Writer::default();
    w.u64(lists.len());
    for list in lists {
        let passages: Vec<u32> = list.iter().map(|h| h.passage).collect();
        let scores: Vec<f32> = list.iter().map(|h| h.score).collect();
        w.u32s(&passages).f32s(&scores);
    }
    w.0
}

fn decode_lists(bytes: &[u8], from: usize, nq: usize) -> Result<Vec<Vec<Hit>>, EngineError> {
    let mut r = Reader::new(bytes, from);
    let n = r.u64()?;
    if n != nq {
        return Err(r.bad("a list count"));
    }
    let mut lists = Vec::with_capacity(n);
    for _ in 0..n {
        let passages = r.u32s()?;
        let scores = r.f32s()?;
        if passages.len() != scores.len() {
            return Err(r.bad("a list"));
        }
        lists.push(
            passages
                .into_iter()
                .zip(scores)
                .map(|(passage, score)| Hit { passage, score })
                .collect(),
        );
    }
    if !r.done() {
        return Err(r.bad("trailing bytes"));
    }
    Ok(lists)
}

/// A process other than 0 during a shared top-k: scores the blocks process 0 sends
/// against the queries it sent first, on `threads` threads, and sends its lists back when
/// told to finish. Returns how many blocks it scored.
pub fn serve_top_k(collective: &mut dyn Collective, threads: usize) -> Result<u64, EngineError> {
    let next = |collective: &mut dyn Collective| -> Result<Vec<u8>, EngineError> {
        collective.round(Vec::new())?.remove(&0).ok_or_else(|| {
            EngineError::Dataflow(
                "process 0 stopped a retrieval without saying so (see its output)".into(),
            )
        })
    };
    let start = next(collective)?;
    let mut r = Reader::new(&start, 0);
    if r.u8()? != MSG_START {
        return Err(r.bad("the start of a retrieval"));
    }
    let (dim, k) = (r.u64()?, r.u64()?);
    let queries = r.f32s()?;
    let mut top = TopK::new(&queries, dim, k, threads);
    let mut blocks = 0;
    loop {
        let message = next(collective)?;
        let mut r = Reader::new(&message, 0);
        match r.u8()? {
            MSG_BLOCK => {
                let p0 = r.u64()?;
                let values = r.f32s()?;
                top.push_block_at(p0, &values)?;
                blocks += 1;
            }
            MSG_FINISH => {
                let lists = top.finish()?;
                collective.round(vec![(0, encode_lists(&lists))])?;
                return Ok(blocks);
            }
            _ => return Err(r.bad("a retrieval message")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::ThreadProcess;
    use crate::retrieval::tests::{bits, seeded_values};

    /// Processes as threads: the lists are one process's bits, ties included (passages
    /// repeated in other blocks), whatever the number of processes and however the
    /// passages arrive.
    #[test]
    fn a_top_k_shared_among_processes_is_one_processs_lists() {
        let (dim, nq, np, k) = (8, 37, 1000, 10);
        let queries = seeded_values(1, nq * dim);
        let mut passages = seeded_values(2, np * dim);
        // Query 0's own vector, scaled past every other passage's score, as passages 5,
        // 600, 900 and 999 (blocks apart however shared): four equal best scores, ranked
        // by position.
        let twins = [5u32, 600, 900, 999];
        for &t in &twins {
            let t = t as usize;
            for d in 0..dim {
                passages[t * dim + d] = 4.0 * queries[d];
            }
        }
        let mut alone = TopK::new(&queries, dim, k, 2);
        alone.push(&passages).unwrap();
        let alone = alone.finish().unwrap();
        let first: Vec<u32> = alone[0][..4].iter().map(|h| h.passage).collect();
        assert_eq!(first, twins);
        assert!(alone[0][..4].iter().all(|h| h.score == alone[0][0].score));
        for processes in [2, 3, 5] {
            let mut cluster = ThreadProcess::cluster(processes).into_iter();
            let zero = cluster.next().unwrap();
            let others: Vec<_> = cluster
                .map(|mut me| std::thread::spawn(move || serve_top_k(&mut me, 1).unwrap()))
                .collect();
            let mut top = SharedTopK::over(Box::new(zero), &queries, (dim, k), np, 1).unwrap();
            for piece in passages.chunks(77 * dim) {
                top.push(piece).unwrap();
            }
            let shared = top.finish().unwrap();
            let blocks: Vec<u64> = others.into_iter().map(|t| t.join().unwrap()).collect();
            assert!(bits(&shared) == bits(&alone), "{processes} processes");
            // Blocks of ceil(1000 / P) passages: one for every process.
            assert_eq!(block_rows(np, processes), np.div_ceil(processes));
            assert_eq!(blocks, vec![1; processes - 1], "{processes} processes");
        }
    }

    #[test]
    fn lists_read_back_as_written_and_a_wrong_count_is_an_error() {
        let lists = vec![
            vec![
                Hit {
                    passage: 7,
                    score: 0.5,
                },
                Hit {
                    passage: 2,
                    score: -0.0,
                },
            ],
            vec![],
        ];
        let bytes = encode_lists(&lists);
        assert_eq!(decode_lists(&bytes, 1, 2).unwrap(), lists);
        let err = decode_lists(&bytes, 1, 3).unwrap_err().to_string();
        assert!(
            err.contains("process 1") && err.contains("list count"),
            "{err}"
        );
        assert!(decode_lists(&bytes[..bytes.len() - 1], 1, 2).is_err());
    }
}
