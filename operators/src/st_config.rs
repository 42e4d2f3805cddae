//! The sentence-transformers files of a model directory: which modules follow the
//! transformer (`modules.json`), how it pools (`1_Pooling/config.json`), its maximum
//! length and casing (`sentence_bert_config.json`) and its prompts
//! (`config_sentence_transformers.json`). A directory without `modules.json` is a plain
//! Hugging Face encoder, which sentence-transformers reads as mean pooling without
//! normalisation; distillery does the same.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{OperatorError, Result};

/// How token states become one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// The `[CLS]` token's state.
    Cls,
    /// The mean over real (unpadded) tokens.
    Mean,
}

impl Pooling {
    pub fn name(self) -> &'static str {
        match self {
            Pooling::Cls => "cls",
            Pooling::Mean => "mean",
        }
    }
}

/// What the sentence-transformers files say, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct SentenceTransformerSpec {
    pub pooling: Pooling,
    pub normalize: bool,
    /// Maximum tokens per text, special tokens included; `None` when the directory does
    /// not say (the caller then uses the position-embedding limit).
    pub max_seq_length: Option<usize>,
    pub do_lower_case: bool,
    /// Named prompts (`query`, `passage`, `document`, ...) prepended to the text.
    pub prompts: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct ModuleEntry {
    #[serde(default)]
    path: String,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize)]
struct PoolingFile {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
    #[serde(default)]
    pooling_mode_weightedmean_tokens: bool,
    #[serde(default)]
    pooling_mode_lasttoken: bool,
    #[serde(default)]
    pooling_mode: Option<String>,
}

#[derive(Deserialize)]
struct SentenceBertFile {
    max_seq_length: Option<usize>,
    #[serde(default)]
    do_lower_case: bool,
}

#[derive(Deserialize)]
struct StConfigFile {
    #[serde(default)]
    prompts: BTreeMap<String, String>,
}

/// The modules distillery reads, by class name. sentence-transformers writes a module's
/// full class path (`sentence_transformers.models.Pooling` up to version 5,
/// `sentence_transformers.sentence_transformer.modules.pooling.Pooling` from 6); both
/// name the same module, so the class name after the package decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Module {
    Transformer,
    Pooling,
    Normalize,
    Router,
}

impl Module {
    /// The module a `type` of modules.json or router_config.json names, when it is one
    /// of sentence-transformers' own that distillery reads.
    fn of(kind: &str) -> Option<Self> {
        let (package, class) = kind.rsplit_once('.')?;
        if !(package == "sentence_transformers" || package.starts_with("sentence_transformers.")) {
            return None;
        }
        match class {
            "Transformer" => Some(Self::Transformer),
            "Pooling" => Some(Self::Pooling),
            "Normalize" => Some(Self::Normalize),
            "Router" => Some(Self::Router),
            _ => None,
        }
    }
}

/// What distillery writes for each module: the names sentence-transformers 5 writes,
/// which 5 and later versions both read.
pub const MODULE_TRANSFORMER: &str = "sentence_transformers.models.Transformer";
pub const MODULE_POOLING: &str = "sentence_transformers.models.Pooling";
pub const MODULE_NORMALIZE: &str = "sentence_transformers.models.Normalize";
pub const MODULE_ROUTER: &str = "sentence_transformers.models.Router";

/// The file of a Router module: its sub-modules and the routes through them.
pub const ROUTER_CONFIG_FILE: &str = "router_config.json";
/// The routes of a query/document Router (sentence-transformers'
/// `Router.for_query_document`): `encode_query` takes the first, `encode_document` and a
/// plain `encode` the second.
pub const ROUTE_QUERY: &str = "query";
pub const ROUTE_DOCUMENT: &str = "document";

fn read_json<T: DeserializeOwned>(path: &Path, what: &'static str) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|source| OperatorError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| OperatorError::BadConfig {
        path: path.to_path_buf(),
        what,
        message: e.to_string(),
    })
}

fn read_optional<T: DeserializeOwned>(path: &Path, what: &'static str) -> Result<Option<T>> {
    if path.is_file() {
        read_json(path, what).map(Some)
    } else {
        Ok(None)
    }
}

/// One route of a Router model: the directory of its transformer (weights, config,
/// tokenizer) and what its modules say.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub transformer_dir: PathBuf,
    pub spec: SentenceTransformerSpec,
}

/// A model directory's encoders: one for every text, or (a sentence-transformers Router
/// of `query` and `document` routes) one per side of retrieval.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelLayout {
    Single(SentenceTransformerSpec),
    Router { query: Route, document: Route },
}

