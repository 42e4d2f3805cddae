//! One whole training step against PyTorch: the student's forward pass, the recipe's loss
//! in each of the three modes, and the backward pass through gradient caching must give
//! the loss and every parameter's gradient that transformers' `BertModel` gives in
//! float64 (tests/reference/train_step_reference.py -> tests/fixtures/train_step/).
//!
//! The batch is fixed as token ids (no tokenizer on either side): 4 queries, lists of at
//! most 4 with one short list, a passage shared by two lists, a false negative, and one
//! query's positive as another's hard negative. The step runs with micro-batches of 2
//! queries, so the cached-gradient path (embed without a graph, loss gradient, re-embed
//! and back-propagate per micro-batch) is the one compared. The same step with the
//! passage encoder frozen (query-tower training: the passages' embeddings given as
//! constants) is compared with PyTorch's gradient through the queries alone.

#![allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is its job

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use distillery::train::gradcache::{batch_gradients_on, LossValues, PreparedBatch};
use distillery::train::loss::{LossConfig, LossMode, TeacherLists};
use distillery_operators::student::GradientPath;
use distillery_operators::tiny::{write_tiny_bert, TinyBertSpec};
use distillery_operators::{Student, StudentOptions};
use serde::Deserialize;

/// Queries per micro-batch: half the batch, so the step sums two re-embedded halves.
const MICRO_BATCH: usize = 2;
/// Loss and gradient tolerance, relative (a gradient's to its tensor's largest reference
/// magnitude): float32 against float64 through two layers, a normalisation and
/// temperatures down to 0.01 (which scale the loss gradient by 100).
const TOLERANCE: f64 = 1e-4;
/// The key projections' biases have a true gradient of zero (a softmax over keys ignores
/// a score added to every key alike, and the bias adds `q . b` to all of them): only
/// float32 rounding may remain.
const ZERO_GRADIENT: f64 = 1e-6;

#[derive(Deserialize)]
struct Values {
    total: f64,
    kl: Option<f64>,
    infonce: Option<f64>,
}

#[derive(Deserialize)]
struct Fixture {
    list_len: usize,
    query_tokens: Vec<Vec<u32>>,
    passage_tokens: Vec<Vec<Vec<u32>>>,
    passage_ids: Vec<Vec<u32>>,
    scores: Vec<Vec<f32>>,
    modes: HashMap<String, Values>,
    /// The same step with the passage encoder frozen (passages embedded, detached).
    frozen_modes: HashMap<String, Values>,
}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The fixture student (tests/fixtures/student): a tiny directory supplies the tokenizer
/// and sentence-transformers files (mean pooling, normalised), never used for ids here.
fn student(dir: &std::path::Path) -> Student {
    write_tiny_bert(dir, ["a tiny vocabulary"].iter(), &TinyBertSpec::default()).unwrap();
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(fixtures().join("student").join(file), dir.join(file)).unwrap();
    }
    Student::load(dir, &StudentOptions::default(), &Device::Cpu).unwrap()
}

fn batch(f: &Fixture) -> PreparedBatch {
    let mut lists = TeacherLists::new(f.list_len);
    for (ids, scores) in f.passage_ids.iter().zip(&f.scores) {
        lists.push(ids, scores).unwrap();
    }
    PreparedBatch::from_tokens(f.query_tokens.clone(), f.passage_tokens.clone(), lists).unwrap()
}

fn relative(got: f64, want: f64) -> f64 {
    (got - want).abs() / want.abs()
}

fn max_abs(t: &Tensor) -> f64 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

