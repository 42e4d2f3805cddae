//! The stage commands as a user runs them, one after another on one run directory: no
//! command loses another's work, bad settings are refused before any work starts, and
//! every bad record is listed once and counted by every command that met it.
//!
//! Each regression here failed before the fix it guards:
//! - `label` then `generate` generated every query again: `label`, `mine` and `generate`
//!   each opened their own store on the run directory and the outer one's manifest write
//!   dropped the query cache the inner one had committed;
//! - every stage re-created `quarantine.jsonl`, so only the last stage's entries stayed;
//! - a teacher with a wrong path was found after the retrievers had embedded everything;
//! - an empty corpus made `generate` succeed with nothing.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

#[path = "support/recipe.rs"]
mod recipe;
use recipe::{distillery, fixture, ok, write_config, BAD_PASSAGE};

/// What the last run of generation (alone or inside another command) generated now.
fn generated_now(dir: &Path) -> u64 {
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("run/generate-report.json")).unwrap(),
    )
    .unwrap();
    report["generated_now"].as_u64().unwrap()
}

#[test]
fn no_order_of_the_stage_commands_generates_a_query_twice() {
    let orders: [&[&str]; 5] = [
        &["label", "generate"],
        &["mine", "label", "generate"],
        &["train", "mine", "generate"],
        &["generate", "train", "label", "mine"],
        &["label", "train", "generate", "mine"],
    ];
    for order in orders {
        let dir = fixture(false);
        let d = dir.path();
        let mut first = true;
        for command in order {
            let mut args = vec![*command, "--config", "pipeline.toml", "--quiet"];
            if *command == "generate" {
                args.extend(["--json", "generate.json"]);
            }
            ok(&args, d);
            let now = generated_now(d);
            if first {
                assert!(now > 0, "{order:?}: {command} generated nothing");
            } else {
                assert_eq!(now, 0, "{order:?}: {command} generated {now} queries again");
            }
            if *command == "generate" {
                let json: serde_json::Value = serde_json::from_str(
                    &std::fs::read_to_string(d.join("generate.json")).unwrap(),
                )
                .unwrap();
                assert_eq!(
                    json["generated_now"],
                    if first {
                        json["requests"].clone()
                    } else {
                        0.into()
                    }
                );
            }
            first = false;
        }
        // Nothing of a stage is lost: a fresh open of the run finds no orphan to remove,
        // and the query cache is still listed.
        let manifest: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(d.join("run/manifest.json")).unwrap())
                .unwrap();
        let stages = manifest["stages"].as_object().unwrap();
        assert!(
            stages.keys().any(|s| s.starts_with("queries-")),
            "{order:?}: no query cache in {:?}",
            stages.keys().collect::<Vec<_>>()
        );
    }
}

/// The lines of the run's quarantine, parsed, by (file relative to `dir`, line).
fn quarantine(dir: &Path) -> HashMap<(String, u64), usize> {
    let mut seen = HashMap::new();
    let text = std::fs::read_to_string(dir.join("run/quarantine.jsonl")).unwrap();
    let root = dir.canonicalize().unwrap();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        // Paths as the command was given them: relative ones to its working directory.
        let path = dir.join(v["file"].as_str().unwrap());
        let file = path
            .canonicalize()
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .strip_prefix(&root)
            .unwrap()
            .display()
            .to_string();
        *seen.entry((file, v["line"].as_u64().unwrap())).or_insert(0) += 1;
    }
    seen
}

