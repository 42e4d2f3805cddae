//! The CPU kernel (`cpu_bert`) against the candle encoder on tiny random models: the same
//! embeddings and hidden states to 1e-5, for batches of texts of different lengths.

#![allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is its job

use std::path::Path;

use candle_core::{Device, Tensor};
use distillery_operators::bert::{BertConfig, BertModel, Weights};
use distillery_operators::cpu_bert::CpuBert;
use distillery_operators::tiny::{write_tiny_bert, TinyBertSpec};
use distillery_operators::{Backend, Embedder, EmbedderOptions, Pooling, TextKind, TokenBatch};

const TRAINING: [&str; 6] = [
    "the quick brown fox jumps over the lazy dog",
    "vitamin d lowers the risk of respiratory infections in older adults",
    "a man is eating food while a woman plays the guitar",
    "streaming dataflow keeps memory bounded and pushes back on fast stages",
    "macrophages secrete cytokines after stimulation in vitro",
    "retrieval models rank passages by cosine similarity",
];

/// Texts from 1 to about 90 tokens, so lengths straddle the kernels' 16-float lanes.
fn texts() -> Vec<String> {
    let long = TRAINING.join(" ");
    vec![
        "fox".to_string(),
        TRAINING[0].to_string(),
        format!("{long} {long}"),
        TRAINING[2].to_string(),
        "a".to_string(),
        long,
        TRAINING[4].to_string(),
    ]
}

fn tiny(dir: &Path, spec: &TinyBertSpec) {
    write_tiny_bert(dir, TRAINING.iter(), spec).unwrap();
}

fn batch(e: &Embedder, texts: &[String]) -> TokenBatch {
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    TokenBatch::in_order(e.tokenize(&refs, TextKind::Passage).unwrap())
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Embeds `texts` with both backends and returns (candle, cpu, row width).
fn both(dir: &Path, texts: &[String]) -> (Vec<f32>, Vec<f32>, usize) {
    let opts = EmbedderOptions::default();
    let candle = Embedder::load_with_backend(dir, &opts, &Device::Cpu, Backend::Candle).unwrap();
    let cpu = Embedder::load(dir, &opts, &Device::Cpu).unwrap();
    assert_eq!(candle.backend(), Backend::Candle);
    assert_eq!(cpu.backend(), Backend::Cpu);
    let b = batch(&cpu, texts);
    let lens: Vec<usize> = b.rows.iter().map(|r| r.ids.len()).collect();
    assert!(
        lens.iter().max().unwrap() > &40 && lens.iter().min().unwrap() <= &3,
        "{lens:?}"
    );
    (
        candle.embed_batch(&b).unwrap(),
        cpu.embed_batch(&b).unwrap(),
        cpu.dim(),
    )
}

#[test]
fn mean_pooled_normalised_embeddings_match_candle() {
    let dir = tempfile::tempdir().unwrap();
    tiny(dir.path(), &TinyBertSpec::default());
    let (candle, cpu, dim) = both(dir.path(), &texts());
    assert_eq!(cpu.len(), texts().len() * dim);
    let diff = max_abs_diff(&candle, &cpu);
    assert!(diff < 1e-5, "max abs diff {diff}");
    // Unit rows, and different texts give different rows.
    for row in cpu.chunks(dim) {
        let norm: f32 = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5);
    }
    assert!(max_abs_diff(&cpu[..dim], &cpu[dim..2 * dim]) > 1e-2);
}

#[test]
fn cls_pooled_unnormalised_embeddings_match_candle() {
    let dir = tempfile::tempdir().unwrap();
    let spec = TinyBertSpec {
        pooling: Pooling::Cls,
        normalize: false,
        ..TinyBertSpec::default()
    };
    tiny(dir.path(), &spec);
    let (candle, cpu, _) = both(dir.path(), &texts());
    let diff = max_abs_diff(&candle, &cpu);
    assert!(diff < 1e-5, "max abs diff {diff}");
    // Unnormalised CLS states after a layer norm have norm near sqrt(hidden), not 1.
    let norm: f32 = cpu[..32].iter().map(|v| v * v).sum::<f32>().sqrt();
    assert!(norm > 2.0, "norm {norm}");
}

