//! Writing a student out: its weights as safetensors, or a complete sentence-transformers
//! directory that [`crate::Embedder::load`], sentence-transformers and transformers read.
//!
//! The directory holds:
//! - `config.json`, and the tokenizer files that exist in the source (`tokenizer.json`,
//!   `tokenizer_config.json`, `special_tokens_map.json`, `vocab.txt`), copied;
//! - `model.safetensors`: the current weights under Hugging Face names without prefix;
//! - `modules.json`: Transformer, Pooling, and Normalize when the student normalises;
//! - `1_Pooling/config.json`: the student's pooling;
//! - `sentence_bert_config.json`: `max_seq_length` = the passage maximum length, and the
//!   source's `do_lower_case`;
//! - `config_sentence_transformers.json`: the prompts that are set, under `query` and
//!   `passage`, and `"default_prompt_name": null` so that nothing is prepended unasked.
//!
//! A query-tower student (its passage encoder frozen) is written as a
//! sentence-transformers Router ([`export_query_document_router`]): the `query` route is
//! the student as above, the `document` route the frozen model's own files, copied byte
//! for byte, so its embeddings (and its fingerprint in distillery's embedding key) are
//! the base model's.
//!
//! Everything is written under a hidden sibling of the destination and renamed into
//! place, so a reader never sees half a model.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::json;

use super::Student;
use crate::error::{OperatorError, Result};
use crate::st_config::{
    ModelLayout, Pooling, SentenceTransformerSpec, MODULE_NORMALIZE, MODULE_POOLING, MODULE_ROUTER,
    MODULE_TRANSFORMER, ROUTER_CONFIG_FILE, ROUTE_DOCUMENT, ROUTE_QUERY,
};

/// Copied from the source directory when present; `config.json` and `tokenizer.json`
/// must be there (the student was loaded from them).
const COPIED_FILES: [(&str, bool); 5] = [
    ("config.json", true),
    ("tokenizer.json", true),
    ("tokenizer_config.json", false),
    ("special_tokens_map.json", false),
    ("vocab.txt", false),
];

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> OperatorError + '_ {
    move |source| OperatorError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A name beside `path`, hidden and unique to this process and moment.
fn sibling(path: &Path, tag: &str) -> Result<PathBuf> {
    let name = path.file_name().ok_or_else(|| OperatorError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other("destination has no file name"),
    })?;
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    Ok(path.with_file_name(format!(
        ".{}.{tag}-{}-{nanos}",
        name.to_string_lossy(),
        std::process::id()
    )))
}

fn write_safetensors(student: &Student, path: &Path) -> Result<()> {
    let tensors = student.weight_tensors();
    candle_core::safetensors::save(&tensors, path).map_err(|e| OperatorError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    })
}

pub(super) fn save_weights(student: &Student, path: &Path) -> Result<()> {
    let tmp = sibling(path, "partial")?;
    let written = write_safetensors(student, &tmp)
        .and_then(|()| std::fs::rename(&tmp, path).map_err(io_err(path)));
    if written.is_err() {
        // Best effort: the error being returned is the one that matters.
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| OperatorError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other(e),
    })?;
    std::fs::write(path, text).map_err(io_err(path))
}

/// Copies [`COPIED_FILES`] of `source_dir` into `dir`.
fn copy_model_files(source_dir: &Path, dir: &Path) -> Result<()> {
    for (file, required) in COPIED_FILES {
        let from = source_dir.join(file);
        if from.is_file() {
            std::fs::copy(&from, dir.join(file)).map_err(io_err(&from))?;
        } else if required {
            return Err(OperatorError::MissingFile {
                dir: source_dir.to_path_buf(),
                file,
                why: "copied into every exported model",
            });
        }
    }
    Ok(())
}

/// A Pooling module's `config.json` in `dir` (created).
fn write_pooling(dir: &Path, dim: usize, pooling: Pooling) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    write_json(
        &dir.join("config.json"),
        &json!({
            "word_embedding_dimension": dim,
            "pooling_mode_cls_token": pooling == Pooling::Cls,
            "pooling_mode_mean_tokens": pooling == Pooling::Mean,
            "pooling_mode_max_tokens": false,
            "pooling_mode_mean_sqrt_len_tokens": false,
            "pooling_mode_weightedmean_tokens": false,
            "pooling_mode_lasttoken": false,
            "include_prompt": true,
        }),
    )
}

