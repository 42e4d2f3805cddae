//! Exact top-k dense retrieval: inner products of every query with every passage, by
//! blocked matrix products, keeping each query's best `k` in a bounded heap.
//!
//! Over L2-normalised embeddings the inner product is the cosine. Ties are broken by
//! passage position (earlier first), so the result never depends on thread count or
//! block size. Memory is bounded by one score block, `QUERY_BLOCK x PASSAGE_BLOCK`, and
//! [`TopK`] takes the passages in pieces, so the passage matrix is never held whole.

pub mod repair;

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use candle_core::{Device, Tensor};

/// The fewest passage columns a score block is given. candle multiplies by a single
/// column through its matrix-vector path, whose sums differ in the last bits from the
/// matrix-matrix path's; a lone passage is scored beside a zero row instead, so a
/// passage's score is the same bits whatever block it is scored in (a stage whose last
/// block holds one passage; an incremental rerun scoring only the changed passages).
const MIN_BLOCK_COLUMNS: usize = 2;

/// Queries per score block: large enough that the matrix product runs at full speed.
pub const QUERY_BLOCK: usize = 256;
/// Passages per score block: a 256 x 8192 block of f32 is 8 MiB.
pub const PASSAGE_BLOCK: usize = 8192;

/// One retrieved passage: its position in the passage matrix and its score.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hit {
    pub passage: u32,
    pub score: f32,
}

/// Orders hits best first: higher score, then lower passage position.
pub fn better(a: &Hit, b: &Hit) -> Ordering {
    b.score
        .total_cmp(&a.score)
        .then_with(|| a.passage.cmp(&b.passage))
}

/// Offers the scores of passages `p0, p0 + 1, ...` to a query's heap of its `k` best.
///
/// Positions only grow (within a block and from block to block), so a new passage wins a
/// tie against no kept one: once the heap is full, a score enters only when it is
/// strictly above the worst kept score (in `total_cmp`'s order, as [`better`] compares).
/// That threshold is held in a register, so the common case (the score stays out) is one
/// comparison, not a heap look-up.
fn keep_best(heap: &mut BinaryHeap<Worst>, scores: &[f32], p0: usize, k: usize) {
    let mut j = 0;
    while heap.len() < k && j < scores.len() {
        heap.push(Worst(Hit {
            passage: (p0 + j) as u32,
            score: scores[j],
        }));
        j += 1;
    }
    let Some(mut worst) = heap.peek().map(|w| w.0.score) else {
        return;
    };
    for (offset, &score) in scores[j..].iter().enumerate() {
        if score.total_cmp(&worst) == Ordering::Greater {
            heap.pop();
            heap.push(Worst(Hit {
                passage: (p0 + j + offset) as u32,
                score,
            }));
            worst = heap.peek().map_or(score, |w| w.0.score);
        }
    }
}

/// Heap entry ordered so that the heap's top is the worst kept hit.
struct Worst(Hit);
impl PartialEq for Worst {
    fn eq(&self, other: &Self) -> bool {
        better(&self.0, &other.0) == Ordering::Equal
    }
}
impl Eq for Worst {}
impl PartialOrd for Worst {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Worst {
    fn cmp(&self, other: &Self) -> Ordering {
        better(&self.0, &other.0)
    }
}

/// The `k` best passages of each query, best first. `queries` is `nq x dim` and
/// `passages` is `np x dim`, both row-major.
pub fn exact_top_k(
    queries: &[f32],
    passages: &[f32],
    dim: usize,
    k: usize,
    threads: usize,
) -> candle_core::Result<Vec<Vec<Hit>>> {
    let mut top = TopK::new(queries, dim, k, threads);
    top.push(passages)?;
    top.finish()
}

/// Exact top-k over passages that arrive in pieces (the parts of an embedding stage, read
/// from the store one at a time): only the queries, one [`PASSAGE_BLOCK`] of passages and
/// the heaps are held, never the passage matrix. Pieces are gathered into whole blocks
/// before they are scored, so the result is the same bits as [`exact_top_k`] over the
/// whole matrix, however the passages were cut.
pub struct TopK<'q> {
    queries: &'q [f32],
    dim: usize,
    k: usize,
    threads: usize,
    heaps: Vec<BinaryHeap<Worst>>,
    /// Passages waiting for a whole block.
    pending: Vec<f32>,
    /// Position of the first pending passage.
    scored: usize,
}

impl<'q> TopK<'q> {
    /// Top-`k` of each of `queries` (`nq x dim`, row-major) over passages to come.
    pub fn new(queries: &'q [f32], dim: usize, k: usize, threads: usize) -> Self {
        let nq = queries.len().checked_div(dim).unwrap_or(0);
        Self {
            queries,
            dim,
            k,
            threads: threads.max(1),
            heaps: (0..nq).map(|_| BinaryHeap::with_capacity(k + 1)).collect(),
            pending: Vec::with_capacity(PASSAGE_BLOCK * dim),
            scored: 0,
        }
    }

