//! Batch invariance on the CPU: a text's embedding and a pair's score are the same bits
//! whatever shares its batch, in whatever order, and whatever the number of compute
//! threads. Incremental reruns rely on it: they embed and score only the changed texts,
//! in batches unlike a full run's, and must end equal to it byte for byte.
//!
//! Each model runs the same items (lengths from a few tokens to the truncation limit)
//! as one batch, each alone, reversed, and in shuffled batches of seven, under rayon
//! pools of 1, 2 and 3 threads; every result is compared bit for bit with the first.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::path::{Path, PathBuf};

use candle_core::Device;
use distillery_operators::cross_encoder::{CrossEncoder, CrossEncoderOptions};
use distillery_operators::{Embedder, EmbedderOptions, TextKind, TokenBatch, TokenizedText};

#[path = "../../tests/support/minilm.rs"]
mod minilm;

/// Texts from a few words to past 256 tokens, each distinct.
fn texts() -> Vec<String> {
    let words = [
        "protein",
        "folding",
        "in",
        "the",
        "cell",
        "membrane",
        "is",
        "regulated",
        "by",
        "chaperones",
        "and",
        "heat",
        "shock",
        "responses",
        "of",
        "yeast",
    ];
    (0..48)
        .map(|i| {
            let len = 2 + (i * 37) % 300;
            let body: Vec<&str> = (0..len).map(|j| words[(i + j * 7) % words.len()]).collect();
            format!("text {i}: {}", body.join(" "))
        })
        .collect()
}

/// A fixed shuffle of `0..n` (a multiplicative step coprime with n).
fn shuffled(n: usize) -> Vec<usize> {
    let step = (1..n)
        .rev()
        .find(|s| gcd(*s, n) == 1 && *s > n / 3)
        .unwrap_or(1);
    (0..n).map(|i| (i * step + 5) % n).collect()
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Runs `rows` through `run` in the batches `groups` names (indices into `rows`) and
/// returns each row's output in `rows`' order.
fn in_batches(
    rows: &[TokenizedText],
    groups: &[Vec<usize>],
    width: usize,
    run: &dyn Fn(&TokenBatch) -> Vec<f32>,
) -> Vec<Vec<f32>> {
    let mut out = vec![Vec::new(); rows.len()];
    for group in groups {
        let batch = TokenBatch {
            rows: group
                .iter()
                .map(|&i| TokenizedText {
                    index: i,
                    ..rows[i].clone()
                })
                .collect(),
        };
        let flat = run(&batch);
        for (row, chunk) in batch.rows.iter().zip(flat.chunks(width)) {
            out[row.index] = chunk.to_vec();
        }
    }
    out
}

/// Every arrangement of `rows`, under every pool size, equals one batch on the default
/// pool, bit for bit.
fn assert_batch_invariant(
    what: &str,
    rows: &[TokenizedText],
    width: usize,
    run: &(dyn Fn(&TokenBatch) -> Vec<f32> + Sync),
) {
    let n = rows.len();
    let whole = vec![(0..n).collect::<Vec<_>>()];
    let reference = in_batches(rows, &whole, width, run);
    let alone: Vec<Vec<usize>> = (0..n).map(|i| vec![i]).collect();
    let reversed = vec![(0..n).rev().collect::<Vec<_>>()];
    let sevens: Vec<Vec<usize>> = shuffled(n).chunks(7).map(|c| c.to_vec()).collect();
    for threads in [1, 2, 3] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        for (name, groups) in [
            ("one batch", &whole),
            ("each alone", &alone),
            ("reversed", &reversed),
            ("shuffled batches of 7", &sevens),
        ] {
            let got = pool.install(|| in_batches(rows, groups, width, run));
            for (i, (g, r)) in got.iter().zip(&reference).enumerate() {
                assert!(
                    g.iter().zip(r).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{what}: row {i} ({} tokens), {name}, {threads} thread(s): {:?} vs {:?}",
                    rows[i].ids.len(),
                    &g[..g.len().min(3)],
                    &r[..r.len().min(3)]
                );
            }
        }
    }
}