fn write_sentence_bert_config(
    dir: &Path,
    max_seq_length: Option<usize>,
    lower: bool,
) -> Result<()> {
    write_json(
        &dir.join("sentence_bert_config.json"),
        &json!({
            "max_seq_length": max_seq_length,
            "do_lower_case": lower,
        }),
    )
}

/// `config_sentence_transformers.json`: the prompts that are set, under `query` and
/// `passage` (and `document`, the name a Router's document route is asked by), none
/// prepended unasked.
fn write_prompts(
    dir: &Path,
    prompts: &(Option<String>, Option<String>),
    router: bool,
) -> Result<()> {
    let mut prompt_map = serde_json::Map::new();
    let (query, passage) = prompts;
    if let Some(q) = query {
        prompt_map.insert("query".into(), json!(q));
    }
    if let Some(p) = passage {
        prompt_map.insert("passage".into(), json!(p));
        if router {
            prompt_map.insert("document".into(), json!(p));
        }
    }
    write_json(
        &dir.join("config_sentence_transformers.json"),
        &json!({
            "prompts": prompt_map,
            "default_prompt_name": null,
            "similarity_fn_name": "cosine",
        }),
    )
}

/// The student's module list: Transformer, Pooling, and Normalize when it normalises,
/// as (module directory, type).
fn student_modules(
    student: &Student,
    pooling_dir: &str,
    normalize_dir: &str,
) -> Vec<(String, &'static str)> {
    let mut modules = vec![
        (String::new(), MODULE_TRANSFORMER),
        (pooling_dir.to_string(), MODULE_POOLING),
    ];
    if student.normalizes() {
        modules.push((normalize_dir.to_string(), MODULE_NORMALIZE));
    }
    modules
}

/// Writes every file of the exported directory into `dir` (which exists and is empty).
fn write_directory(
    student: &Student,
    source_dir: &Path,
    dir: &Path,
    prompts: &(Option<String>, Option<String>),
) -> Result<()> {
    copy_model_files(source_dir, dir)?;
    write_safetensors(student, &dir.join("model.safetensors"))?;
    let modules: Vec<serde_json::Value> = student_modules(student, "1_Pooling", "2_Normalize")
        .into_iter()
        .enumerate()
        .map(|(i, (path, kind))| json!({"idx": i, "name": i.to_string(), "path": path, "type": kind}))
        .collect();
    write_json(
        &dir.join("modules.json"),
        &serde_json::Value::Array(modules),
    )?;
    write_pooling(&dir.join("1_Pooling"), student.dim(), student.pooling())?;
    write_sentence_bert_config(
        dir,
        Some(student.max_length(crate::embedder::TextKind::Passage)),
        student.do_lower_case(),
    )?;
    write_prompts(dir, prompts, false)
}

