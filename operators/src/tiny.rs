//! Tiny BERT model directories with random weights and a WordPiece tokenizer trained on
//! a given corpus: complete sentence-transformers directories that every loader in
//! distillery reads like a real one. Tests use them, and so does the CLI when no real
//! model can be found (it says so). Weights come from a seeded generator written here
//! (splitmix64 and Box-Muller), so the same seed gives the same bits on every platform
//! and every version of the `rand` crates.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use candle_core::{Device, Tensor};
use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::tokenizer::{
    Normalizer, OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer,
};
use tokenizers::TokenizerBuilder;

use crate::error::{OperatorError, Result};
use crate::st_config::Pooling;

/// The shape and behaviour of a tiny model.
#[derive(Debug, Clone, PartialEq)]
pub struct TinyBertSpec {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    /// Upper bound for the trained vocabulary (special tokens included).
    pub vocab_size: usize,
    pub max_seq_length: usize,
    pub pooling: Pooling,
    pub normalize: bool,
    pub seed: u64,
}

impl Default for TinyBertSpec {
    /// Small enough to build and run in milliseconds, large enough to have every
    /// part of BERT (several heads, several layers, an intermediate wider than hidden).
    fn default() -> Self {
        Self {
            hidden_size: 32,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            intermediate_size: 64,
            max_position_embeddings: 128,
            vocab_size: 1000,
            max_seq_length: 128,
            pooling: Pooling::Mean,
            normalize: true,
            seed: 42,
        }
    }
}

/// BERT's special tokens, in the ids the trained vocabulary gives them.
const SPECIAL_TOKENS: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];

/// Standard deviation of the random weights, transformers' `initializer_range`.
const INIT_STD: f32 = 0.02;

/// Fills a named tensor with normal variates: name, shape, standard deviation, mean.
type NormalFill<'a> = dyn FnMut(String, &[usize], f32, f32) -> Result<()> + 'a;

/// A deterministic generator of normal variates (splitmix64 + Box-Muller).
pub struct SeededNormal {
    state: u64,
    spare: Option<f32>,
}

impl SeededNormal {
    pub fn new(seed: u64) -> Self {
        Self {
            state: seed,
            spare: None,
        }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }

    pub fn sample(&mut self) -> f32 {
        if let Some(s) = self.spare.take() {
            return s;
        }
        let (u1, u2) = (self.uniform(), self.uniform());
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u2;
        self.spare = Some((r * theta.sin()) as f32);
        (r * theta.cos()) as f32
    }
}

fn tok_err(e: impl std::fmt::Display) -> OperatorError {
    OperatorError::Tokenizer(e.to_string())
}

