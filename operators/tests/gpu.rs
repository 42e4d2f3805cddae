//! The GPU path against the CPU's: embeddings (a tiny random BERT and, where it can be
//! found, all-MiniLM-L6-v2), cross-encoder scores (the three families' fixtures), student
//! gradients, and greedy LLM tokens (the tiny Llama and Qwen2 fixtures).
//!
//! These run only where CUDA device 0 opens: a build with `--features cuda`
//! (`tools/build-cuda.sh`) on a machine with a GPU. Elsewhere each test prints `SKIPPED`
//! and the reason, and passes: CI has no GPU.
//!
//! Both sides compute in f32; the GPU sums in other orders (cuBLAS tiles, tree
//! reductions), so values agree to rounding, not bit for bit. Tolerances:
//! - embeddings (unit vectors): 1e-4 absolute per component;
//! - cross-encoder logits: 1e-4 absolute, relative beyond 1 (as against transformers);
//! - student gradients: 1e-3 of the largest gradient component, per variable;
//! - greedy tokens: the same ids (the fixtures' top two logits are further apart than
//!   the rounding; `tests/reference/make_llm_fixtures.py` checks that).

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use distillery_operators::llm::{ChatMessage, LlmGenerator, LlmOptions, SamplingParams};
use distillery_operators::tiny::{write_tiny_bert, TinyBertSpec};
use distillery_operators::{
    Backend, CrossEncoder, CrossEncoderOptions, Embedder, EmbedderOptions, Student, StudentOptions,
    TextKind, TokenBatch,
};

#[path = "../../tests/support/minilm.rs"]
mod minilm;

const EMBEDDING_TOLERANCE: f32 = 1e-4;
const LOGIT_TOLERANCE: f32 = 1e-4;
const GRADIENT_TOLERANCE: f32 = 1e-3;

const TEXTS: [&str; 6] = [
    "fox",
    "the quick brown fox jumps over the lazy dog",
    "vitamin d lowers the risk of respiratory infections in older adults",
    "a man is eating food while a woman plays the guitar, and a child sings along \
     while the dog sleeps by the fire in the old house at the end of the road",
    "a",
    "macrophages secrete cytokines after stimulation in vitro",
];

/// CUDA device 0, or `None` after printing why the test is skipped.
fn gpu(test: &str) -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(device) => Some(device),
        Err(e) => {
            println!("SKIPPED {test}: no CUDA device 0 ({e})");
            None
        }
    }
}

/// The repository's `tests/fixtures`: under `$DISTILLERY_REPO` where set (a test binary
/// carried to a GPU machine runs in another checkout than the one it was built in,
/// `tools/gpu-check.sh`), else beside the crate this was built from.
fn fixtures() -> PathBuf {
    std::env::var_os("DISTILLERY_REPO")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
        .join("tests/fixtures")
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The embedder's vectors of [`TEXTS`] on the CPU and on `gpu`, every text in one
/// batch, within [`EMBEDDING_TOLERANCE`].
fn embeddings_agree(dir: &Path, gpu: &Device) {
    let options = EmbedderOptions::default();
    let cpu = Embedder::load(dir, &options, &Device::Cpu).unwrap();
    let cuda = Embedder::load(dir, &options, gpu).unwrap();
    assert_eq!(cuda.backend(), Backend::Candle);
    let ids = cpu.tokenize(&TEXTS, TextKind::Passage).unwrap();
    assert_eq!(ids, cuda.tokenize(&TEXTS, TextKind::Passage).unwrap());
    let want = cpu.embed_batch(&TokenBatch::in_order(ids.clone())).unwrap();
    let got = cuda.embed_batch(&TokenBatch::in_order(ids)).unwrap();
    let diff = max_abs_diff(&got, &want);
    assert!(
        diff <= EMBEDDING_TOLERANCE,
        "{}: GPU embeddings differ from the CPU's by {diff}",
        dir.display()
    );
}

#[test]
fn embeddings_on_the_gpu_equal_the_cpus() {
    let Some(gpu) = gpu("embeddings_on_the_gpu_equal_the_cpus") else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    write_tiny_bert(d.path(), TEXTS.iter(), &TinyBertSpec::default()).unwrap();
    embeddings_agree(d.path(), &gpu);
    match minilm::minilm_dir() {
        Some(dir) => embeddings_agree(&dir, &gpu),
        None => println!("SKIPPED the MiniLM half: model not found"),
    }
}

#[test]
fn cross_encoder_scores_on_the_gpu_equal_the_cpus() {
    let Some(gpu) = gpu("cross_encoder_scores_on_the_gpu_equal_the_cpus") else {
        return;
    };
    let pairs: Vec<(&str, &str)> = TEXTS.iter().map(|t| ("what do foxes eat", *t)).collect();
    for family in ["bert", "electra", "xlm-roberta"] {
        let dir = fixtures().join("cross_encoders").join(family);
        let options = CrossEncoderOptions::default();
        let cpu = CrossEncoder::load(&dir, &options, &Device::Cpu).unwrap();
        let cuda = CrossEncoder::load(&dir, &options, &gpu).unwrap();
        assert_eq!(cuda.backend(), Backend::Candle);
        let rows = cpu.tokenize_pairs(&pairs).unwrap();
        let want = cpu
            .logits_batch(&TokenBatch { rows: rows.clone() })
            .unwrap();
        let got = cuda.logits_batch(&TokenBatch { rows }).unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (g - w).abs() <= LOGIT_TOLERANCE * w.abs().max(1.0),
                "{family}: GPU logits {got:?}, CPU {want:?}"
            );
        }
    }
}

