//! The student's hand-written CPU training pass against candle's autograd on the same
//! weights: the same embeddings, the same gradient for every parameter (mean and CLS
//! pooling, with and without normalisation, erf GELU, tanh GELU and ReLU), across
//! chunk boundaries, additive over calls, and the same bits whatever the thread count.
//! The comparisons with autograd run the kernel on every CPU path this machine runs.
//! (tests/train_step_reference.rs in the root crate checks both paths against PyTorch.)

#![allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is its job

use std::path::Path;

use candle_core::{Device, Tensor};
use distillery_operators::student::{GradientPath, Gradients};
use distillery_operators::tiny::{write_tiny_bert, TinyBertSpec};
use distillery_operators::{CpuPath, Pooling, Student, StudentOptions, TextKind};

const TRAINING: [&str; 6] = [
    "the quick brown fox jumps over the lazy dog",
    "vitamin d lowers the risk of respiratory infections in older adults",
    "a man is eating food while a woman plays the guitar",
    "streaming dataflow keeps memory bounded and pushes back on fast stages",
    "macrophages secrete cytokines after stimulation in vitro",
    "retrieval models rank passages by cosine similarity",
];

/// Tolerance on a gradient, relative to the largest magnitude of that parameter's
/// reference gradient: both paths are f32 with sums in different orders.
const GRAD_TOLERANCE: f32 = 1e-4;

fn student(dir: &Path, spec: &TinyBertSpec, act: &str) -> Student {
    write_tiny_bert(dir, TRAINING.iter(), spec).unwrap();
    let config = dir.join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    json["hidden_act"] = serde_json::json!(act);
    std::fs::write(&config, serde_json::to_string(&json).unwrap()).unwrap();
    let opts = StudentOptions {
        query_max_length: 16,
        passage_max_length: 128,
        ..StudentOptions::default()
    };
    Student::load(dir, &opts, &Device::Cpu).unwrap()
}

/// Texts of 3 to 128 tokens.
fn token_rows(s: &Student, count: usize) -> Vec<Vec<u32>> {
    let long = TRAINING.join(" ");
    let texts: Vec<String> = (0..count)
        .map(|i| match i % 4 {
            0 => TRAINING[i % 6].to_string(),
            1 => format!("{long} {long} {long}"),
            2 => "fox".to_string(),
            _ => format!("{} {}", TRAINING[(i + 1) % 6], TRAINING[(i + 3) % 6]),
        })
        .collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    s.tokenize(&refs, TextKind::Passage).unwrap()
}