/// Writes a query/document Router into `dir` (which exists and is empty): the student
/// as the `query` route, `document_model`'s encoder (its files copied unchanged; a
/// Router's document route) as the `document` route.
fn write_router(
    student: &Student,
    source_dir: &Path,
    document_model: &Path,
    dir: &Path,
    prompts: &(Option<String>, Option<String>),
) -> Result<()> {
    let mut types = serde_json::Map::new();
    let mut structure = serde_json::Map::new();

    // The query route: the student's weights and the source's files.
    let mut route = Vec::new();
    let query_modules = student_modules(student, "1_Pooling", "2_Normalize");
    for (i, (_, kind)) in query_modules.iter().enumerate() {
        let id = format!("{ROUTE_QUERY}_{i}_{}", class_name(kind));
        let module_dir = dir.join(&id);
        std::fs::create_dir_all(&module_dir).map_err(io_err(&module_dir))?;
        match *kind {
            MODULE_TRANSFORMER => {
                copy_model_files(source_dir, &module_dir)?;
                write_safetensors(student, &module_dir.join("model.safetensors"))?;
                write_sentence_bert_config(
                    &module_dir,
                    Some(student.max_length(crate::embedder::TextKind::Query)),
                    student.do_lower_case(),
                )?;
            }
            MODULE_POOLING => write_pooling(&module_dir, student.dim(), student.pooling())?,
            _ => write_json(&module_dir.join("config.json"), &json!({}))?,
        }
        types.insert(id.clone(), json!(kind));
        route.push(json!(id));
    }
    structure.insert(ROUTE_QUERY.into(), serde_json::Value::Array(route));

    // The document route: the frozen model as it is.
    let (files, spec): (std::path::PathBuf, SentenceTransformerSpec) =
        match ModelLayout::read(document_model)? {
            ModelLayout::Single(spec) => (document_model.to_path_buf(), spec),
            ModelLayout::Router { document, .. } => (document.transformer_dir, document.spec),
        };
    let mut document_modules = vec![MODULE_TRANSFORMER, MODULE_POOLING];
    if spec.normalize {
        document_modules.push(MODULE_NORMALIZE);
    }
    let mut route = Vec::new();
    for (i, kind) in document_modules.iter().enumerate() {
        let id = format!("{ROUTE_DOCUMENT}_{i}_{}", class_name(kind));
        let module_dir = dir.join(&id);
        std::fs::create_dir_all(&module_dir).map_err(io_err(&module_dir))?;
        match *kind {
            MODULE_TRANSFORMER => {
                copy_model_files(&files, &module_dir)?;
                let weights = files.join("model.safetensors");
                std::fs::copy(&weights, module_dir.join("model.safetensors"))
                    .map_err(io_err(&weights))?;
                write_sentence_bert_config(&module_dir, spec.max_seq_length, spec.do_lower_case)?;
            }
            MODULE_POOLING => write_pooling(&module_dir, student.dim(), spec.pooling)?,
            _ => write_json(&module_dir.join("config.json"), &json!({}))?,
        }
        types.insert(id.clone(), json!(kind));
        route.push(json!(id));
    }
    structure.insert(ROUTE_DOCUMENT.into(), serde_json::Value::Array(route));

    write_json(
        &dir.join("modules.json"),
        &json!([{"idx": 0, "name": "0", "path": "", "type": MODULE_ROUTER}]),
    )?;
    write_json(
        &dir.join(ROUTER_CONFIG_FILE),
        &json!({
            "types": types,
            "structure": structure,
            "parameters": {"default_route": ROUTE_DOCUMENT, "allow_empty_key": true},
        }),
    )?;
    write_prompts(dir, prompts, true)
}

/// The class name of a module type (`Transformer` of `sentence_transformers.models.Transformer`).
fn class_name(kind: &str) -> &str {
    kind.rsplit('.').next().unwrap_or(kind)
}

pub(super) fn export_sentence_transformers(
    student: &Student,
    source_dir: &Path,
    out_dir: &Path,
    prompts: (Option<String>, Option<String>),
) -> Result<()> {
    export_atomically(out_dir, |tmp| {
        write_directory(student, source_dir, tmp, &prompts)
    })
}

pub(super) fn export_query_document_router(
    student: &Student,
    source_dir: &Path,
    document_model: &Path,
    out_dir: &Path,
    prompts: (Option<String>, Option<String>),
) -> Result<()> {
    export_atomically(out_dir, |tmp| {
        write_router(student, source_dir, document_model, tmp, &prompts)
    })
}

/// Runs `write` into a hidden sibling of `out_dir` and renames it into place.
fn export_atomically(out_dir: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = sibling(out_dir, "partial")?;
    std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
    if let Err(e) = write(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    // An older export moves aside first: a directory cannot be renamed over a non-empty
    // one. Between the two renames `out_dir` is absent, never partial.
    let old = if out_dir.exists() {
        let old = sibling(out_dir, "replaced")?;
        std::fs::rename(out_dir, &old).map_err(io_err(out_dir))?;
        Some(old)
    } else {
        None
    };
    if let Err(source) = std::fs::rename(&tmp, out_dir) {
        if let Some(old) = &old {
            let _ = std::fs::rename(old, out_dir);
        }
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(OperatorError::Io {
            path: out_dir.to_path_buf(),
            source,
        });
    }
    if let Some(old) = old {
        std::fs::remove_dir_all(&old).map_err(io_err(&old))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sibling_is_hidden_beside_the_destination() {
        let s = sibling(Path::new("/a/b/model"), "partial").unwrap();
        assert_eq!(s.parent(), Some(Path::new("/a/b")));
        let name = s.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with(".model.partial-"), "{name}");
        assert!(sibling(Path::new("/"), "partial").is_err());
    }
}