    /// The next passages, `n x dim` row-major; their positions follow the ones before.
    pub fn push(&mut self, passages: &[f32]) -> candle_core::Result<()> {
        if self.dim == 0 {
            return Ok(());
        }
        let block = PASSAGE_BLOCK * self.dim;
        let mut rest = passages;
        while !rest.is_empty() {
            let take = (block - self.pending.len()).min(rest.len());
            self.pending.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.pending.len() == block {
                self.score_pending()?;
            }
        }
        Ok(())
    }

    /// Scores one block of passages at positions `p0, p0 + 1, ...` at once: what a
    /// process given some of a matrix's blocks does (`dataflow/shared_top_k.rs`). Not
    /// mixed with [`TopK::push`]; positions must grow from block to block (ties go to
    /// the earlier position).
    pub fn push_block_at(&mut self, p0: usize, block: &[f32]) -> candle_core::Result<()> {
        if self.dim == 0 || block.is_empty() {
            return Ok(());
        }
        self.pending.clear();
        self.pending.extend_from_slice(block);
        self.scored = p0;
        self.score_pending()
    }

    /// The `k` best passages of each query, best first.
    pub fn finish(mut self) -> candle_core::Result<Vec<Vec<Hit>>> {
        if !self.pending.is_empty() {
            self.score_pending()?;
        }
        Ok(self
            .heaps
            .into_iter()
            .map(|h| {
                let mut v: Vec<Hit> = h.into_iter().map(|w| w.0).collect();
                v.sort_by(better);
                v
            })
            .collect())
    }