#[test]
fn minilm_embeddings_do_not_depend_on_the_batch() {
    let Some(dir) = minilm::minilm_dir() else {
        return;
    };
    let e = Embedder::load(&dir, &EmbedderOptions::default(), &Device::Cpu).unwrap();
    let texts = texts();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let ids = e.tokenize(&refs, TextKind::Passage).unwrap();
    let lens: Vec<usize> = ids.iter().map(Vec::len).collect();
    let rows: Vec<TokenizedText> = ids
        .into_iter()
        .enumerate()
        .map(|(i, ids)| TokenizedText::new(i, ids))
        .collect();
    assert!(lens.iter().any(|&l| l < 10) && lens.contains(&e.max_seq_length()));
    assert_batch_invariant("MiniLM", &rows, e.dim(), &|b| e.embed_batch(b).unwrap());
}

fn cross_encoder_fixture(family: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/cross_encoders")
        .join(family)
}

#[test]
fn cross_encoder_scores_do_not_depend_on_the_batch() {
    for family in ["bert", "electra", "xlm-roberta"] {
        let options = CrossEncoderOptions {
            max_length: Some(96),
        };
        let model =
            CrossEncoder::load(&cross_encoder_fixture(family), &options, &Device::Cpu).unwrap();
        let texts = texts();
        let pairs: Vec<(&str, &str)> = texts
            .iter()
            .enumerate()
            .map(|(i, t)| (texts[(i * 5) % texts.len()].as_str(), t.as_str()))
            .collect();
        let rows = model.tokenize_pairs(&pairs).unwrap();
        assert!(
            rows.iter().any(|r| r.ids.len() == 96),
            "{family}: none truncated"
        );
        assert!(
            rows.iter()
                .all(|r| r.type_ids.is_empty() || r.type_ids.len() == r.ids.len()),
            "{family}: segments"
        );
        assert_batch_invariant(family, &rows, 1, &|b| model.score_batch(b).unwrap());
    }
}

/// Rows whose token counts add up to `total`: the rows of `rows` in order, the last one
/// cut (its final token, the separator, kept) so that the sum is exact.
fn rows_totalling(rows: &[TokenizedText], total: usize) -> Vec<TokenizedText> {
    let mut out = Vec::new();
    let mut sum = 0;
    for (i, r) in rows.iter().enumerate() {
        let left = total - sum;
        if left == 0 {
            break;
        }
        let mut ids = r.ids.clone();
        if ids.len() > left {
            let sep = ids[ids.len() - 1];
            ids.truncate(left.max(2));
            let last = ids.len() - 1;
            ids[last] = sep;
        }
        if ids.len() > left {
            break;
        }
        sum += ids.len();
        out.push(TokenizedText::new(i, ids));
    }
    assert_eq!(sum, total, "the texts hold too few tokens");
    out
}

#[test]
fn a_row_left_alone_in_a_product_tile_changes_no_embedding() {
    // The CPU kernel runs the feed-forward block 1,024 token rows at a time; a batch of
    // 1,025 tokens leaves its last token alone in the last tile, which gemm would
    // multiply through its matrix-vector path (other bits). Each text of such batches
    // (and of 2,049 tokens, and 1,024 and 1,026 around them) must embed as it does alone,
    // on one thread (one group of texts) and on two.
    let dir = tempfile::tempdir().unwrap();
    let texts = texts();
    distillery_operators::tiny::write_tiny_bert(
        dir.path(),
        texts.iter(),
        &distillery_operators::tiny::TinyBertSpec::default(),
    )
    .unwrap();
    let e = Embedder::load(dir.path(), &EmbedderOptions::default(), &Device::Cpu).unwrap();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let tokenized = e.tokenize(&refs, TextKind::Passage).unwrap();
    let rows: Vec<TokenizedText> = tokenized
        .iter()
        .cycle()
        .take(4 * tokenized.len())
        .enumerate()
        .map(|(i, ids)| TokenizedText::new(i, ids.clone()))
        .collect();
    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        for total in [1024, 1025, 1026, 2049] {
            let batch = rows_totalling(&rows, total);
            let n = batch.len();
            let together = pool.install(|| {
                in_batches(&batch, &[(0..n).collect()], e.dim(), &|b| {
                    e.embed_batch(b).unwrap()
                })
            });
            let alone: Vec<Vec<usize>> = (0..n).map(|i| vec![i]).collect();
            let each = pool
                .install(|| in_batches(&batch, &alone, e.dim(), &|b| e.embed_batch(b).unwrap()));
            for (i, (t, a)) in together.iter().zip(&each).enumerate() {
                assert!(
                    t.iter().zip(a).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{total} tokens, {threads} thread(s): text {i} of {n} differs from alone"
                );
            }
        }
    }
}
