#![allow(clippy::unwrap_used)]
//! Cross-encoders against transformers. tests/fixtures/cross_encoders/<family>/ holds a
//! tiny random checkpoint of each family and `expected.json`, what transformers computes
//! for eight (query, passage) pairs at max_length 64 (written by
//! tests/reference/make_cross_encoder_fixtures.py). distillery must give the same token
//! ids and token types for every pair, and the same logits to 1e-4: absolute for logits
//! within [-1, 1], relative beyond (the fixtures' logits lie within 5), on every CPU path
//! this machine runs and on the candle backend (what a GPU runs), here on the CPU.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use distillery_operators::bert::{BertConfig, Weights};
use distillery_operators::cpu_bert::CpuBert;
use distillery_operators::cross_encoder::Family;
use distillery_operators::{
    Backend, CpuPath, CrossEncoder, CrossEncoderOptions, OperatorError, TokenBatch, TokenizedText,
};
use serde::Deserialize;

/// The fixtures' truncation length (MAX_LENGTH in the fixture script).
const MAX_LENGTH: usize = 64;

/// See the module docs.
const TOLERANCE: f32 = 1e-4;

#[derive(Deserialize)]
struct Expected {
    max_length: usize,
    pairs: Vec<ExpectedPair>,
}

#[derive(Deserialize)]
struct ExpectedPair {
    query: String,
    passage: String,
    input_ids: Vec<u32>,
    token_type_ids: Vec<u32>,
    logits: Vec<f32>,
    score: f32,
}

fn fixture(family: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/cross_encoders")
        .join(family)
}