    /// Scores the pending block against every query and keeps the best.
    fn score_pending(&mut self) -> candle_core::Result<()> {
        let dim = self.dim;
        let pn = self.pending.len() / dim;
        let p0 = self.scored;
        self.scored += pn;
        let nq = self.heaps.len();
        if self.k == 0 || nq == 0 || pn == 0 {
            self.pending.clear();
            return Ok(());
        }
        let device = Device::Cpu;
        // Columns of the product: a lone passage gets a zero companion (see
        // MIN_BLOCK_COLUMNS), whose scores are dropped.
        let width = pn.max(MIN_BLOCK_COLUMNS);
        self.pending.resize(width * dim, 0.0);
        let p_t = Tensor::from_slice(&self.pending, (width, dim), &device)?
            .t()?
            .contiguous()?;
        self.pending.clear();
        let (k, threads) = (self.k, self.threads);
        for q0 in (0..nq).step_by(QUERY_BLOCK) {
            let qn = QUERY_BLOCK.min(nq - q0);
            let q =
                Tensor::from_slice(&self.queries[q0 * dim..(q0 + qn) * dim], (qn, dim), &device)?;
            let scores: Vec<f32> = q.matmul(&p_t)?.flatten_all()?.to_vec1()?;
            let block_heaps = &mut self.heaps[q0..q0 + qn];
            let rows_per_thread = qn.div_ceil(threads);
            std::thread::scope(|s| {
                for (t, chunk) in block_heaps.chunks_mut(rows_per_thread).enumerate() {
                    let scores = &scores;
                    s.spawn(move || {
                        for (r, heap) in chunk.iter_mut().enumerate() {
                            let row = t * rows_per_thread + r;
                            let row_scores = &scores[row * width..row * width + pn];
                            keep_best(heap, row_scores, p0, k);
                        }
                    });
                }
            });
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Lists as (passage, score bits): what equal-bits assertions compare.
    pub(crate) fn bits(lists: &[Vec<Hit>]) -> Vec<Vec<(u32, u32)>> {
        lists
            .iter()
            .map(|l| l.iter().map(|h| (h.passage, h.score.to_bits())).collect())
            .collect()
    }

    /// `n` values in [-0.5, 0.5) from a fixed linear congruential sequence.
    fn pseudo_random(n: usize) -> Vec<f32> {
        seeded_values(12345, n)
    }

    /// `n` values in [-0.5, 0.5) from the linear congruential sequence started at `seed`.
    pub(crate) fn seeded_values(seed: u64, n: usize) -> Vec<f32> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 33) as f32 / (1u64 << 31) as f32) - 0.5
            })
            .collect()
    }

    #[test]
    fn a_score_is_the_same_bits_in_a_block_of_any_width() {
        for dim in [32, 384] {
            let (nq, np) = (40, 300);
            let q = pseudo_random(nq * dim);
            let p: Vec<f32> = pseudo_random((np + 7) * dim)[7 * dim..].to_vec();
            let all = exact_top_k(&q, &p, dim, np, 2).unwrap();
            let score_of = |qi: usize, passage: u32| {
                all[qi]
                    .iter()
                    .find(|h| h.passage == passage)
                    .unwrap()
                    .score
                    .to_bits()
            };
            for width in 1..=20 {
                let start = 100;
                let block = &p[start * dim..(start + width) * dim];
                let some = exact_top_k(&q, block, dim, width, 2).unwrap();
                for (qi, hits) in some.iter().enumerate() {
                    assert_eq!(hits.len(), width);
                    for h in hits {
                        assert_eq!(
                            h.score.to_bits(),
                            score_of(qi, (start as u32) + h.passage),
                            "dim {dim}, a block of {width}, query {qi}"
                        );
                    }
                }
            }
            // A lone query, too.
            let one = exact_top_k(&q[..dim], &p, dim, np, 2).unwrap();
            for h in &one[0] {
                assert_eq!(h.score.to_bits(), score_of(0, h.passage), "dim {dim}");
            }
        }
    }

    #[test]
    fn a_score_is_the_same_bits_in_wide_blocks_and_for_any_set_of_queries() {
        // The stage's own blocks (8,192 and a last partial one) against blocks of other
        // widths cut at other offsets, and against subsets of the queries: what an
        // incremental rerun scores (the changed passages alone; the queries that lost a
        // passage alone) must be the bits a run from scratch scores.
        for dim in [32, 384] {
            let (nq, np) = (300, PASSAGE_BLOCK + 808);
            let values = pseudo_random((nq + np) * dim);
            let (p, q) = values.split_at(np * dim);
            let all = exact_top_k(q, p, dim, np, 2).unwrap();
            let full: Vec<std::collections::HashMap<u32, u32>> = all
                .iter()
                .map(|hits| {
                    hits.iter()
                        .map(|h| (h.passage, h.score.to_bits()))
                        .collect()
                })
                .collect();
            for (start, width) in [
                (0, 21),
                (5000, 33),
                (8100, 100),
                (17, 255),
                (8191, 257),
                (3, 1000),
                (4000, 4097),
                (1, 8191),
                (8192, 808),
            ] {
                let block = &p[start * dim..(start + width) * dim];
                for (q0, qn) in [(0, nq), (7, 1), (40, 3), (1, 255), (0, 256), (44, 256)] {
                    let some =
                        exact_top_k(&q[q0 * dim..(q0 + qn) * dim], block, dim, width, 2).unwrap();
                    for (qi, hits) in some.iter().enumerate() {
                        for h in hits {
                            assert_eq!(
                                h.score.to_bits(),
                                full[q0 + qi][&(start as u32 + h.passage)],
                                "dim {dim}, {width} passages from {start}, {qn} queries from {q0}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn passages_in_pieces_give_the_same_bits_as_the_whole_matrix() {
        // Enough passages for two and a half blocks, cut in uneven pieces.
        let dim = 8;
        let np = 2 * PASSAGE_BLOCK + PASSAGE_BLOCK / 2;
        let values = pseudo_random((np + 300) * dim);
        let (passages, queries) = values.split_at(np * dim);
        let whole = exact_top_k(queries, passages, dim, 10, 2).unwrap();
        for piece in [1, 2048, 5000, PASSAGE_BLOCK] {
            let mut top = TopK::new(queries, dim, 10, 3);
            for chunk in passages.chunks(piece * dim) {
                top.push(chunk).unwrap();
            }
            let got = top.finish().unwrap();
            assert_eq!(got.len(), whole.len());
            for (a, b) in got.iter().zip(&whole) {
                let bits = |h: &[Hit]| -> Vec<(u32, u32)> {
                    h.iter().map(|x| (x.passage, x.score.to_bits())).collect()
                };
                assert_eq!(bits(a), bits(b), "pieces of {piece}");
            }
        }
    }

    #[test]
    fn finds_best_by_inner_product_with_deterministic_ties() {
        // Passages in 2-d: p0 = (1,0), p1 = (0,1), p2 = (1,0) (a tie with p0), p3 = (0.6, 0.8).
        let passages = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.6, 0.8];
        // q0 = (1,0): scores 1, 0, 1, 0.6 -> p0, p2 (tie, lower position first), p3.
        // q1 = (0,1): scores 0, 1, 0, 0.8 -> p1, p3, then p0 (tie with p2).
        let queries = [1.0, 0.0, 0.0, 1.0];
        for threads in [1, 2, 3] {
            let hits = exact_top_k(&queries, &passages, 2, 3, threads).unwrap();
            let ids: Vec<Vec<u32>> = hits
                .iter()
                .map(|h| h.iter().map(|x| x.passage).collect())
                .collect();
            assert_eq!(ids, vec![vec![0, 2, 3], vec![1, 3, 0]]);
            assert!((hits[1][1].score - 0.8).abs() < 1e-6);
        }
    }

    #[test]
    fn blocks_give_the_same_answer_as_brute_force() {
        // More passages than one block, pseudo-random values.
        let dim = 4;
        let np = PASSAGE_BLOCK + 37;
        let values = pseudo_random((np + 3) * dim);
        let (passages, queries) = values.split_at(np * dim);
        let hits = exact_top_k(queries, passages, dim, 5, 2).unwrap();
        for (qi, got) in hits.iter().enumerate() {
            let q = &queries[qi * dim..(qi + 1) * dim];
            let mut all: Vec<Hit> = (0..np)
                .map(|p| Hit {
                    passage: p as u32,
                    score: q
                        .iter()
                        .zip(&passages[p * dim..(p + 1) * dim])
                        .map(|(a, b)| a * b)
                        .sum(),
                })
                .collect();
            all.sort_by(better);
            let want: Vec<u32> = all[..5].iter().map(|h| h.passage).collect();
            let got: Vec<u32> = got.iter().map(|h| h.passage).collect();
            assert_eq!(got, want);
        }
    }
}