#[derive(Deserialize)]
struct RouterFile {
    types: BTreeMap<String, String>,
    structure: BTreeMap<String, Vec<String>>,
}

fn unsupported_module(path: &Path, kind: &str) -> OperatorError {
    OperatorError::Unsupported {
        path: path.to_path_buf(),
        what: "sentence-transformers module",
        value: kind.to_string(),
        supported:
            "Transformer, Pooling, Normalize, and a Router of query and document routes of those",
    }
}

impl ModelLayout {
    /// Reads the sentence-transformers files of `dir`: a Router when its modules.json
    /// holds one Router module, one encoder otherwise.
    pub fn read(dir: &Path) -> Result<Self> {
        let modules_path = dir.join("modules.json");
        let modules =
            read_optional::<Vec<ModuleEntry>>(&modules_path, "sentence-transformers modules.json")?;
        let is_router = modules.as_deref().is_some_and(|m| {
            m.iter()
                .any(|e| Module::of(&e.kind) == Some(Module::Router))
        });
        if !is_router {
            return SentenceTransformerSpec::read(dir).map(Self::Single);
        }
        let modules = modules.unwrap_or_default();
        let [router] = modules.as_slice() else {
            return Err(OperatorError::BadConfig {
                path: modules_path,
                what: "sentence-transformers modules.json",
                message: "a Router must be the only module".into(),
            });
        };
        let router_dir = dir.join(&router.path);
        let config_path = router_dir.join(ROUTER_CONFIG_FILE);
        let config: RouterFile = read_json(&config_path, "sentence-transformers Router config")?;
        let prompts = read_prompts(dir)?;
        let route = |name: &str| -> Result<Route> {
            let ids = config.structure.get(name).ok_or_else(|| OperatorError::BadConfig {
                path: config_path.clone(),
                what: "sentence-transformers Router config",
                message: format!(
                    "no `{name}` route (distillery reads Routers of `{ROUTE_QUERY}` and `{ROUTE_DOCUMENT}` routes)"
                ),
            })?;
            let mut modules = Vec::with_capacity(ids.len());
            for id in ids {
                // Module directories are relative names inside the model, never paths out
                // of it.
                if id.is_empty() || id.contains(['/', '\\']) || id == "." || id == ".." {
                    return Err(OperatorError::BadConfig {
                        path: config_path.clone(),
                        what: "sentence-transformers Router config",
                        message: format!("module id `{id}` is not a plain directory name"),
                    });
                }
                let kind = config
                    .types
                    .get(id)
                    .ok_or_else(|| OperatorError::BadConfig {
                        path: config_path.clone(),
                        what: "sentence-transformers Router config",
                        message: format!("route `{name}` names module `{id}`, which has no type"),
                    })?;
                modules.push(ModuleEntry {
                    path: id.clone(),
                    kind: kind.clone(),
                });
            }
            let transformer = modules
                .iter()
                .find(|m| Module::of(&m.kind) == Some(Module::Transformer))
                .ok_or_else(|| OperatorError::BadConfig {
                    path: config_path.clone(),
                    what: "sentence-transformers Router config",
                    message: format!("route `{name}` has no Transformer module"),
                })?;
            let transformer_dir = router_dir.join(&transformer.path);
            let (pooling, normalize) = read_modules(&router_dir, &config_path, &modules)?;
            let mut spec =
                SentenceTransformerSpec::read_files(&transformer_dir, pooling, normalize)?;
            spec.prompts = prompts.clone();
            Ok(Route {
                transformer_dir,
                spec,
            })
        };
        Ok(Self::Router {
            query: route(ROUTE_QUERY)?,
            document: route(ROUTE_DOCUMENT)?,
        })
    }
}

/// The pooling and normalisation of a list of modules whose directories are in `dir`;
/// a Router among them, or a module distillery does not read, is an error naming
/// `listed_in`.
fn read_modules(dir: &Path, listed_in: &Path, modules: &[ModuleEntry]) -> Result<(Pooling, bool)> {
    let mut pooling = Pooling::Mean;
    let mut normalize = false;
    for m in modules {
        match Module::of(&m.kind) {
            Some(Module::Transformer) => {}
            Some(Module::Pooling) => {
                pooling = read_pooling(&dir.join(&m.path).join("config.json"))?
            }
            Some(Module::Normalize) => normalize = true,
            Some(Module::Router) | None => return Err(unsupported_module(listed_in, &m.kind)),
        }
    }
    Ok((pooling, normalize))
}

fn read_prompts(dir: &Path) -> Result<BTreeMap<String, String>> {
    let st: Option<StConfigFile> = read_optional(
        &dir.join("config_sentence_transformers.json"),
        "config_sentence_transformers.json",
    )?;
    Ok(st.map(|s| s.prompts).unwrap_or_default())
}