fn expected(family: &str) -> Expected {
    let text = std::fs::read_to_string(fixture(family).join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn options() -> CrossEncoderOptions {
    CrossEncoderOptions {
        max_length: Some(MAX_LENGTH),
    }
}

fn load(dir: &Path) -> Result<CrossEncoder, OperatorError> {
    CrossEncoder::load(dir, &options(), &Device::Cpu)
}

fn close(got: f32, want: f32) -> bool {
    (got - want).abs() <= TOLERANCE * want.abs().max(1.0)
}

/// Token ids, token types, logits and scores of every pair against transformers',
/// all pairs (of mixed lengths) in one batch.
fn matches_transformers(family: &str, want_family: Family, want_labels: usize) {
    let exp = expected(family);
    assert_eq!(exp.max_length, MAX_LENGTH);
    let mut model = load(&fixture(family)).unwrap();
    assert_eq!(model.family(), want_family);
    assert_eq!(model.num_labels(), want_labels);
    let pairs: Vec<(&str, &str)> = exp
        .pairs
        .iter()
        .map(|p| (p.query.as_str(), p.passage.as_str()))
        .collect();
    let rows = model.tokenize_pairs(&pairs).unwrap();
    for (i, (row, want)) in rows.iter().zip(&exp.pairs).enumerate() {
        assert_eq!(row.index, i);
        assert_eq!(row.ids, want.input_ids, "{family} pair {i}: ids");
        let types = if row.type_ids.is_empty() {
            vec![0; row.ids.len()]
        } else {
            row.type_ids.clone()
        };
        assert_eq!(types, want.token_type_ids, "{family} pair {i}: token types");
    }
    // Two pairs are cut to exactly max_length; the others are shorter and all differ.
    let lens: Vec<usize> = rows.iter().map(|r| r.ids.len()).collect();
    assert_eq!(
        lens.iter().filter(|&&l| l == MAX_LENGTH).count(),
        2,
        "{lens:?}"
    );
    assert!(lens.iter().any(|&l| l < 10), "{lens:?}");

    // The encoder's kernels on every CPU path this machine runs.
    assert_eq!(model.backend(), Backend::Cpu);
    for path in CpuPath::supported() {
        model.set_cpu_path(path).unwrap();
        matches_on_the_path(&model, &exp, &rows, family, want_labels);
    }

    // candle's encoder on padded, masked rows: the path every non-CPU device takes.
    let candle = CrossEncoder::load_with_backend(
        &fixture(family),
        &options(),
        &Device::Cpu,
        Backend::Candle,
    )
    .unwrap();
    assert_eq!(candle.backend(), Backend::Candle);
    assert_eq!(candle.cpu_path(), None);
    matches_on_the_path(&candle, &exp, &rows, family, want_labels);
}

/// Logits and scores of `rows` against transformers', and each row's score alone and in
/// reversed order equal to its score in the batch, on the model's CPU path.
fn matches_on_the_path(
    model: &CrossEncoder,
    exp: &Expected,
    rows: &[TokenizedText],
    family: &str,
    want_labels: usize,
) {
    let family = match model.cpu_path() {
        Some(path) => format!("{family} ({path} path)"),
        None => format!("{family} (candle)"),
    };
    let batch = TokenBatch {
        rows: rows.to_vec(),
    };
    let logits = model.logits_batch(&batch).unwrap();
    let scores = model.score_batch(&batch).unwrap();
    assert_eq!(logits.len(), rows.len() * want_labels);
    assert_eq!(scores.len(), rows.len());
    for (i, want) in exp.pairs.iter().enumerate() {
        let got = &logits[i * want_labels..(i + 1) * want_labels];
        for (g, w) in got.iter().zip(&want.logits) {
            assert!(
                close(*g, *w),
                "{family} pair {i}: logits {got:?}, want {:?}",
                want.logits
            );
        }
        assert!(
            close(scores[i], want.score),
            "{family} pair {i}: score {}",
            scores[i]
        );
        // The score is the only logit, or label 1's.
        assert_eq!(scores[i], got[want_labels - 1]);
    }

    // Each row alone gives its score from the mixed batch, reversed order too.
    let mut reversed = rows.to_vec();
    reversed.reverse();
    let backwards = model.score_batch(&TokenBatch { rows: reversed }).unwrap();
    for (i, row) in rows.iter().enumerate() {
        let alone = model
            .score_batch(&TokenBatch {
                rows: vec![row.clone()],
            })
            .unwrap();
        assert!(
            (alone[0] - scores[i]).abs() < 1e-5,
            "{family} pair {i} alone"
        );
        assert!((backwards[rows.len() - 1 - i] - scores[i]).abs() < 1e-5);
    }
}

#[test]
fn bert_matches_transformers() {
    matches_transformers("bert", Family::Bert, 1);
}

#[test]
fn electra_matches_transformers() {
    matches_transformers("electra", Family::Electra, 2);
}

#[test]
fn xlm_roberta_matches_transformers() {
    matches_transformers("xlm-roberta", Family::XlmRoberta, 1);
}

#[test]
fn token_types_change_the_score() {
    // BERT reads the passage as segment 1: the same ids as one segment score otherwise,
    // so the token-type embedding is really applied.
    let model = load(&fixture("bert")).unwrap();
    let mut row = model
        .tokenize_pairs(&[("tumor suppressor", "p53")])
        .unwrap()[0]
        .clone();
    assert!(row.type_ids.contains(&1), "{:?}", row.type_ids);
    let paired = model
        .score_batch(&TokenBatch {
            rows: vec![row.clone()],
        })
        .unwrap();
    row.type_ids.clear();
    let single = model.score_batch(&TokenBatch { rows: vec![row] }).unwrap();
    assert!(
        (paired[0] - single[0]).abs() > 1e-3,
        "{paired:?} {single:?}"
    );
}

#[test]
fn max_length_defaults_and_caps() {
    let default = CrossEncoderOptions::default();
    // bert: tokenizer_config says 100, below the 128 positions.
    let bert = CrossEncoder::load(&fixture("bert"), &default, &Device::Cpu).unwrap();
    assert_eq!(bert.max_length(), 100);
    // xlm-roberta: tokenizer_config says 512; 130 position rows minus the 2 before
    // padding_idx + 1 leave 128.
    let xlmr = CrossEncoder::load(&fixture("xlm-roberta"), &default, &Device::Cpu).unwrap();
    assert_eq!(xlmr.max_length(), 128);
    assert_eq!(xlmr.config().position_offset, 2);
    let asked = CrossEncoderOptions {
        max_length: Some(1000),
    };
    let capped = CrossEncoder::load(&fixture("electra"), &asked, &Device::Cpu).unwrap();
    assert_eq!(capped.max_length(), 128);
    let long = "word ".repeat(300);
    let rows = capped.tokenize_pairs(&[("q", long.as_str())]).unwrap();
    assert_eq!(rows[0].ids.len(), 128);
    let too_short = CrossEncoderOptions {
        max_length: Some(3),
    };
    let err = CrossEncoder::load(&fixture("bert"), &too_short, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("3 leaves no room for text"), "{err}");
}

#[test]
fn rows_that_do_not_fit_the_model_are_refused() {
    let model = load(&fixture("bert")).unwrap();
    let score = |row: TokenizedText| {
        model
            .score_batch(&TokenBatch { rows: vec![row] })
            .unwrap_err()
            .to_string()
    };
    let err = score(TokenizedText::new(4, vec![2, 1500, 3]));
    // The vocabulary has 1500 ids: 1500 is the first one past it.
    assert!(
        err.contains("row 4 of the batch: token id 1500 is outside the model's vocabulary"),
        "{err}"
    );
    let err = score(TokenizedText::new(0, vec![2; 129]));
    assert!(err.contains("129 tokens exceed the model's 128"), "{err}");
    let err = score(TokenizedText {
        index: 0,
        ids: vec![2, 3],
        type_ids: vec![0, 2],
    });
    assert!(err.contains("token type 2"), "{err}");
    let err = score(TokenizedText {
        index: 0,
        ids: vec![2, 3],
        type_ids: vec![0],
    });
    assert!(err.contains("1 token types for 2 tokens"), "{err}");
    let err = score(TokenizedText::new(0, vec![]));
    assert!(err.contains("no tokens"), "{err}");
    assert!(model
        .score_batch(&TokenBatch { rows: vec![] })
        .unwrap()
        .is_empty());
}

/// A copy of a fixture directory, to break.
fn copy_fixture(family: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(family)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

#[test]
fn incomplete_directory_names_the_missing_file() {
    for file in ["model.safetensors", "tokenizer.json", "config.json"] {
        let dir = copy_fixture("electra");
        std::fs::remove_file(dir.path().join(file)).unwrap();
        let err = load(dir.path()).err().unwrap();
        assert!(
            matches!(&err, OperatorError::MissingFile { file: f, .. } if *f == file),
            "{err}"
        );
        assert!(
            err.to_string().contains(&format!("missing {file}")),
            "{err}"
        );
    }
}

/// Rewrites the fixture's weights with `change` applied to the tensor map.
fn rewrite_weights(dir: &Path, change: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let path = dir.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    change(&mut tensors);
    candle_core::safetensors::save(&tensors, &path).unwrap();
}

#[test]
fn wrong_shape_or_missing_tensor_is_named() {
    let dir = copy_fixture("bert");
    let name = "bert.encoder.layer.1.attention.self.query.weight";
    rewrite_weights(dir.path(), |t| {
        let w = t[name].reshape((16, 64)).unwrap();
        t.insert(name.into(), w);
    });
    let err = load(dir.path()).err().unwrap().to_string();
    assert!(
        err.contains(&format!("`{name}`: shape [16, 64], expected [32, 32]")),
        "{err}"
    );

    let dir = copy_fixture("electra");
    rewrite_weights(dir.path(), |t| {
        t.remove("electra.embeddings_project.weight");
    });
    let err = load(dir.path()).err().unwrap().to_string();
    assert!(
        err.contains("`electra.embeddings_project.weight`: missing"),
        "{err}"
    );

    let dir = copy_fixture("xlm-roberta");
    rewrite_weights(dir.path(), |t| {
        t.remove("classifier.dense.bias");
    });
    let err = load(dir.path()).err().unwrap().to_string();
    assert!(err.contains("`classifier.dense.bias`: missing"), "{err}");
}

/// Rewrites the fixture's config.json with `change` applied to its JSON object.
fn rewrite_config(dir: &Path, change: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    change(&mut config);
    std::fs::write(&path, serde_json::to_string(&config).unwrap()).unwrap();
}

#[test]
fn num_labels_disagreeing_with_the_classifier_is_named() {
    let dir = copy_fixture("bert");
    rewrite_config(dir.path(), |c| {
        c["id2label"] = serde_json::json!({"0": "no", "1": "yes"});
    });
    let err = load(dir.path()).err().unwrap().to_string();
    assert!(
        err.contains("`classifier.weight`: shape [1, 32], expected [2, 32]"),
        "{err}"
    );
    assert!(err.contains("num_labels, 2 in config.json"), "{err}");
}

#[test]
fn unsupported_model_type_lists_the_supported_ones() {
    let dir = copy_fixture("bert");
    rewrite_config(dir.path(), |c| {
        c["model_type"] = "deberta-v2".into();
    });
    let err = load(dir.path()).err().unwrap();
    assert!(
        matches!(
            &err,
            OperatorError::Unsupported {
                what: "model_type",
                ..
            }
        ),
        "{err}"
    );
    let text = err.to_string();
    assert!(text.contains("`deberta-v2`"), "{text}");
    assert!(text.contains("bert, electra, xlm-roberta"), "{text}");
}

#[test]
fn kernel_without_embeddings_refuses_token_ids() {
    let dir = fixture("bert");
    let config = BertConfig::from_file(&dir.join("config.json")).unwrap();
    let weights = Weights::load(&dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let layers = CpuBert::load_layers(&weights, &config).unwrap();
    let ids: &[u32] = &[2, 5, 3];
    let err = layers.forward(&[ids]).unwrap_err().to_string();
    assert!(err.contains("forward_embedded"), "{err}");
    // The full kernel still runs on ids; the layers-only one on 3 embedded rows of 32.
    assert_eq!(
        CpuBert::load(&weights, &config)
            .unwrap()
            .forward(&[ids])
            .unwrap()
            .len(),
        96
    );
    let out = layers.forward_embedded(&[3], vec![0.5; 96]).unwrap();
    assert_eq!(out.len(), 96);
    assert!(layers.forward_embedded(&[3], vec![0.5; 95]).is_err());
}