/// Deterministic pseudo-random values in [-1, 1).
fn pseudo(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// A tiny erf-GELU student, `count` token rows for it, and pseudo-random embedding
/// gradients for those rows from `seed`.
fn setup(count: usize, seed: u64) -> (tempfile::TempDir, Student, Vec<Vec<u32>>, Tensor) {
    let dir = tempfile::tempdir().unwrap();
    let s = student(dir.path(), &TinyBertSpec::default(), "gelu");
    let ids = token_rows(&s, count);
    let d = Tensor::from_vec(
        pseudo(count * s.dim(), seed),
        (count, s.dim()),
        &Device::Cpu,
    )
    .unwrap();
    (dir, s, ids, d)
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn grads(s: &Student, path: GradientPath, rows: &[&[u32]], d: &Tensor) -> Vec<Vec<f32>> {
    let mut g: Gradients = s.zero_gradients_on(path);
    s.accumulate_gradients(rows, d, &mut g).unwrap();
    flat_gradients(s, g)
}

/// Each variable's gradient as a flat vector (empty for none), in `vars()` order.
fn flat_gradients(s: &Student, g: Gradients) -> Vec<Vec<f32>> {
    s.gradient_tensors(g)
        .unwrap()
        .iter()
        .map(|t| t.as_ref().map(flat).unwrap_or_default())
        .collect()
}

/// Worst relative difference over parameters, with its name.
fn worst(s: &Student, got: &[Vec<f32>], want: &[Vec<f32>]) -> (f32, String) {
    let mut out = (0.0f32, String::new());
    for (((name, _), g), w) in s.named_vars().iter().zip(got).zip(want) {
        if name.ends_with("attention.self.key.bias") {
            // Exactly zero in exact arithmetic (a key bias adds the same q.b to every
            // score of a row, and softmax ignores it): both paths hold rounding noise.
            let ours = g.iter().fold(0.0f32, |m, x| m.max(x.abs()));
            assert!(ours < 1e-5, "{name}: {ours}, should be ~0");
            continue;
        }
        let scale = w.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        if w.is_empty() || scale < 1e-12 {
            // Nothing to compare against: the kernel must agree that it is ~0.
            let ours = g.iter().fold(0.0f32, |m, x| m.max(x.abs()));
            assert!(ours < 1e-6, "{name}: reference ~0, kernel {ours}");
            continue;
        }
        assert_eq!(g.len(), w.len(), "{name}");
        let diff = g
            .iter()
            .zip(w)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        if diff / scale > out.0 {
            out = (diff / scale, name.clone());
        }
    }
    out
}

fn compare_paths(spec: &TinyBertSpec, act: &str, count: usize) {
    let dir = tempfile::tempdir().unwrap();
    let mut s = student(dir.path(), spec, act);
    for path in CpuPath::supported() {
        s.set_cpu_path(path).unwrap();
        compare_on_the_path(&s, spec, &format!("{act} ({path} path)"), count);
    }
}

/// [`compare_paths`] on the student's CPU path.
fn compare_on_the_path(s: &Student, spec: &TinyBertSpec, act: &str, count: usize) {
    let ids = token_rows(s, count);
    let rows: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();

    let kernel = flat(&s.embed_rows(&rows).unwrap());
    let graph = flat(
        &s.embed_no_grad(&distillery_operators::TokenBatch {
            rows: ids
                .iter()
                .enumerate()
                .map(|(i, r)| distillery_operators::TokenizedText::new(i, r.clone()))
                .collect(),
        })
        .unwrap(),
    );
    let diff = kernel
        .iter()
        .zip(&graph)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(diff < 1e-5, "{act}: embeddings differ by {diff}");

    let d = Tensor::from_vec(
        pseudo(rows.len() * s.dim(), 3),
        (rows.len(), s.dim()),
        &Device::Cpu,
    )
    .unwrap();
    let k = grads(s, GradientPath::Kernel, &rows, &d);
    let g = grads(s, GradientPath::Graph, &rows, &d);
    let (w, name) = worst(s, &k, &g);
    eprintln!(
        "{act} {:?} normalize={}: worst relative gradient difference {w:.2e} ({name})",
        spec.pooling, spec.normalize
    );
    assert!(
        w < GRAD_TOLERANCE,
        "{act}: {name} differs by {w:.2e} of its scale"
    );
}

#[test]
fn mean_pooled_normalised_erf_gelu_matches_autograd() {
    compare_paths(&TinyBertSpec::default(), "gelu", 9);
}

#[test]
fn cls_pooled_unnormalised_tanh_gelu_matches_autograd() {
    let spec = TinyBertSpec {
        pooling: Pooling::Cls,
        normalize: false,
        ..TinyBertSpec::default()
    };
    compare_paths(&spec, "gelu_new", 7);
}

#[test]
fn relu_matches_autograd() {
    compare_paths(&TinyBertSpec::default(), "relu", 5);
}

#[test]
fn a_batch_past_one_chunk_matches_autograd() {
    // 240 texts, a quarter of them 128 tokens: past the kernel's 8,192-token chunk.
    let (_dir, s, ids, d) = setup(240, 5);
    let tokens: usize = ids.iter().map(Vec::len).sum();
    assert!(
        tokens > distillery_operators::student::CHUNK_TOKENS,
        "{tokens} tokens"
    );
    let rows: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
    let k = grads(&s, GradientPath::Kernel, &rows, &d);
    let g = grads(&s, GradientPath::Graph, &rows, &d);
    let (w, name) = worst(&s, &k, &g);
    assert!(w < GRAD_TOLERANCE, "{name} differs by {w:.2e} of its scale");
}

#[test]
fn gradients_add_up_over_calls() {
    let (_dir, s, ids, d) = setup(8, 9);
    let rows: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
    let whole = grads(&s, GradientPath::Kernel, &rows, &d);
    let mut g = s.zero_gradients();
    s.accumulate_gradients(&rows[..3], &d.narrow(0, 0, 3).unwrap(), &mut g)
        .unwrap();
    s.accumulate_gradients(&rows[3..], &d.narrow(0, 3, 5).unwrap(), &mut g)
        .unwrap();
    let split = flat_gradients(&s, g);
    let (w, name) = worst(&s, &split, &whole);
    assert!(w < 1e-5, "{name} differs by {w:.2e}");
}

#[test]
fn kept_activations_give_the_recomputed_gradients_bit_for_bit() {
    let (_dir, s, ids, d) = setup(10, 13);
    let rows: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
    let (e, kept) = s.forward_keep(&rows).unwrap();
    assert_eq!(flat(&e), flat(&s.embed_rows(&rows).unwrap()));
    let mut g = s.zero_gradients_on(GradientPath::Kernel);
    s.backward_kept(kept, &d, &mut g).unwrap();
    let kept = flat_gradients(&s, g);
    assert_eq!(kept, grads(&s, GradientPath::Kernel, &rows, &d));
    // Kept activations need kernel-path gradients.
    let (_, again) = s.forward_keep(&rows).unwrap();
    let mut graph = s.zero_gradients_on(GradientPath::Graph);
    let e = s
        .backward_kept(again, &d, &mut graph)
        .unwrap_err()
        .to_string();
    assert!(e.contains("kernel-path"), "{e}");
}

#[test]
fn the_same_bits_whatever_the_thread_count() {
    let (_dir, s, ids, d) = setup(12, 1);
    let rows: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
    let run = |threads: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| {
                (
                    flat(&s.embed_rows(&rows).unwrap()),
                    grads(&s, GradientPath::Kernel, &rows, &d),
                )
            })
    };
    let one = run(1);
    assert_eq!(one, run(3));
    assert_eq!(one, run(1));
}

#[test]
fn bad_rows_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let s = student(dir.path(), &TinyBertSpec::default(), "gelu");
    let too_long = vec![2u32; 129];
    let e = s.embed_rows(&[&[2, 3], &too_long]).unwrap_err().to_string();
    assert!(e.contains("row 1") && e.contains("129 tokens"), "{e}");
    let vocab = s.config().vocab_size as u32;
    let e = s.embed_rows(&[&[2, vocab, 3]]).unwrap_err().to_string();
    assert!(
        e.contains("row 0") && e.contains(&format!("token id {vocab}")),
        "{e}"
    );
}