impl SentenceTransformerSpec {
    /// Reads the sentence-transformers files of `dir`, a model of one encoder (a Router
    /// is read by [`ModelLayout::read`]).
    pub fn read(dir: &Path) -> Result<Self> {
        let modules_path = dir.join("modules.json");
        let (pooling, normalize) = match read_optional::<Vec<ModuleEntry>>(
            &modules_path,
            "sentence-transformers modules.json",
        )? {
            Some(modules) => read_modules(dir, &modules_path, &modules)?,
            None => (Pooling::Mean, false),
        };
        let mut spec = Self::read_files(dir, pooling, normalize)?;
        spec.prompts = read_prompts(dir)?;
        Ok(spec)
    }

    /// The spec of a transformer directory (its `sentence_bert_config.json`) with the
    /// pooling and normalisation its modules gave; no prompts.
    fn read_files(dir: &Path, pooling: Pooling, normalize: bool) -> Result<Self> {
        let sbert: Option<SentenceBertFile> = read_optional(
            &dir.join("sentence_bert_config.json"),
            "sentence_bert_config.json",
        )?;
        Ok(Self {
            pooling,
            normalize,
            max_seq_length: sbert.as_ref().and_then(|s| s.max_seq_length),
            do_lower_case: sbert.map(|s| s.do_lower_case).unwrap_or(false),
            prompts: BTreeMap::new(),
        })
    }
}

fn read_pooling(path: &Path) -> Result<Pooling> {
    let f: PoolingFile = read_json(path, "sentence-transformers pooling config")?;
    if let Some(mode) = &f.pooling_mode {
        return match mode.as_str() {
            "cls" => Ok(Pooling::Cls),
            "mean" => Ok(Pooling::Mean),
            other => Err(unsupported_pooling(path, other)),
        };
    }
    let modes = [
        (f.pooling_mode_cls_token, "cls"),
        (f.pooling_mode_mean_tokens, "mean"),
        (f.pooling_mode_max_tokens, "max"),
        (f.pooling_mode_mean_sqrt_len_tokens, "mean_sqrt_len"),
        (f.pooling_mode_weightedmean_tokens, "weightedmean"),
        (f.pooling_mode_lasttoken, "lasttoken"),
    ];
    let on: Vec<&str> = modes.iter().filter(|(b, _)| *b).map(|(_, n)| *n).collect();
    match on.as_slice() {
        ["cls"] => Ok(Pooling::Cls),
        ["mean"] => Ok(Pooling::Mean),
        [] => Err(unsupported_pooling(path, "none")),
        several => Err(unsupported_pooling(path, &several.join("+"))),
    }
}

