//! The trainable student against the inference embedder: the same embeddings (tiny random
//! models, and all-MiniLM-L6-v2 when it can be found), a gradient for every variable, a
//! loss that falls under plain SGD, and exports that the embedder loads back.

#![allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is its job

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, Var};
use distillery_operators::tiny::{write_tiny_bert, TinyBertSpec};
use distillery_operators::{
    Embedder, EmbedderOptions, Pooling, Student, StudentOptions, TextKind, TokenBatch,
};

const TRAINING: [&str; 6] = [
    "the quick brown fox jumps over the lazy dog",
    "vitamin d lowers the risk of respiratory infections in older adults",
    "a man is eating food while a woman plays the guitar",
    "streaming dataflow keeps memory bounded and pushes back on fast stages",
    "macrophages secrete cytokines after stimulation in vitro",
    "retrieval models rank passages by cosine similarity",
];

/// Texts from 3 to about 90 tokens, so every batch has padding.
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

fn batch_of(ids: Vec<Vec<u32>>) -> TokenBatch {
    TokenBatch::in_order(ids)
}

fn student_batch(s: &Student, texts: &[String]) -> TokenBatch {
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    batch_of(s.tokenize(&refs, TextKind::Passage).unwrap())
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_vec2::<f32>().unwrap()
}

fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len());
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0.0, f32::max)
}

/// The inference embedder's vectors for `batch`, one per row.
fn embedder_rows(e: &Embedder, batch: &TokenBatch) -> Vec<Vec<f32>> {
    let flat = e.embed_batch(batch).unwrap();
    flat.chunks(e.dim()).map(<[f32]>::to_vec).collect()
}

/// A fixed vector of `dim` values in [-1, 1] (a simple deterministic sequence).
fn direction(dim: usize) -> Tensor {
    let v: Vec<f32> = (0..dim)
        .map(|i| ((i * 37 + 11) % 23) as f32 / 11.0 - 1.0)
        .collect();
    Tensor::from_vec(v, (dim, 1), &Device::Cpu).unwrap()
}

/// Mean over rows of each embedding's dot product with a fixed direction.
fn projection_loss(embeddings: &Tensor) -> Tensor {
    let dim = embeddings.dim(1).unwrap();
    embeddings
        .matmul(&direction(dim))
        .unwrap()
        .mean_all()
        .unwrap()
}

/// Small enough that the projection loss falls step by step rather than jumping near its
/// floor at once (measured: 0.02 took it from -0.07 to -3.04 in one step; 0.001 from
/// 0.07 to -0.78, -1.47, -1.98, -2.34, -2.59).
const SGD_LR: f64 = 0.001;

fn sgd_step(vars: &[Var], loss: &Tensor, lr: f64) {
    let grads = loss.backward().unwrap();
    for v in vars {
        let g = grads.get(v.as_tensor()).unwrap();
        v.set(&(v.as_tensor() - (g * lr).unwrap()).unwrap())
            .unwrap();
    }
}

fn compare_with_embedder(dir: &Path, texts: &[String]) -> f32 {
    let s = Student::load(dir, &StudentOptions::default(), &Device::Cpu).unwrap();
    let e = Embedder::load(dir, &EmbedderOptions::default(), &Device::Cpu).unwrap();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let ids = s.tokenize(&refs, TextKind::Passage).unwrap();
    assert_eq!(ids, e.tokenize(&refs, TextKind::Passage).unwrap());
    let batch = batch_of(ids);
    let student = rows(&s.embed(&batch).unwrap());
    let no_grad = rows(&s.embed_no_grad(&batch).unwrap());
    assert_eq!(student, no_grad);
    max_abs_diff(&student, &embedder_rows(&e, &batch))
}

#[test]
fn tiny_embeddings_equal_the_embedder() {
    for (pooling, normalize) in [(Pooling::Mean, true), (Pooling::Cls, false)] {
        let d = tempfile::tempdir().unwrap();
        tiny(
            d.path(),
            &TinyBertSpec {
                pooling,
                normalize,
                ..TinyBertSpec::default()
            },
        );
        let diff = compare_with_embedder(d.path(), &texts());
        assert!(diff < 1e-5, "{pooling:?} normalize={normalize}: {diff}");
    }
}

#[path = "../../tests/support/minilm.rs"]
mod minilm;
use minilm::minilm_dir;

#[test]
fn minilm_embeddings_equal_the_embedder() {
    let Some(dir) = minilm_dir() else { return };
    let diff = compare_with_embedder(&dir, &texts());
    assert!(diff < 1e-5, "{diff}");
}

