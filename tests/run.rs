//! `distillery run`: the whole recipe in one command does the same work as the stage
//! commands one by one (the same examples, the same model bytes), recomputes nothing
//! after them, and ends with an evaluation of the base and the fine-tuned model, a
//! summary and a report whose every plot is drawn.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::path::{Path, PathBuf};

#[path = "support/recipe.rs"]
mod recipe;
use recipe::{files, fixture, ok};

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn run_does_what_the_stage_commands_do_and_reports_it() {
    let one = fixture(false);
    let steps = fixture(false);
    ok(&["run", "--config", "pipeline.toml", "--quiet"], one.path());
    for command in ["generate", "mine", "label", "train"] {
        ok(
            &[command, "--config", "pipeline.toml", "--quiet"],
            steps.path(),
        );
    }
    let (a, b) = (one.path().join("run"), steps.path().join("run"));
    // The same examples and the same model, byte for byte.
    assert_eq!(
        files(&a.join("stages/examples")),
        files(&b.join("stages/examples"))
    );
    let model = files(&a.join("train/best-model"));
    assert!(model
        .iter()
        .any(|(p, _)| p == Path::new("model.safetensors")));
    assert_eq!(model, files(&b.join("train/best-model")));
    assert_eq!(
        std::fs::read(a.join("train/loss-log.csv")).unwrap(),
        std::fs::read(b.join("train/loss-log.csv")).unwrap()
    );

    // After the stage commands, run recomputes nothing of theirs: it only evaluates.
    ok(
        &["run", "--config", "pipeline.toml", "--quiet"],
        steps.path(),
    );
    assert_eq!(json(&b.join("generate-report.json"))["generated_now"], 0);
    let summary = json(&b.join("run-summary.json"));
    assert_eq!(summary["label"]["scored_now"], serde_json::json!([0, 0, 0]));
    assert_eq!(summary["mine"]["reused"], true);
    // Retrieval read its lists back: nothing scored.
    let retrievals = summary["mine"]["retrievals"].as_array().unwrap();
    assert_eq!(retrievals.len(), 1);
    assert_eq!(retrievals[0]["reused"], true, "{retrievals:?}");
    assert_eq!(retrievals[0]["lists_retrieved"], 0);
    assert_eq!(retrievals[0]["lists_repaired"], 0);
    // The only device work of that run: evaluating the two models, and the teacher
    // check's new texts and pairs (the held-out queries, which no stage command meets).
    let stages = summary["device_stages"].as_array().unwrap();
    assert!(!stages.is_empty());
    for s in stages {
        let label = s["label"].as_str().unwrap();
        assert!(
            label.starts_with("evaluate") || label.starts_with("teacher "),
            "{s}"
        );
    }
    assert_eq!(model, files(&b.join("train/best-model")));
    // Its report still draws the dev loss of the epochs `train` finished.
    let rerun = std::fs::read_to_string(b.join("report.html")).unwrap();
    assert!(rerun.contains("data-plot=\"dev-loss\""));
    // ...and says that everything was kept: every query list, every pair score.
    let lists = retrievals[0]["queries"].as_u64().unwrap();
    assert!(
        rerun.contains(&format!(
            "<tr><td>r0-retrieved</td><td>{lists}</td><td>0</td><td>-</td>"
        )),
        "the reuse table"
    );
    let pairs = summary["label"]["pairs"].as_u64().unwrap();
    assert!(rerun.contains(&format!("<tr><td>teacher 1</td><td>{pairs}</td><td>0</td>")));

    // Base and fine-tuned on the synthetic set and the BEIR split, with metrics in [0, 1].
    let summary = json(&a.join("run-summary.json"));
    // Every passage of the fixture embedded once by the retriever, none from a memo yet.
    let passages: Vec<(u64, u64)> = summary["device_stages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["label"] == "retriever 0: r0-passages")
        .map(|s| (s["run"].as_u64().unwrap(), s["memoised"].as_u64().unwrap()))
        .collect();
    assert_eq!(passages, [(60, 0)]);
    let evaluations = summary["evaluations"].as_array().unwrap();
    let sets: Vec<&str> = evaluations
        .iter()
        .map(|e| e["set"].as_str().unwrap())
        .collect();
    assert_eq!(sets.len(), 2, "{sets:?}");
    assert_eq!(sets[0], "synthetic");
    assert!(sets[1].starts_with("beir:"), "{sets:?}");
    // The synthetic set: the 5 held-out passages' three extractive queries each.
    assert_eq!(evaluations[0]["queries"], 15);
    assert_eq!(evaluations[1]["queries"], 10);
    for e in evaluations {
        for model in ["base", "fine_tuned"] {
            for m in ["ndcg_at_10", "recall_at_100", "mrr_at_10"] {
                let v = e[model][m].as_f64().unwrap();
                assert!((0.0..=1.0).contains(&v), "{model} {m} = {v}");
            }
        }
    }
    // The teacher check, before training, on the same sets: the base student's metrics
    // are the evaluation's (the same retrieval, read back), the teachers' are theirs.
    let checks = summary["teacher_checks"].as_array().unwrap();
    assert_eq!(checks.len(), 2);
    for (check, evaluation) in checks.iter().zip(evaluations) {
        assert_eq!(check["set"], evaluation["set"]);
        assert_eq!(check["queries"], evaluation["queries"]);
        assert_eq!(check["student"], evaluation["base"], "{check}");
        for m in ["ndcg_at_10", "recall_at_100", "mrr_at_10"] {
            let v = check["teachers"][m].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&v), "teachers {m} = {v}");
        }
        // Reranking the student's top 100 cannot change what is in it.
        assert_eq!(
            check["teachers"]["recall_at_100"],
            check["student"]["recall_at_100"]
        );
    }
    // `eval --teachers` is the same check as a command of its own: on the BEIR copy with
    // the student's model it gives the run's numbers.
    ok(
        &[
            "eval",
            "--dataset",
            "beir",
            "--model",
            "model",
            "--teachers",
            "pipeline.toml",
            "--run-dir",
            "eval-run",
            "--json",
            "eval.json",
            "--quiet",
        ],
        one.path(),
    );
    let eval = json(&one.path().join("eval.json"));
    assert_eq!(eval["teachers"], checks[1]["teachers"], "{eval}");
    assert_eq!(eval["ndcg_at_10"], checks[1]["student"]["ndcg_at_10"]);
    let parts: Vec<&str> = summary["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["part"].as_str().unwrap())
        .collect();
    assert_eq!(
        parts,
        [
            "generate",
            "mine",
            "label",
            "check teachers",
            "train",
            "evaluate"
        ]
    );

    // The report: one file, every plot drawn, nothing fetched from elsewhere.
    let html = std::fs::read_to_string(a.join("report.html")).unwrap();
    for plot in [
        "metrics", "funnel", "time", "busy", "queue", "loss", "dev-loss",
    ] {
        let at = html
            .find(&format!("data-plot=\"{plot}\""))
            .unwrap_or_else(|| panic!("no {plot} plot"));
        let svg = &html[at..html[at..].find("</svg>").unwrap() + at];
        assert!(
            svg.contains("<rect") || svg.contains("<polyline"),
            "the {plot} plot drew nothing"
        );
    }
    assert!(!html.contains("src=") && !html.contains("<link ") && !html.contains("url("));
    render_in_chromium(&a.join("report.html"));
}