fn write_file(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|source| OperatorError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Builds a lower-casing BERT WordPiece tokenizer for `texts` and saves it as
/// `dir/tokenizer.json` (and its vocabulary as `dir/vocab.txt`); returns the vocabulary
/// size.
///
/// The vocabulary is made here rather than by the tokenizers crate's trainer, whose
/// merges break ties in an order that changes from run to run (measured: two trainings
/// of the same texts gave different ids to 61 of 120 tokens), so that the same texts
/// always give the same tokenizer: the five special tokens, then every character of the
/// normalised, pre-tokenised texts and its `##` continuation (in character order), then
/// whole words by falling count (ties in word order) until `vocab_size`.
pub fn train_wordpiece<I, S>(dir: &Path, texts: I, vocab_size: usize) -> Result<usize>
where
    I: Iterator<Item = S> + Send,
    S: AsRef<str> + Send,
{
    let normalizer = BertNormalizer::default();
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    let mut chars: BTreeSet<char> = BTreeSet::new();
    for text in texts {
        let mut split = PreTokenizedString::from(text.as_ref());
        split
            .normalize(|n| normalizer.normalize(n))
            .map_err(tok_err)?;
        BertPreTokenizer.pre_tokenize(&mut split).map_err(tok_err)?;
        for (word, _, _) in split.get_splits(OffsetReferential::Original, OffsetType::None) {
            chars.extend(word.chars());
            *counts.entry(word.to_string()).or_default() += 1;
        }
    }
    let mut vocab: Vec<String> = SPECIAL_TOKENS.iter().map(|t| t.to_string()).collect();
    vocab.extend(chars.iter().map(|c| c.to_string()));
    vocab.extend(chars.iter().map(|c| format!("##{c}")));
    let mut words: Vec<(&String, &u64)> = counts
        .iter()
        .filter(|(w, _)| w.chars().count() > 1)
        .collect();
    words.sort_by(|a, b| b.1.cmp(a.1).then_with(|| a.0.cmp(b.0)));
    let room = vocab_size.saturating_sub(vocab.len());
    vocab.extend(words.into_iter().take(room).map(|(w, _)| w.clone()));
    let vocab_path = dir.join("vocab.txt");
    let mut lines = vocab.join("\n");
    lines.push('\n');
    write_file(&vocab_path, &lines)?;
    let model = WordPiece::from_file(&vocab_path.to_string_lossy())
        .unk_token("[UNK]".into())
        .build()
        .map_err(tok_err)?;
    let tokenizer = TokenizerBuilder::new()
        .with_model(model)
        .with_normalizer(Some(BertNormalizer::default()))
        .with_pre_tokenizer(Some(BertPreTokenizer))
        .with_post_processor(Some(BertProcessing::new(
            ("[SEP]".into(), 3),
            ("[CLS]".into(), 2),
        )))
        .with_decoder(Some(WordPieceDecoder::default()))
        .build()
        .map_err(tok_err)?;
    for (expected, token) in SPECIAL_TOKENS.iter().enumerate() {
        if tokenizer.token_to_id(token) != Some(expected as u32) {
            return Err(tok_err(format!(
                "trained vocabulary put {token} at {:?}, expected {expected}",
                tokenizer.token_to_id(token)
            )));
        }
    }
    let path = dir.join("tokenizer.json");
    tokenizer.save(&path, false).map_err(tok_err)?;
    Ok(tokenizer.get_vocab_size(true))
}

/// Writes a complete tiny sentence-transformers directory into `dir`: config.json,
/// tokenizer.json (trained on `texts`), model.safetensors, modules.json,
/// 1_Pooling/config.json, sentence_bert_config.json.
pub fn write_tiny_bert<I, S>(dir: &Path, texts: I, spec: &TinyBertSpec) -> Result<()>
where
    I: Iterator<Item = S> + Send,
    S: AsRef<str> + Send,
{
    std::fs::create_dir_all(dir.join("1_Pooling")).map_err(|source| OperatorError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let vocab = train_wordpiece(dir, texts, spec.vocab_size)?;
    let h = spec.hidden_size;
    let config = serde_json::json!({
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": vocab,
        "hidden_size": h,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "intermediate_size": spec.intermediate_size,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "max_position_embeddings": spec.max_position_embeddings,
        "type_vocab_size": 2,
        "initializer_range": INIT_STD,
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
        "position_embedding_type": "absolute",
    });
    write_file(&dir.join("config.json"), &config.to_string())?;

    let mut rng = SeededNormal::new(spec.seed);
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut normal = |name: String, shape: &[usize], std: f32, mean: f32| -> Result<()> {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| mean + std * rng.sample()).collect();
        tensors.insert(name, Tensor::from_vec(data, shape, &Device::Cpu)?);
        Ok(())
    };
    normal(
        "embeddings.word_embeddings.weight".into(),
        &[vocab, h],
        INIT_STD,
        0.0,
    )?;
    normal(
        "embeddings.position_embeddings.weight".into(),
        &[spec.max_position_embeddings, h],
        INIT_STD,
        0.0,
    )?;
    normal(
        "embeddings.token_type_embeddings.weight".into(),
        &[2, h],
        INIT_STD,
        0.0,
    )?;
    // Layer norms get weights near 1 and biases near 0, not exactly 1 and 0, so that a
    // loader that skipped them would be caught by the reference tests.
    let norm = |normal: &mut NormalFill, name: &str| -> Result<()> {
        normal(format!("{name}.weight"), &[h], 0.1, 1.0)?;
        normal(format!("{name}.bias"), &[h], 0.1, 0.0)
    };
    norm(&mut normal, "embeddings.LayerNorm")?;
    for i in 0..spec.num_hidden_layers {
        let p = format!("encoder.layer.{i}");
        let i_size = spec.intermediate_size;
        let linears = [
            ("attention.self.query", h, h),
            ("attention.self.key", h, h),
            ("attention.self.value", h, h),
            ("attention.output.dense", h, h),
            ("intermediate.dense", h, i_size),
            ("output.dense", i_size, h),
        ];
        for (name, d_in, d_out) in linears {
            normal(format!("{p}.{name}.weight"), &[d_out, d_in], INIT_STD, 0.0)?;
            normal(format!("{p}.{name}.bias"), &[d_out], INIT_STD, 0.0)?;
        }
        norm(&mut normal, &format!("{p}.attention.output.LayerNorm"))?;
        norm(&mut normal, &format!("{p}.output.LayerNorm"))?;
    }
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;

    let mut modules = vec![
        serde_json::json!({"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}),
        serde_json::json!({"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}),
    ];
    if spec.normalize {
        modules.push(serde_json::json!({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}));
    }
    write_file(
        &dir.join("modules.json"),
        &serde_json::Value::Array(modules).to_string(),
    )?;
    let pooling = serde_json::json!({
        "word_embedding_dimension": h,
        "pooling_mode_cls_token": spec.pooling == Pooling::Cls,
        "pooling_mode_mean_tokens": spec.pooling == Pooling::Mean,
        "pooling_mode_max_tokens": false,
        "pooling_mode_mean_sqrt_len_tokens": false,
    });
    write_file(&dir.join("1_Pooling/config.json"), &pooling.to_string())?;
    let sbert = serde_json::json!({"max_seq_length": spec.max_seq_length, "do_lower_case": false});
    write_file(&dir.join("sentence_bert_config.json"), &sbert.to_string())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vocabulary_is_the_same_every_time_and_tokenizes_by_hand() {
        let texts = ["The cat sat", "the cat"];
        let build = || {
            let dir = tempfile::tempdir().unwrap();
            let n = train_wordpiece(dir.path(), texts.iter(), 1000).unwrap();
            (
                n,
                std::fs::read(dir.path().join("tokenizer.json")).unwrap(),
                dir,
            )
        };
        let (n, first, dir) = build();
        for _ in 0..3 {
            assert_eq!(build().1, first);
        }
        // Specials 0-4; characters a c e h s t = 5-10; ## forms 11-16; words by count,
        // ties in order: cat (2), the (2), sat (1) = 17, 18, 19.
        assert_eq!(n, 20);
        let tok = tokenizers::Tokenizer::from_file(dir.path().join("tokenizer.json")).unwrap();
        let ids = tok
            .encode("The cat hates", true)
            .unwrap()
            .get_ids()
            .to_vec();
        // "hates" is unknown: the longest known prefix "h", then ##a ##t ##e ##s.
        assert_eq!(ids, [2, 18, 17, 8, 11, 16, 13, 15, 3]);
    }

    #[test]
    fn seeded_normal_is_reproducible_and_roughly_standard() {
        let a: Vec<f32> = {
            let mut r = SeededNormal::new(7);
            (0..10_000).map(|_| r.sample()).collect()
        };
        let mut r = SeededNormal::new(7);
        assert!(a.iter().all(|&x| x == r.sample()));
        let mean = a.iter().map(|&x| x as f64).sum::<f64>() / a.len() as f64;
        let var = a.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / a.len() as f64;
        // 10,000 samples: the mean's standard error is 0.01.
        assert!(mean.abs() < 0.04, "mean {mean}");
        assert!((var - 1.0).abs() < 0.05, "variance {var}");
    }
}