#[test]
fn train_step_gradients_equal_pytorch_in_every_mode() {
    let dir = tempfile::tempdir().unwrap();
    let s = student(dir.path());
    let f: Fixture = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("train_step/batch.json")).unwrap(),
    )
    .unwrap();
    let reference = candle_core::safetensors::load(
        fixtures().join("train_step/grads.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let batch = batch(&f);
    let named = s.named_vars();
    assert_eq!(f.modes.len(), 3);
    assert_eq!(reference.len(), (3 + f.frozen_modes.len()) * named.len());

    // Both gradient paths: the hand-written CPU kernel (the trainer's on the CPU) and
    // candle's autograd (other devices).
    for (path, (mode_name, want)) in [GradientPath::Kernel, GradientPath::Graph]
        .into_iter()
        .flat_map(|p| f.modes.iter().map(move |m| (p, m)))
    {
        let mode: LossMode = serde_json::from_value(serde_json::json!(mode_name)).unwrap();
        let key = mode_name;
        let mode_name = &format!("{mode_name} ({path:?})");
        let config = LossConfig {
            mode,
            ..LossConfig::default()
        };
        let (grads, got) = batch_gradients_on(&s, path, &config, &batch, MICRO_BATCH).unwrap();

        check_step(mode_name, key, &named, &reference, &grads, &got, want);
    }
}

/// One step's loss and gradients (`grads`, in `named`'s order) against the reference's
/// `want` and its `key/<parameter>` tensors.
fn check_step(
    mode_name: &str,
    key: &str,
    named: &[(String, candle_core::Var)],
    reference: &HashMap<String, Tensor>,
    grads: &[Option<Tensor>],
    got: &LossValues,
    want: &Values,
) {
    let loss_diff = relative(got.total, want.total);
    assert!(
        loss_diff < TOLERANCE,
        "{mode_name}: {got:?} vs {}",
        want.total
    );
    assert_eq!(got.kl.is_some(), want.kl.is_some(), "{mode_name}");
    assert_eq!(got.infonce.is_some(), want.infonce.is_some(), "{mode_name}");
    if let (Some(g), Some(w)) = (got.kl, want.kl) {
        assert!(relative(g, w) < TOLERANCE, "{mode_name} kl: {g} vs {w}");
    }
    if let (Some(g), Some(w)) = (got.infonce, want.infonce) {
        assert!(
            relative(g, w) < TOLERANCE,
            "{mode_name} infonce: {g} vs {w}"
        );
    }

    let mut worst = (0.0f64, String::new());
    for ((name, _), grad) in named.iter().zip(grads) {
        let want = &reference[&format!("{key}/{name}")];
        let grad = grad
            .as_ref()
            .unwrap_or_else(|| panic!("{mode_name}: no gradient for {name}"));
        let diff = max_abs(&(grad.to_dtype(DType::F32).unwrap() - want).unwrap());
        let scale = max_abs(want);
        if name.ends_with("attention.self.key.bias") {
            assert!(
                scale < 1e-9 && max_abs(grad) < ZERO_GRADIENT,
                "{mode_name} {name}: reference {scale}, ours {}",
                max_abs(grad)
            );
            continue;
        }
        assert!(
            scale > 1e-4,
            "{mode_name} {name}: reference gradient ~0 ({scale})"
        );
        if diff / scale > worst.0 {
            worst = (diff / scale, name.clone());
        }
    }
    eprintln!(
        "{mode_name}: loss {} (reference {}, relative {loss_diff:.2e}); worst gradient \
         difference relative to its tensor's largest: {:.2e} ({})",
        got.total, want.total, worst.0, worst.1
    );
    assert!(worst.0 < TOLERANCE, "{mode_name}: {worst:?}");
}

#[test]
fn a_frozen_passage_encoder_step_equals_pytorch_through_the_queries_alone() {
    let dir = tempfile::tempdir().unwrap();
    let s = student(dir.path());
    let f: Fixture = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("train_step/batch.json")).unwrap(),
    )
    .unwrap();
    let reference = candle_core::safetensors::load(
        fixtures().join("train_step/grads.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let named = s.named_vars();
    assert_eq!(f.frozen_modes.len(), 1);
    // The passages' embeddings by the same weights, given as constants: what the base
    // model's corpus index holds at the first step.
    let rows: Vec<&[u32]> = f
        .passage_tokens
        .iter()
        .flatten()
        .map(|r| r.as_slice())
        .collect();
    let fixed = s.embed_rows(&rows).unwrap();
    let mut lists = TeacherLists::new(f.list_len);
    for (ids, scores) in f.passage_ids.iter().zip(&f.scores) {
        lists.push(ids, scores).unwrap();
    }
    let batch = PreparedBatch::with_fixed_passages(f.query_tokens.clone(), fixed, lists).unwrap();
    for (mode_name, want) in &f.frozen_modes {
        // The frozen step's gradient is not the shared one's: were the passages still
        // back-propagated, the comparison below would fail by this much.
        let mut apart = 0.0f64;
        for (name, _) in &named {
            let frozen = &reference[&format!("frozen_{mode_name}/{name}")];
            let shared = &reference[&format!("{mode_name}/{name}")];
            let scale = max_abs(frozen).max(1e-12);
            apart = apart.max(max_abs(&(frozen - shared).unwrap()) / scale);
        }
        assert!(
            apart > 100.0 * TOLERANCE,
            "frozen and shared references differ by {apart}"
        );
        for path in [GradientPath::Kernel, GradientPath::Graph] {
            let mode: LossMode = serde_json::from_value(serde_json::json!(mode_name)).unwrap();
            let config = LossConfig {
                mode,
                ..LossConfig::default()
            };
            let (grads, got) = batch_gradients_on(&s, path, &config, &batch, MICRO_BATCH).unwrap();
            check_step(
                &format!("frozen {mode_name} ({path:?})"),
                &format!("frozen_{mode_name}"),
                &named,
                &reference,
                &grads,
                &got,
                want,
            );
        }
    }
}