/// Headless Chromium, where installed.
fn chromium() -> Option<PathBuf> {
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .flat_map(|name| {
            std::env::var_os("PATH")
                .map(|p| {
                    std::env::split_paths(&p)
                        .map(|d| d.join(name))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        })
        .find(|p| p.is_file())
}

/// The report loads in headless Chromium without a console message, and every plot drew
/// something of size (its measured box, recorded by the page's own check).
fn render_in_chromium(report: &Path) {
    let Some(browser) = chromium() else {
        return eprintln!("SKIPPED: no chromium on PATH (apt-get install chromium)");
    };
    let profile = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=5000",
            &format!("--user-data-dir={}", profile.path().display()),
            "--dump-dom",
            &format!("file://{}", report.display()),
        ])
        .output()
        .unwrap();
    let dom = String::from_utf8_lossy(&out.stdout);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(!log.contains(":CONSOLE"), "console output: {log}");
    let at = dom
        .find("data-plots=\"")
        .expect("the page's check did not run")
        + 12;
    let plots = &dom[at..at + dom[at..].find('"').unwrap()];
    let drawn: Vec<(&str, &str)> = plots
        .split(',')
        .map(|p| p.split_once(':').unwrap())
        .collect();
    let names: Vec<&str> = drawn.iter().map(|d| d.0).collect();
    assert_eq!(
        names,
        ["metrics", "funnel", "time", "busy", "queue", "loss", "dev-loss"],
        "{plots}"
    );
    for (name, size) in drawn {
        let (w, h) = size.split_once('x').unwrap();
        let (w, h): (u32, u32) = (w.parse().unwrap(), h.parse().unwrap());
        assert!(w > 50 && h > 10, "the {name} plot drew {size}");
    }
}

#[test]
fn the_teacher_check_is_skipped_when_the_configuration_says_so() {
    let dir = fixture(false);
    let config = dir.path().join("pipeline.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace(
            "dataset = \"beir\"",
            "dataset = \"beir\"\ncheck_teachers = false",
        ),
    )
    .unwrap();
    ok(&["run", "--config", "pipeline.toml", "--quiet"], dir.path());
    let summary = json(&dir.path().join("run/run-summary.json"));
    assert_eq!(summary["teacher_checks"], serde_json::json!([]));
    assert_eq!(summary["evaluations"].as_array().unwrap().len(), 2);
}
