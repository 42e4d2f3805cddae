//! Checks of everything a command will read, before its first stage starts: a missing
//! teacher found only after an hour of embedding is an hour lost.
//!
//! [`Pipeline::preflight`] looks at every file and model the command's stages need (the
//! corpus, the queries and qrels, the generator's model, tokenizer and example pools,
//! every retriever, teacher and the student) and reports every problem at once, each
//! naming the configuration field, the value as written and what is wrong with it:
//! `teachers[1].model = "models/ce" (/runs/models/ce): no config.json in that directory
//! (the model's family and shape)`. It reads no record and loads no weights, so it takes
//! milliseconds; the readers and loaders still check contents when they run.

use std::path::Path;

use distillery_operators::{cross_encoder, embedder};

use super::{Pipeline, TeacherKind};
use crate::error::EngineError;
use crate::model::find_in_hub_cache;

/// How far into the recipe a command goes: each part needs what the parts before it do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum RunPart {
    /// `generate`: the corpus and `[generate]`.
    Generate,
    /// `mine`: also the queries and the retrievers.
    Mine,
    /// `label`: also the teachers.
    Label,
    /// `train`: also the student.
    Train,
    /// `run`: also what `[eval]` evaluates on.
    Evaluate,
}

/// The files a model directory of some kind must hold, and why.
type RequiredFiles = [(&'static str, &'static str); 3];

impl Pipeline {
    /// Checks every input `part` needs; one error listing every problem found.
    pub fn preflight(&self, part: RunPart) -> Result<(), EngineError> {
        let mut problems = Vec::new();
        let file = &self.file;
        check_file("corpus", &file.corpus, &self.corpus, true, &mut problems);
        if let (Some(written), Some(generate)) = (&file.generate, &self.generate) {
            if generate.generator == "llm" {
                if let (Some(model), Some(resolved)) = (&written.model, &generate.model) {
                    check_llm(model, Path::new(resolved), &mut problems);
                }
            }
            if let (Some(tokenizer), Some(resolved)) = (&written.tokenizer, &generate.tokenizer) {
                let json = resolved.join("tokenizer.json");
                if !json.is_file() {
                    problems.push(format!(
                        "generate.tokenizer = {:?} ({}): no tokenizer.json in that directory",
                        tokenizer.display(),
                        resolved.display()
                    ));
                }
            }
            for (i, (c, resolved)) in written
                .custom_types
                .iter()
                .zip(&generate.custom_types)
                .enumerate()
            {
                if let (Some(examples), Some(at)) = (&c.examples, &resolved.examples) {
                    let field = format!("generate.custom_types[{i}].examples");
                    check_file(&field, examples, at, true, &mut problems);
                }
            }
        }
        if part >= RunPart::Mine {
            if let (Some(written), Some(queries)) = (&file.queries, &self.queries) {
                check_file(
                    "queries.path",
                    &written.path,
                    &queries.path,
                    true,
                    &mut problems,
                );
                check_file(
                    "queries.qrels",
                    &written.qrels,
                    &queries.qrels,
                    false,
                    &mut problems,
                );
            }
            for (i, (written, settings)) in file.retrievers.iter().zip(&self.retrievers).enumerate()
            {
                let resolved = settings.model.as_deref().unwrap_or(&written.model);
                check_model(
                    &format!("retrievers[{i}].model"),
                    &written.model,
                    resolved,
                    &embedder::REQUIRED_FILES,
                    &mut problems,
                );
            }
        }
        if part >= RunPart::Label {
            if self.teachers.is_empty() {
                problems.push(
                    "teachers: none given; label needs at least one [[teachers]] \
                     (kind = \"cross-encoder\", \"bi-encoder\" or \"bm25\")"
                        .into(),
                );
            }
            for (i, (written, settings)) in file.teachers.iter().zip(&self.teachers).enumerate() {
                let (resolved, required) = match &settings.kind {
                    TeacherKind::CrossEncoder { model, .. } => {
                        (model, &cross_encoder::REQUIRED_FILES)
                    }
                    TeacherKind::BiEncoder { model, .. } => (model, &embedder::REQUIRED_FILES),
                    TeacherKind::Bm25(_) => continue,
                };
                let as_written = written.model.as_deref().unwrap_or(resolved);
                check_model(
                    &format!("teachers[{i}].model"),
                    as_written,
                    resolved,
                    required,
                    &mut problems,
                );
            }
        }
        if part >= RunPart::Train {
            match (&file.student, &self.student) {
                (Some(written), Some(student)) => check_model(
                    "student.model",
                    &written.model,
                    &student.model,
                    &embedder::REQUIRED_FILES,
                    &mut problems,
                ),
                _ => problems
                    .push("student: no [student] section; train needs a model to fine-tune".into()),
            }
        }
        if part >= RunPart::Evaluate {
            if let (Some(written), Some(dataset)) = (&file.eval.dataset, &self.eval.dataset) {
                let name = format!(
                    "eval.dataset = {:?} ({})",
                    written.display(),
                    dataset.display()
                );
                let split = format!("qrels/{}.tsv", self.eval.split);
                if !dataset.is_dir() {
                    problems.push(format!("{name}: not a directory"));
                } else {
                    let corpus = crate::corpus::CORPUS_FILES
                        .iter()
                        .any(|f| dataset.join(f).is_file());
                    for (missing, what) in [
                        (
                            !corpus,
                            "no corpus.jsonl, corpus.parquet or corpus.tsv".to_string(),
                        ),
                        (
                            !dataset.join("queries.jsonl").is_file(),
                            "no queries.jsonl".into(),
                        ),
                        (
                            !dataset.join(&split).is_file(),
                            format!("no {split} (eval.split)"),
                        ),
                    ] {
                        if missing {
                            problems.push(format!("{name}: {what}"));
                        }
                    }
                }
            }
        }
        if problems.is_empty() {
            return Ok(());
        }
        let origin = self.origin.display();
        Err(EngineError::Invalid(format!(
            "{origin}: {} problem{} found before any work started:\n  {}",
            problems.len(),
            if problems.len() == 1 { "" } else { "s" },
            problems.join("\n  ")
        )))
    }
}