#[test]
fn hidden_states_match_candle_with_odd_widths_and_many_tokens() {
    // hidden 48 = 3 lanes, head_dim 12, intermediate 100 = 6 lanes and a tail of 4.
    let spec = TinyBertSpec {
        hidden_size: 48,
        num_attention_heads: 4,
        intermediate_size: 100,
        num_hidden_layers: 3,
        seed: 7,
        ..TinyBertSpec::default()
    };
    let dir = tempfile::tempdir().unwrap();
    tiny(dir.path(), &spec);
    let e = Embedder::load(dir.path(), &EmbedderOptions::default(), &Device::Cpu).unwrap();
    // Sixteen copies of the texts: enough tokens that each thread's group runs the
    // feed-forward block in more than one 1024-row tile.
    let many: Vec<String> = (0..16).flat_map(|_| texts()).collect();
    let b = batch(&e, &many);
    assert!(
        b.real_tokens() > 2 * 1024 + 300,
        "{} tokens",
        b.real_tokens()
    );
    let config = BertConfig::from_file(&dir.path().join("config.json")).unwrap();
    let weights = Weights::load(&dir.path().join("model.safetensors"), &Device::Cpu).unwrap();
    let kernel = CpuBert::load(&weights, &config).unwrap();
    let model = BertModel::load(&weights, &config).unwrap();

    let seqs: Vec<&[u32]> = b.rows.iter().map(|r| r.ids.as_slice()).collect();
    let packed = kernel.forward(&seqs).unwrap();
    let h = kernel.hidden_size();
    assert_eq!(h, 48);

    let len = b.padded_len();
    let mut ids = vec![0u32; seqs.len() * len];
    let mut mask = vec![0u32; seqs.len() * len];
    for (r, s) in seqs.iter().enumerate() {
        ids[r * len..r * len + s.len()].copy_from_slice(s);
        mask[r * len..r * len + s.len()].fill(1);
    }
    let ids = Tensor::from_vec(ids, (seqs.len(), len), &Device::Cpu).unwrap();
    let mask = Tensor::from_vec(mask, (seqs.len(), len), &Device::Cpu).unwrap();
    let padded = model
        .forward(&ids, &mask)
        .unwrap()
        .to_vec3::<f32>()
        .unwrap();

    let mut start = 0;
    let mut worst = 0.0f32;
    for (r, s) in seqs.iter().enumerate() {
        for t in 0..s.len() {
            let got = &packed[(start + t) * h..(start + t + 1) * h];
            worst = worst.max(max_abs_diff(got, &padded[r][t]));
        }
        start += s.len();
    }
    assert_eq!(start * h, packed.len());
    assert!(worst < 1e-5, "max abs diff {worst}");
}

#[test]
fn same_batch_gives_the_same_bits() {
    let dir = tempfile::tempdir().unwrap();
    tiny(dir.path(), &TinyBertSpec::default());
    let e = Embedder::load(dir.path(), &EmbedderOptions::default(), &Device::Cpu).unwrap();
    let b = batch(&e, &texts());
    let first = e.embed_batch(&b).unwrap();
    for _ in 0..5 {
        let again = e.embed_batch(&b).unwrap();
        let same = first
            .iter()
            .zip(&again)
            .all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same);
    }
}

#[test]
fn bad_ids_and_lengths_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    tiny(dir.path(), &TinyBertSpec::default());
    let config = BertConfig::from_file(&dir.path().join("config.json")).unwrap();
    let weights = Weights::load(&dir.path().join("model.safetensors"), &Device::Cpu).unwrap();
    let kernel = CpuBert::load(&weights, &config).unwrap();
    let out_of_vocab = [2, config.vocab_size as u32, 3];
    assert!(kernel.forward(&[&out_of_vocab]).is_err());
    let too_long = vec![5u32; config.max_position_embeddings + 1];
    assert!(kernel.forward(&[&too_long]).is_err());
    // An empty text is allowed and pools to zeros; no texts give no rows.
    let pooled = kernel
        .embed(&[&[], &[2, 5, 3]], Pooling::Mean, true)
        .unwrap();
    assert!(pooled[..32].iter().all(|v| *v == 0.0));
    assert!(pooled[32..].iter().any(|v| *v != 0.0));
    assert!(kernel.embed(&[], Pooling::Mean, true).unwrap().is_empty());
}