/// Mean over rows of each embedding's dot product with a fixed direction.
fn projection_loss(embeddings: &Tensor) -> Tensor {
    let dim = embeddings.dim(1).unwrap();
    let v: Vec<f32> = (0..dim)
        .map(|i| ((i * 37 + 11) % 23) as f32 / 11.0 - 1.0)
        .collect();
    let direction = Tensor::from_vec(v, (dim, 1), embeddings.device()).unwrap();
    embeddings.matmul(&direction).unwrap().mean_all().unwrap()
}

/// Every variable's gradient of [`projection_loss`], by name, on the CPU.
fn gradients(dir: &Path, device: &Device) -> Vec<(String, Vec<f32>)> {
    let student = Student::load(dir, &StudentOptions::default(), device).unwrap();
    let ids = student.tokenize(&TEXTS, TextKind::Passage).unwrap();
    let grads = projection_loss(&student.embed(&TokenBatch::in_order(ids)).unwrap())
        .backward()
        .unwrap();
    student
        .named_vars()
        .into_iter()
        .map(|(name, var)| {
            let g = grads.get(var.as_tensor()).unwrap();
            let g = g
                .flatten_all()
                .unwrap()
                .to_device(&Device::Cpu)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            (name, g)
        })
        .collect()
}

#[test]
fn student_gradients_on_the_gpu_equal_the_cpus() {
    let Some(gpu) = gpu("student_gradients_on_the_gpu_equal_the_cpus") else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    write_tiny_bert(d.path(), TEXTS.iter(), &TinyBertSpec::default()).unwrap();
    let want = gradients(d.path(), &Device::Cpu);
    let got = gradients(d.path(), &gpu);
    assert_eq!(want.len(), got.len());
    for ((name, w), (got_name, g)) in want.iter().zip(&got) {
        assert_eq!(name, got_name);
        let scale = w.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
        let diff = max_abs_diff(g, w);
        assert!(
            diff <= GRADIENT_TOLERANCE * scale,
            "{name}: GPU gradient differs by {diff} (largest component {scale})"
        );
    }
}

#[test]
fn greedy_llm_tokens_on_the_gpu_equal_the_cpus() {
    let Some(gpu) = gpu("greedy_llm_tokens_on_the_gpu_equal_the_cpus") else {
        return;
    };
    let greedy = SamplingParams {
        temperature: 0.0,
        top_p: 1.0,
        max_new_tokens: 12,
        min_new_tokens: 0,
    };
    let requests: Vec<(Vec<ChatMessage>, u64)> = TEXTS
        .iter()
        .map(|t| {
            let prompt = format!("Write a question this passage answers: {t}");
            (vec![ChatMessage::new("user", &prompt)], 0)
        })
        .collect();
    for model in ["tiny-llama", "tiny-qwen2"] {
        let dir = fixtures().join("llm").join(model);
        let cpu = LlmGenerator::load(&dir, &LlmOptions::default()).unwrap();
        let cuda = LlmGenerator::load(
            &dir,
            &LlmOptions {
                device: gpu.clone(),
                ..LlmOptions::default()
            },
        )
        .unwrap();
        let want = cpu.generate(&requests, &greedy).unwrap();
        let got = cuda.generate(&requests, &greedy).unwrap();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.token_ids, w.token_ids, "{model}: request {i}");
        }
    }
}