/// A data file: it must be a readable file, and (`nonempty`) hold at least one byte.
fn check_file(
    field: &str,
    written: &Path,
    resolved: &Path,
    nonempty: bool,
    problems: &mut Vec<String>,
) {
    let name = || format!("{field} = {:?} ({})", written.display(), resolved.display());
    match std::fs::metadata(resolved) {
        Err(e) => problems.push(format!("{}: {e}", name())),
        Ok(m) if !m.is_file() => problems.push(format!("{}: not a file", name())),
        Ok(m) if nonempty && m.len() == 0 => {
            problems.push(format!("{}: the file is empty", name()))
        }
        Ok(_) => {}
    }
}

/// A model given as a directory or a hub id: a directory must hold `required`; a hub id
/// must be in the local hub cache (nothing can be downloaded at run time).
fn check_model(
    field: &str,
    written: &str,
    resolved: &str,
    required: &RequiredFiles,
    problems: &mut Vec<String>,
) {
    let dir = Path::new(resolved);
    let name = if written == resolved {
        format!("{field} = {written:?}")
    } else {
        format!("{field} = {written:?} ({resolved})")
    };
    if dir.is_dir() {
        for (file, why) in required {
            if !dir.join(file).is_file() {
                problems.push(format!("{name}: no {file} in that directory ({why})"));
            }
        }
    } else if dir.exists() {
        problems.push(format!("{name}: not a directory"));
    } else if find_in_hub_cache(written).is_none() {
        problems.push(format!(
            "{name}: neither a directory nor a hub id in the local Hugging Face cache \
             (models cannot be downloaded at run time)"
        ));
    }
}