#[test]
fn every_variable_gets_a_nonzero_gradient() {
    let d = tempfile::tempdir().unwrap();
    tiny(d.path(), &TinyBertSpec::default());
    let s = Student::load(d.path(), &StudentOptions::default(), &Device::Cpu).unwrap();
    let named = s.named_vars();
    // 5 embedding tensors + 16 per layer, 2 layers.
    assert_eq!(named.len(), 37);
    let names: Vec<&str> = named.iter().map(|(n, _)| n.as_str()).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted);
    assert!(names.contains(&"encoder.layer.1.attention.self.query.weight"));
    assert_eq!(s.vars().len(), 37);
    assert_eq!(s.varmap().all_vars().len(), 37);

    let batch = student_batch(&s, &texts());
    let grads = projection_loss(&s.embed(&batch).unwrap())
        .backward()
        .unwrap();
    let largest = |v: &Var| -> Option<f32> {
        let g = grads.get(v.as_tensor())?;
        Some(
            g.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
        )
    };
    // Every variable is reached by the backward pass.
    assert!(named.iter().all(|(_, v)| largest(v).is_some()));
    // And every gradient is clearly non-zero, except the key biases': softmax over keys
    // ignores the constant `q . b` they add to every score, so theirs is zero up to
    // rounding (in PyTorch too; see `gradients_equal_pytorch`).
    let (keys, others): (Vec<_>, Vec<_>) = named
        .iter()
        .partition(|(n, _)| n.ends_with("attention.self.key.bias"));
    assert_eq!(keys.len(), 2);
    for (name, v) in others {
        let g = largest(v).unwrap();
        assert!(g > 1e-5, "{name}: {g}");
    }
    for (name, v) in keys {
        let g = largest(v).unwrap();
        assert!(g < 1e-7, "{name}: {g}");
    }

    // The no-grad pass records nothing: no variable gets a gradient.
    let grads = projection_loss(&s.embed_no_grad(&batch).unwrap())
        .backward()
        .unwrap();
    assert!(named
        .iter()
        .all(|(_, v)| grads.get(v.as_tensor()).is_none()));
}