#[test]
fn every_bad_record_is_listed_once_and_every_command_counts_it() {
    let dir = fixture(true);
    let d = dir.path();
    let expected: HashMap<(String, u64), usize> = [
        (("corpus.jsonl".to_string(), 8), 1),
        (("queries.jsonl".to_string(), 11), 1),
        (("qrels.tsv".to_string(), 12), 1),
    ]
    .into_iter()
    .collect();
    // Every command over the corpus meets the bad passage; those that read the human
    // queries meet the other two.
    for (command, skipped) in [
        ("train", 3),
        ("generate", 1),
        ("mine", 3),
        ("label", 3),
        ("train", 3),
    ] {
        let stderr = ok(&[command, "--config", "pipeline.toml", "--quiet"], d);
        let said = format!("skipped {skipped} bad record(s)");
        assert!(
            stderr.contains(&said),
            "{command}: expected `{said}` in {stderr}"
        );
        assert!(stderr.contains("quarantine.jsonl"), "{command}: {stderr}");
        assert_eq!(quarantine(d), expected, "after {command}");
    }
    // `run` also evaluates on the BEIR copy, whose three files have a bad record each.
    // Its corpus has the bytes of the pipeline's, whose embeddings the run has already
    // (the same stage key), but the teacher check reads its passages' texts from it, so
    // its bad record is listed too, under its own file.
    let stderr = ok(&["run", "--config", "pipeline.toml", "--quiet"], d);
    assert!(stderr.contains("skipped 6 bad record(s)"), "run: {stderr}");
    let mut expected = expected;
    for (file, line) in [
        ("beir/corpus.jsonl", 8),
        ("beir/queries.jsonl", 11),
        ("beir/qrels/test.tsv", 12),
    ] {
        expected.insert((file.to_string(), line), 1);
    }
    assert_eq!(quarantine(d), expected, "after run");
    // `--on-bad-record fail` on the command line overrides the file's `skip`.
    let out = distillery(
        &[
            "mine",
            "--config",
            "pipeline.toml",
            "--on-bad-record",
            "fail",
            "--quiet",
        ],
        d,
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The first bad record read: generation reads the corpus before mining reads the
    // human queries.
    assert!(stderr.contains("corpus.jsonl:8 field `_id`"), "{stderr}");
}

#[test]
fn a_wrong_teacher_path_is_refused_at_once_by_its_field_before_any_embedding() {
    let dir = fixture(false);
    let d = dir.path();
    write_config(d, "models/no-such-teacher", "fail");
    for command in ["label", "train"] {
        let start = Instant::now();
        let out = distillery(&[command, "--config", "pipeline.toml", "--quiet"], d);
        let took = start.elapsed();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("teachers[1].model = \"models/no-such-teacher\""),
            "{stderr}"
        );
        assert!(stderr.starts_with("error: "), "{stderr}");
        assert!(!stderr.to_lowercase().contains("backtrace"), "{stderr}");
        assert!(took < Duration::from_secs(1), "{command} took {took:?}");
        // Not one stage ran.
        let stages = d.join("run/stages");
        let written = std::fs::read_dir(&stages).map(|e| e.count()).unwrap_or(0);
        assert_eq!(written, 0, "{command} wrote stages before refusing");
    }
    // A directory without the weights is named with what is missing.
    std::fs::create_dir_all(d.join("models/no-such-teacher")).unwrap();
    std::fs::write(d.join("models/no-such-teacher/config.json"), "{}").unwrap();
    let out = distillery(&["label", "--config", "pipeline.toml"], d);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no tokenizer.json in that directory"),
        "{stderr}"
    );
    assert!(
        stderr.contains("no model.safetensors in that directory"),
        "{stderr}"
    );
}

#[test]
fn an_empty_corpus_or_query_set_is_an_error_naming_the_file() {
    let dir = fixture(false);
    let d = dir.path();
    std::fs::write(d.join("corpus.jsonl"), "").unwrap();
    for command in ["generate", "mine", "label", "train"] {
        let out = distillery(&[command, "--config", "pipeline.toml", "--quiet"], d);
        assert!(
            !out.status.success(),
            "{command} succeeded on an empty corpus"
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("corpus = \"corpus.jsonl\""),
            "{command}: {stderr}"
        );
        assert!(stderr.contains("the file is empty"), "{command}: {stderr}");
    }
    // eval reads its dataset directly: the same error from the reader.
    std::fs::create_dir_all(d.join("beir/qrels")).unwrap();
    std::fs::write(d.join("beir/corpus.jsonl"), "\n\n").unwrap();
    std::fs::copy(d.join("queries.jsonl"), d.join("beir/queries.jsonl")).unwrap();
    std::fs::copy(d.join("qrels.tsv"), d.join("beir/qrels/test.tsv")).unwrap();
    let out = distillery(&["eval", "--dataset", "beir", "--quiet"], d);
    assert!(!out.status.success(), "eval succeeded on an empty corpus");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("corpus.jsonl: no records"), "{stderr}");

    // Every corpus record bad: an error that says so and where they went.
    let dir = fixture(false);
    let d = dir.path();
    std::fs::write(
        d.join("corpus.jsonl"),
        format!("{BAD_PASSAGE}\n{BAD_PASSAGE}\n"),
    )
    .unwrap();
    let out = distillery(
        &[
            "generate",
            "--config",
            "pipeline.toml",
            "--on-bad-record",
            "skip",
        ],
        d,
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no records: all 2 were bad"), "{stderr}");
    assert!(stderr.contains("quarantine.jsonl"), "{stderr}");

    // No query has a relevant passage, or none in the corpus: mine says why instead of
    // mining nothing.
    for (qrels, said) in [
        ("q1\t4983\t0\n", "no queries to mine candidates for"),
        (
            "q1\tnowhere\t1\n",
            "no query kept; candidates: 1 queries in",
        ),
    ] {
        let dir = fixture(false);
        let d = dir.path();
        std::fs::write(
            d.join("qrels.tsv"),
            format!("query-id\tcorpus-id\tscore\n{qrels}"),
        )
        .unwrap();
        let toml = std::fs::read_to_string(d.join("pipeline.toml")).unwrap();
        let without_generate = toml.replace("[generate]\ngenerator = \"extractive\"\n", "");
        assert_ne!(without_generate, toml);
        std::fs::write(d.join("pipeline.toml"), without_generate).unwrap();
        let out = distillery(&["mine", "--config", "pipeline.toml", "--quiet"], d);
        assert!(!out.status.success(), "{qrels}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(said), "{stderr}");
    }
}