/// The generator's LLM: a `.gguf` file, or a Hugging Face directory with `config.json`
/// and safetensors weights.
fn check_llm(written: &str, resolved: &Path, problems: &mut Vec<String>) {
    let name = format!("generate.model = {written:?} ({})", resolved.display());
    if resolved.is_file() {
        return;
    }
    if !resolved.is_dir() {
        problems.push(format!(
            "{name}: neither a .gguf file nor a model directory"
        ));
        return;
    }
    if !resolved.join("config.json").is_file() {
        problems.push(format!("{name}: no config.json in that directory"));
    }
    let has_weights = std::fs::read_dir(resolved)
        .map(|entries| {
            entries.filter_map(Result::ok).any(|e| {
                e.file_name()
                    .to_str()
                    .is_some_and(|n| n.ends_with(".safetensors"))
            })
        })
        .unwrap_or(false);
    if !has_weights {
        problems.push(format!(
            "{name}: no .safetensors weights in that directory (pickled .bin files are \
             never read)"
        ));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is its job
mod tests {
    use super::*;
    use crate::config::PipelineFile;

    fn pipeline(dir: &Path, extra: &str) -> Pipeline {
        let text = format!(
            "run_dir = \"run\"\ncorpus = \"c.jsonl\"\n[queries]\npath = \"q.jsonl\"\n\
             qrels = \"qrels.tsv\"\n[[retrievers]]\nmodel = \"r\"\n{extra}"
        );
        let file: PipelineFile = toml::from_str(&text).unwrap();
        Pipeline::resolve(file, dir, &dir.join("p.toml")).unwrap()
    }

    fn model_dir(dir: &Path, files: &[&str]) {
        std::fs::create_dir_all(dir).unwrap();
        for f in files {
            std::fs::write(dir.join(f), "x").unwrap();
        }
    }

    #[test]
    fn every_problem_is_named_by_its_field_and_value() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("c.jsonl"), "").unwrap();
        std::fs::write(d.path().join("q.jsonl"), "{}").unwrap();
        model_dir(
            &d.path().join("r"),
            &["config.json", "tokenizer.json", "model.safetensors"],
        );
        model_dir(
            &d.path().join("ce"),
            &["tokenizer.json", "model.safetensors"],
        );
        let p = pipeline(
            d.path(),
            "[[teachers]]\nkind = \"bm25\"\n[[teachers]]\nmodel = \"ce\"\n\
             [[teachers]]\nkind = \"bi-encoder\"\nmodel = \"nowhere/model\"\n",
        );
        // Generation needs only the corpus.
        let e = p.preflight(RunPart::Generate).unwrap_err().to_string();
        assert!(e.contains("1 problem found"), "{e}");
        assert!(e.contains("corpus = \"c.jsonl\""), "{e}");
        assert!(e.contains("the file is empty"), "{e}");

        let e = p.preflight(RunPart::Train).unwrap_err().to_string();
        assert!(e.contains("queries.qrels = \"qrels.tsv\""), "{e}");
        assert!(
            e.contains("teachers[1].model = \"ce\"")
                && e.contains("no config.json in that directory"),
            "{e}"
        );
        assert!(e.contains("teachers[2].model = \"nowhere/model\""), "{e}");
        assert!(e.contains("student: no [student] section"), "{e}");
        assert!(!e.contains("retrievers[0]"), "{e}");
        assert!(!e.contains("teachers[0]"), "{e}");
        assert!(e.contains("5 problems"), "{e}");
    }

    #[test]
    fn a_complete_pipeline_passes() {
        let d = tempfile::tempdir().unwrap();
        for f in ["c.jsonl", "q.jsonl", "qrels.tsv"] {
            std::fs::write(d.path().join(f), "x").unwrap();
        }
        let all = ["config.json", "tokenizer.json", "model.safetensors"];
        model_dir(&d.path().join("r"), &all);
        model_dir(&d.path().join("s"), &all);
        let p = pipeline(
            d.path(),
            "[[teachers]]\nkind = \"bi-encoder\"\nmodel = \"r\"\n[student]\nmodel = \"s\"\n",
        );
        p.preflight(RunPart::Train).unwrap();
    }
}