/// The fixture of `tests/reference/student_reference.py`: transformers' gradients of a
/// pooled, normalised projection loss with respect to every parameter.
#[test]
fn gradients_equal_pytorch() {
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/student");
    let d = tempfile::tempdir().unwrap();
    // A tiny directory for the tokenizer and sentence-transformers files (mean pooling,
    // normalised), with the fixture's encoder in place of its own.
    tiny(d.path(), &TinyBertSpec::default());
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture.join(file), d.path().join(file)).unwrap();
    }
    let s = Student::load(d.path(), &StudentOptions::default(), &Device::Cpu).unwrap();
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("expected.json")).unwrap())
            .unwrap();
    let ids: Vec<Vec<u32>> = serde_json::from_value(expected["input_ids"].clone()).unwrap();
    let direction: Vec<f32> = serde_json::from_value(expected["direction"].clone()).unwrap();
    let want: Vec<Vec<f32>> = serde_json::from_value(expected["embeddings"].clone()).unwrap();
    let direction = Tensor::from_vec(direction, (32, 1), &Device::Cpu).unwrap();

    let embeddings = s.embed(&batch_of(ids)).unwrap();
    assert!(max_abs_diff(&rows(&embeddings), &want) < 1e-5);
    let loss = embeddings.matmul(&direction).unwrap().mean_all().unwrap();
    let want_loss = expected["loss"].as_f64().unwrap();
    assert!((loss.to_scalar::<f32>().unwrap() as f64 - want_loss).abs() < 1e-5);

    let grads = loss.backward().unwrap();
    let reference =
        candle_core::safetensors::load(fixture.join("grads.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(reference.len(), s.named_vars().len());
    let mut worst = (0.0f64, String::new());
    for (name, var) in s.named_vars() {
        let want = reference[&name].to_dtype(candle_core::DType::F32).unwrap();
        let got = grads.get(var.as_tensor()).unwrap();
        let scale = want
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        let diff = (got - &want).unwrap().abs().unwrap().max_all().unwrap();
        let diff = diff.to_scalar::<f32>().unwrap() as f64;
        if name.ends_with("attention.self.key.bias") {
            // Softmax over keys ignores a constant added to every key's score, and the key
            // bias adds `q . b` to all of them: its gradient is zero up to rounding.
            assert!(scale < 1e-12 && diff < 1e-6, "{name}: {scale} {diff}");
            continue;
        }
        assert!(scale > 1e-3, "{name}: reference gradient is ~0 ({scale})");
        let relative = diff / scale;
        if relative > worst.0 {
            worst = (relative, name.clone());
        }
    }
    eprintln!("largest gradient difference relative to the tensor's largest: {worst:?}");
    assert!(worst.0 < 1e-4, "{worst:?}");
}

#[test]
fn sgd_lowers_the_loss_on_a_fixed_batch() {
    let d = tempfile::tempdir().unwrap();
    tiny(d.path(), &TinyBertSpec::default());
    let s = Student::load(d.path(), &StudentOptions::default(), &Device::Cpu).unwrap();
    let batch = student_batch(&s, &texts());
    let vars = s.vars();
    let mut losses = Vec::new();
    for _ in 0..5 {
        let loss = projection_loss(&s.embed(&batch).unwrap());
        losses.push(loss.to_scalar::<f32>().unwrap());
        sgd_step(&vars, &loss, SGD_LR);
    }
    losses.push(
        projection_loss(&s.embed(&batch).unwrap())
            .to_scalar::<f32>()
            .unwrap(),
    );
    eprintln!("projection loss under SGD (lr {SGD_LR}): {losses:?}");
    assert!(losses.windows(2).all(|w| w[1] < w[0]), "{losses:?}");
    // Unit vectors against a direction of norm ~3.3: the loss lies in [-3.3, 3.3] and
    // starts near 0 (random embeddings); five steps must move it by a visible amount.
    assert!(losses[5] < losses[0] - 1.0, "{losses:?}");
}

#[test]
fn export_round_trips_the_trained_weights() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    tiny(&src, &TinyBertSpec::default());
    let s = Student::load(&src, &StudentOptions::default(), &Device::Cpu).unwrap();
    let batch = student_batch(&s, &texts());
    let vars = s.vars();
    sgd_step(&vars, &projection_loss(&s.embed(&batch).unwrap()), SGD_LR);
    let trained = rows(&s.embed(&batch).unwrap());

    let out = d.path().join("exported");
    let prompts = (Some("query: ".to_string()), None);
    s.export_sentence_transformers(&src, &out, prompts.clone())
        .unwrap();
    // A second export replaces the first whole, and leaves no temporary directory.
    s.export_sentence_transformers(&src, &out, prompts).unwrap();
    let mut siblings: Vec<String> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    siblings.sort();
    assert_eq!(siblings, ["exported", "src"]);

    let e = Embedder::load(&out, &EmbedderOptions::default(), &Device::Cpu).unwrap();
    assert!(e.normalizes());
    assert_eq!(e.pooling(), Pooling::Mean);
    assert_eq!(e.max_seq_length(), 128); // the passage maximum, capped at 128 positions
    assert_eq!(e.prefix(TextKind::Query), "query: ");
    assert_eq!(e.prefix(TextKind::Passage), "");
    let exported = embedder_rows(&e, &batch);
    assert!(max_abs_diff(&trained, &exported) < 1e-5);

    let original = Embedder::load(&src, &EmbedderOptions::default(), &Device::Cpu).unwrap();
    let before = embedder_rows(&original, &batch);
    let moved = max_abs_diff(&before, &exported);
    assert!(
        moved > 1e-3,
        "the exported weights are the untrained ones: {moved}"
    );

    let st: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("config_sentence_transformers.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(st["prompts"], serde_json::json!({"query": "query: "}));
    assert!(st["default_prompt_name"].is_null());
    let modules = std::fs::read_to_string(out.join("modules.json")).unwrap();
    assert!(modules.contains("sentence_transformers.models.Normalize"));
}

#[test]
fn saved_weights_are_the_variables_by_hugging_face_name() {
    let d = tempfile::tempdir().unwrap();
    tiny(d.path(), &TinyBertSpec::default());
    let s = Student::load(d.path(), &StudentOptions::default(), &Device::Cpu).unwrap();
    // The first name in sorted order: `embeddings.LayerNorm.bias`, 32 values.
    let (first_name, first) = &s.named_vars()[0];
    assert_eq!(first_name, "embeddings.LayerNorm.bias");
    first.set(&first.as_tensor().ones_like().unwrap()).unwrap();
    let path = d.path().join("weights.safetensors");
    s.save_weights(&path).unwrap();
    let saved = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    assert_eq!(saved.len(), 37);
    for (name, var) in s.named_vars() {
        let t = &saved[&name];
        let diff = (t - var.as_tensor())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{name}");
    }
    // Set to ones above.
    let first = &saved["embeddings.LayerNorm.bias"];
    assert_eq!(first.sum_all().unwrap().to_scalar::<f32>().unwrap(), 32.0);
}

/// Rewrites the tiny model's weights through `edit`.
fn edit_weights(dir: &Path, edit: impl FnOnce(HashMap<String, Tensor>) -> HashMap<String, Tensor>) {
    let path = dir.join("model.safetensors");
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    candle_core::safetensors::save(&edit(tensors), &path).unwrap();
}

#[test]
fn bert_prefixed_checkpoint_loads_under_unprefixed_names() {
    let d = tempfile::tempdir().unwrap();
    tiny(d.path(), &TinyBertSpec::default());
    let plain = Student::load(d.path(), &StudentOptions::default(), &Device::Cpu).unwrap();
    let batch = student_batch(&plain, &texts());
    let expected = rows(&plain.embed(&batch).unwrap());
    let h = 32;
    edit_weights(d.path(), |t| {
        let mut out: HashMap<String, Tensor> = t
            .into_iter()
            .map(|(k, v)| (format!("bert.{k}"), v))
            .collect();
        out.insert(
            "bert.pooler.dense.weight".into(),
            Tensor::ones((h, h), candle_core::DType::F32, &Device::Cpu).unwrap(),
        );
        out.insert(
            "bert.pooler.dense.bias".into(),
            Tensor::zeros(h, candle_core::DType::F32, &Device::Cpu).unwrap(),
        );
        out
    });
    let prefixed = Student::load(d.path(), &StudentOptions::default(), &Device::Cpu).unwrap();
    assert_eq!(prefixed.named_vars().len(), 37);
    assert!(prefixed
        .named_vars()
        .iter()
        .all(|(n, _)| !n.starts_with("bert.") && !n.starts_with("pooler.")));
    assert_eq!(rows(&prefixed.embed(&batch).unwrap()), expected);
    // The untrained pooler is written back unprefixed, so transformers finds it.
    let path = d.path().join("resaved.safetensors");
    prefixed.save_weights(&path).unwrap();
    let saved = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    assert_eq!(saved.len(), 39);
    assert_eq!(
        saved["pooler.dense.weight"]
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        (h * h) as f32
    );
}

#[test]
fn a_wrong_shape_is_named() {
    let d = tempfile::tempdir().unwrap();
    tiny(d.path(), &TinyBertSpec::default());
    let name = "encoder.layer.1.intermediate.dense.weight";
    edit_weights(d.path(), |mut t| {
        t.insert(
            name.into(),
            Tensor::zeros((64, 31), candle_core::DType::F32, &Device::Cpu).unwrap(),
        );
        t
    });
    let e = Student::load(d.path(), &StudentOptions::default(), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains(name), "{e}");
    assert!(e.contains("shape [64, 31], expected [64, 32]"), "{e}");
}

#[test]
fn queries_and_passages_have_their_own_length_and_prompt() {
    let d = tempfile::tempdir().unwrap();
    tiny(d.path(), &TinyBertSpec::default());
    let options = StudentOptions {
        query_max_length: 6,
        passage_max_length: 1000,
        query_prefix: Some("lazy dog ".into()),
        passage_prefix: None,
    };
    let s = Student::load(d.path(), &options, &Device::Cpu).unwrap();
    assert_eq!(s.max_length(TextKind::Query), 6);
    assert_eq!(s.max_length(TextKind::Passage), 128); // capped at the positions
    let long = TRAINING[0];
    let q = s.tokenize(&[long], TextKind::Query).unwrap();
    let p = s
        .tokenize(&[&format!("lazy dog {long}")], TextKind::Passage)
        .unwrap();
    // [CLS] and [SEP] are ids 2 and 3; the query keeps [CLS] + 4 tokens + [SEP].
    assert_eq!(q[0].len(), 6);
    assert_eq!(q[0][..5], p[0][..5]);
    assert_eq!(q[0][5], 3);
    assert_eq!(p[0][0], 2);
    assert!(p[0].len() > 6);
}

#[test]
fn an_empty_batch_embeds_to_no_rows() {
    let d = tempfile::tempdir().unwrap();
    tiny(d.path(), &TinyBertSpec::default());
    let s = Student::load(d.path(), &StudentOptions::default(), &Device::Cpu).unwrap();
    let out = s.embed(&TokenBatch { rows: Vec::new() }).unwrap();
    assert_eq!(out.dims(), [0, 32]);
}

/// On the real all-MiniLM-L6-v2: a 16 x 128 batch reaches all 101 variables, and the
/// forward pass without gradients gives the same rows. (Timings belong in benchmarks.)
#[test]
fn minilm_forward_backward_reaches_every_variable() {
    let Some(dir) = minilm_dir() else { return };
    let s = Student::load(&dir, &StudentOptions::default(), &Device::Cpu).unwrap();
    assert_eq!(s.named_vars().len(), 5 + 6 * 16);
    let long = TRAINING.join(" ").repeat(4);
    let ids = s.tokenize(&[long.as_str()], TextKind::Passage).unwrap()[0][..128].to_vec();
    let batch = batch_of(vec![ids; 16]);
    let emb = s.embed(&batch).unwrap();
    let grads = projection_loss(&emb).backward().unwrap();
    let no_grad = s.embed_no_grad(&batch).unwrap();
    assert_eq!(rows(&emb), rows(&no_grad));
    let reached = s
        .named_vars()
        .iter()
        .filter(|(_, v)| grads.get(v.as_tensor()).is_some())
        .count();
    assert_eq!(reached, 101);
}
