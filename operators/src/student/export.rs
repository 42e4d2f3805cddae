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
//! Everything is written under a hidden sibling of the destination and renamed into
//! place, so a reader never sees half a model.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::json;

use super::Student;
use crate::error::{OperatorError, Result};
use crate::st_config::Pooling;

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

/// Writes every file of the exported directory into `dir` (which exists and is empty).
fn write_directory(
    student: &Student,
    source_dir: &Path,
    dir: &Path,
    prompts: &(Option<String>, Option<String>),
) -> Result<()> {
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
    write_safetensors(student, &dir.join("model.safetensors"))?;

    let mut modules = vec![
        json!({"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}),
        json!({"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}),
    ];
    if student.normalizes() {
        modules.push(json!({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}));
    }
    write_json(
        &dir.join("modules.json"),
        &serde_json::Value::Array(modules),
    )?;

    let pooling_dir = dir.join("1_Pooling");
    std::fs::create_dir(&pooling_dir).map_err(io_err(&pooling_dir))?;
    let pooling = student.pooling();
    write_json(
        &pooling_dir.join("config.json"),
        &json!({
            "word_embedding_dimension": student.dim(),
            "pooling_mode_cls_token": pooling == Pooling::Cls,
            "pooling_mode_mean_tokens": pooling == Pooling::Mean,
            "pooling_mode_max_tokens": false,
            "pooling_mode_mean_sqrt_len_tokens": false,
            "pooling_mode_weightedmean_tokens": false,
            "pooling_mode_lasttoken": false,
            "include_prompt": true,
        }),
    )?;
    write_json(
        &dir.join("sentence_bert_config.json"),
        &json!({
            "max_seq_length": student.max_length(crate::TextKind::Passage),
            "do_lower_case": student.do_lower_case(),
        }),
    )?;
    let mut prompt_map = serde_json::Map::new();
    let (query, passage) = prompts;
    if let Some(q) = query {
        prompt_map.insert("query".into(), json!(q));
    }
    if let Some(p) = passage {
        prompt_map.insert("passage".into(), json!(p));
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

pub(super) fn export_sentence_transformers(
    student: &Student,
    source_dir: &Path,
    out_dir: &Path,
    prompts: (Option<String>, Option<String>),
) -> Result<()> {
    let tmp = sibling(out_dir, "partial")?;
    std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
    if let Err(e) = write_directory(student, source_dir, &tmp, &prompts) {
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