fn unsupported_pooling(path: &Path, value: &str) -> OperatorError {
    OperatorError::Unsupported {
        path: path.to_path_buf(),
        what: "pooling mode",
        value: value.to_string(),
        supported: "exactly one of cls, mean",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        let p = dir.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    #[test]
    fn reads_minilm_style_directory() {
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            "modules.json",
            r#"[{"idx":0,"name":"0","path":"","type":"sentence_transformers.models.Transformer"},
                {"idx":1,"name":"1","path":"1_Pooling","type":"sentence_transformers.models.Pooling"},
                {"idx":2,"name":"2","path":"2_Normalize","type":"sentence_transformers.models.Normalize"}]"#,
        );
        write(
            d.path(),
            "1_Pooling/config.json",
            r#"{"word_embedding_dimension":384,"pooling_mode_cls_token":false,"pooling_mode_mean_tokens":true}"#,
        );
        write(
            d.path(),
            "sentence_bert_config.json",
            r#"{"max_seq_length":256,"do_lower_case":false}"#,
        );
        write(
            d.path(),
            "config_sentence_transformers.json",
            r#"{"prompts":{"query":"query: ","passage":"passage: "}}"#,
        );
        let s = SentenceTransformerSpec::read(d.path()).unwrap();
        assert_eq!(s.pooling, Pooling::Mean);
        assert!(s.normalize);
        assert_eq!(s.max_seq_length, Some(256));
        assert_eq!(s.prompts["query"], "query: ");
    }

    #[test]
    fn plain_hf_directory_is_mean_unnormalised() {
        let d = tempfile::tempdir().unwrap();
        let s = SentenceTransformerSpec::read(d.path()).unwrap();
        assert_eq!(s.pooling, Pooling::Mean);
        assert!(!s.normalize);
        assert_eq!(s.max_seq_length, None);
    }

    #[test]
    fn unsupported_pooling_names_file_and_mode() {
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            "modules.json",
            r#"[{"path":"1_Pooling","type":"sentence_transformers.models.Pooling"}]"#,
        );
        write(
            d.path(),
            "1_Pooling/config.json",
            r#"{"pooling_mode_max_tokens":true}"#,
        );
        let e = SentenceTransformerSpec::read(d.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("1_Pooling/config.json"), "{e}");
        assert!(e.contains("unsupported pooling mode `max`"), "{e}");
    }

    /// A query/document Router as sentence-transformers 6 writes it (its class paths),
    /// the routes' transformer files left out (the layout does not read them).
    fn write_router(dir: &Path, document_route: &str, module_id: &str) {
        write(
            dir,
            "modules.json",
            r#"[{"idx":0,"name":"0","path":"","type":"sentence_transformers.base.modules.router.Router"}]"#,
        );
        let config = serde_json::json!({
            "types": {
                "query_0_Transformer": "sentence_transformers.base.modules.transformer.Transformer",
                module_id: "sentence_transformers.sentence_transformer.modules.pooling.Pooling",
                "document_0_Transformer": "sentence_transformers.models.Transformer",
                "document_1_Pooling": "sentence_transformers.models.Pooling",
                "document_2_Normalize": "sentence_transformers.models.Normalize",
            },
            "structure": {
                "query": ["query_0_Transformer", module_id],
                document_route: ["document_0_Transformer", "document_1_Pooling", "document_2_Normalize"],
            },
            "parameters": {"default_route": "document"},
        });
        write(dir, "router_config.json", &config.to_string());
        if !module_id.contains('/') {
            write(
                dir,
                &format!("{module_id}/config.json"),
                r#"{"pooling_mode":"cls"}"#,
            );
        }
        write(
            dir,
            "document_1_Pooling/config.json",
            r#"{"pooling_mode_mean_tokens":true}"#,
        );
        write(
            dir,
            "query_0_Transformer/sentence_bert_config.json",
            r#"{"max_seq_length":32}"#,
        );
        write(
            dir,
            "config_sentence_transformers.json",
            r#"{"prompts":{"query":"q: ","document":"d: "}}"#,
        );
    }

    #[test]
    fn reads_a_query_document_router_route_by_route() {
        let d = tempfile::tempdir().unwrap();
        write_router(d.path(), "document", "query_1_Pooling");
        let ModelLayout::Router { query, document } = ModelLayout::read(d.path()).unwrap() else {
            panic!("not read as a Router");
        };
        assert_eq!(query.transformer_dir, d.path().join("query_0_Transformer"));
        assert_eq!(query.spec.pooling, Pooling::Cls);
        assert!(!query.spec.normalize);
        assert_eq!(query.spec.max_seq_length, Some(32));
        assert_eq!(
            document.transformer_dir,
            d.path().join("document_0_Transformer")
        );
        assert_eq!(document.spec.pooling, Pooling::Mean);
        assert!(document.spec.normalize);
        assert_eq!(document.spec.max_seq_length, None);
        // The model's prompts hold for both routes.
        assert_eq!(query.spec.prompts["query"], "q: ");
        assert_eq!(document.spec.prompts["document"], "d: ");
        // A Router is not one encoder.
        let e = SentenceTransformerSpec::read(d.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("Router"), "{e}");
    }

    #[test]
    fn a_router_without_the_document_route_or_with_a_path_for_a_module_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        write_router(d.path(), "passage", "query_1_Pooling");
        let e = ModelLayout::read(d.path()).unwrap_err().to_string();
        assert!(e.contains("router_config.json"), "{e}");
        assert!(e.contains("no `document` route"), "{e}");

        let d = tempfile::tempdir().unwrap();
        write_router(d.path(), "document", "../outside");
        let e = ModelLayout::read(d.path()).unwrap_err().to_string();
        assert!(
            e.contains("`../outside` is not a plain directory name"),
            "{e}"
        );
    }

    #[test]
    fn module_types_are_read_by_class_name_in_sentence_transformers_only() {
        assert_eq!(
            Module::of("sentence_transformers.sentence_transformer.modules.pooling.Pooling"),
            Some(Module::Pooling)
        );
        assert_eq!(
            Module::of("sentence_transformers.models.Normalize"),
            Some(Module::Normalize)
        );
        assert_eq!(Module::of("my_package.Pooling"), None);
        assert_eq!(Module::of("sentence_transformers.models.Dense"), None);
        assert_eq!(Module::of("Pooling"), None);
    }

    #[test]
    fn malformed_modules_json_is_named() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "modules.json", "[{");
        let e = SentenceTransformerSpec::read(d.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("modules.json: not a valid"), "{e}");
    }
}
