//! `distillery eval` with the real all-MiniLM-L6-v2 on the shipped SciFact subset equals
//! sentence-transformers + pytrec_eval on the same files (the committed fixture was made
//! by benches/compare/beir_eval_st.py). Skips, saying so, when the model is absent.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::path::PathBuf;

use distillery::config::EmbedSettings;
use distillery::eval::EvalOptions;
use distillery::jobs::eval::{run_eval, EvalSettings};

#[path = "support/minilm.rs"]
mod minilm;
use minilm::minilm_dir;

#[test]
fn scifact_mini_metrics_equal_sentence_transformers_and_pytrec_eval() {
    let Some(model) = minilm_dir() else { return };
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("tests/fixtures/scifact_mini_st_minilm.json")).unwrap(),
    )
    .unwrap();
    let run = tempfile::tempdir().unwrap();
    let settings = EvalSettings {
        embed: EmbedSettings {
            model: Some(model.display().to_string()),
            quiet: true,
            ..EmbedSettings::default()
        },
        dataset: root.join("datasets/scifact-mini"),
        split: "test".into(),
        run_dir: run.path().to_path_buf(),
        eval: EvalOptions::default(),
        threads: 2,
        teachers: None,
    };
    let (outcome, _) = run_eval(&settings).unwrap();
    assert_eq!(outcome.queries as u64, fixture["queries"].as_u64().unwrap());
    assert_eq!(
        outcome.passages as u64,
        fixture["passages"].as_u64().unwrap()
    );
    for (ours, key) in [
        (outcome.ndcg_at_10, "ndcg_at_10"),
        (outcome.recall_at_100, "recall_at_100"),
        (outcome.mrr_at_10, "mrr_at_10"),
    ] {
        let want = fixture[key].as_f64().unwrap();
        let got = ours.unwrap();
        // The bar is 0.002; embeddings equal to 1e-5 leave rankings identical
        // here, so the metrics agree far closer.
        assert!(
            (got - want).abs() < 1e-4,
            "{key}: distillery {got}, reference {want}"
        );
    }
    // The run file holds every query's ranking: 127 queries x 100 results.
    let lines = std::fs::read_to_string(&outcome.run_file)
        .unwrap()
        .lines()
        .count();
    assert_eq!(lines, 127 * 100);
}
