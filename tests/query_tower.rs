//! Query-tower training (`[train] passage_encoder = "frozen"`), end to end: `distillery
//! run` on the recipe fixture trains only how queries are embedded, exports a
//! sentence-transformers Router whose document route is the base model's files
//! unchanged, and evaluates the fine-tuned model without embedding a passage again.

#![allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is its job

#[path = "support/recipe.rs"]
mod recipe;

use std::path::Path;

use distillery_operators::{Embedder, EmbedderOptions, TextKind, TokenBatch, TokenizedText};

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// `texts` embedded as `kind` by `model`, one text at a time.
fn embed(model: &Embedder, texts: &[&str], kind: TextKind) -> Vec<Vec<f32>> {
    model
        .tokenize(texts, kind)
        .unwrap()
        .into_iter()
        .map(|ids| {
            let batch = TokenBatch {
                rows: vec![TokenizedText::new(0, ids)],
            };
            model.embed_batch_as(&batch, kind).unwrap()
        })
        .collect()
}

/// Rows summed from the device-stage journal whose label contains every one of `words`.
fn journal_rows(run: &Path, words: &[&str]) -> u64 {
    std::fs::read_to_string(run.join("device-stages.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| {
            let label = v["label"].as_str().unwrap_or("");
            words.iter().all(|w| label.contains(w))
        })
        .map(|v| v["rows"].as_u64().unwrap())
        .sum()
}

/// The recipe fixture run by `distillery run`, its passage encoder frozen or not;
/// returns the fixture and the run's stdout.
fn run_fixture(frozen: bool) -> (tempfile::TempDir, String) {
    let dir = recipe::fixture(false);
    let d = dir.path();
    if frozen {
        let config = std::fs::read_to_string(d.join("pipeline.toml")).unwrap();
        std::fs::write(
            d.join("pipeline.toml"),
            config.replace("[train]\n", "[train]\npassage_encoder = \"frozen\"\n"),
        )
        .unwrap();
    }
    let out = recipe::distillery(&["run", "--config", "pipeline.toml"], d);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    (dir, stdout)
}

#[test]
fn a_frozen_passage_encoder_trains_queries_only_and_keeps_the_index() {
    let (dir, stdout) = run_fixture(true);
    let d = dir.path();
    let run = d.join("run");
    let model = run.join("train/best-model");

    // The export is a Router: the query route the trained student, the document route
    // the base model's own files, byte for byte.
    let modules = json(&model.join("modules.json"));
    assert_eq!(modules[0]["type"], "sentence_transformers.models.Router");
    let router = json(&model.join("router_config.json"));
    assert_eq!(router["parameters"]["default_route"], "document");
    let route = |name: &str| -> Vec<String> {
        router["structure"][name]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        route("document"),
        [
            "document_0_Transformer",
            "document_1_Pooling",
            "document_2_Normalize"
        ]
    );
    for file in ["config.json", "tokenizer.json", "model.safetensors"] {
        assert_eq!(
            std::fs::read(model.join("document_0_Transformer").join(file)).unwrap(),
            std::fs::read(d.join("model").join(file)).unwrap(),
            "{file}"
        );
    }
    let trained = std::fs::read(model.join("query_0_Transformer/model.safetensors")).unwrap();
    assert_ne!(
        trained,
        std::fs::read(d.join("model/model.safetensors")).unwrap()
    );

    // distillery reads the Router: passages as the base model embeds them, bit for
    // bit; queries by the trained weights, which differ from the base's.
    let options = EmbedderOptions::default();
    let cpu = candle_core::Device::Cpu;
    let routed = Embedder::load(&model, &options, &cpu).unwrap();
    let base = Embedder::load(&d.join("model"), &options, &cpu).unwrap();
    assert!(routed.has_query_tower() && !base.has_query_tower());
    let texts = [
        "Microstructural development of human newborn cerebral white matter",
        "vitamin d and fractures",
    ];
    assert_eq!(
        embed(&routed, &texts, TextKind::Passage),
        embed(&base, &texts, TextKind::Passage)
    );
    let queries = embed(&routed, &texts, TextKind::Query);
    assert_ne!(queries, embed(&base, &texts, TextKind::Query));
    // The query route is the trained weights under the base model's pooling and
    // normalisation, truncated at the training's query length: a plain model directory
    // of those files embeds queries the same.
    let plain = d.join("plain-query-model");
    std::fs::create_dir_all(plain.join("1_Pooling")).unwrap();
    for file in [
        "config.json",
        "tokenizer.json",
        "model.safetensors",
        "sentence_bert_config.json",
    ] {
        std::fs::copy(
            model.join("query_0_Transformer").join(file),
            plain.join(file),
        )
        .unwrap();
    }
    for file in ["modules.json", "1_Pooling/config.json"] {
        std::fs::copy(d.join("model").join(file), plain.join(file)).unwrap();
    }
    let plain = Embedder::load(&plain, &options, &cpu).unwrap();
    assert_eq!(queries, embed(&plain, &texts, TextKind::Query));

    // The training took the base passages from the store (the teacher check embedded
    // the corpus with the base student before training), and the fine-tuned model's
    // evaluation embedded queries only: its passages are the base model's index.
    let summary = json(&run.join("run-summary.json"));
    let frozen = &summary["train"]["frozen_passages"];
    assert!(frozen["passages"].as_u64().unwrap() > 0, "{frozen}");
    assert_eq!(frozen["embedded"], 0, "{frozen}");
    assert!(stdout.contains("frozen passage encoder:"), "{stdout}");
    assert_eq!(
        journal_rows(&run, &["evaluate fine-tuned", "embed passages"]),
        0
    );
    assert!(journal_rows(&run, &["evaluate fine-tuned", "embed queries"]) > 0);
    // Where both encoders train, the fine-tuned model embeds the corpus again: once
    // per query set's corpus (the fixture's and its BEIR copy hold the same passages,
    // found in the memo the second time).
    let (shared, _) = run_fixture(false);
    let shared = shared.path().join("run");
    assert_eq!(
        journal_rows(&shared, &["evaluate fine-tuned", "embed passages"]),
        60
    );
    assert!(json(&shared.join("run-summary.json"))["train"]["frozen_passages"].is_null());
    let evaluations = summary["evaluations"].as_array().unwrap();
    assert_eq!(evaluations.len(), 2, "{summary}");
    for e in evaluations {
        assert!(e["fine_tuned"]["ndcg_at_10"].as_f64().is_some(), "{e}");
    }
}
