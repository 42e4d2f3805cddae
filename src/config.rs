//! The pipeline configuration: what the user writes (a TOML file, [`PipelineFile`]) and
//! what the jobs run ([`Pipeline`]), two types. Parsing checks every field once; paths
//! are resolved against the file's directory; every recipe constant has its default here
//! or in the mining module, where it is explained.
//!
//! ```toml
//! run_dir = "runs/scifact"
//! corpus = "../shared/datasets/scifact/corpus.jsonl"
//!
//! [queries]                  # human queries: the judged-relevant passages are sources
//! path = "../shared/datasets/scifact/queries.jsonl"
//! qrels = "../shared/datasets/scifact/qrels/train.tsv"
//!
//! [[retrievers]]
//! model = "../shared/models/all-MiniLM-L6-v2"
//!
//! [[teachers]]
//! model = "models/ms-marco-MiniLM-L-6-v2"
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::EngineError;

use crate::mining::{CandidateConfig, TeacherConfig};
use crate::train::trainer::TrainSettings;

pub mod cluster;
mod embed;
mod generate;
mod preflight;
mod teacher;
pub use embed::{EmbedSettings, DEFAULT_BATCH_ROWS, DEFAULT_BATCH_TOKENS};
pub use generate::{CustomTypeFile, EndpointFile, GenerateFile};
pub use preflight::RunPart;
pub use teacher::{TeacherFile, TeacherKind, TeacherSettings};

/// Passages held out of training by default: the recipe's synthetic test set size.
pub const DEFAULT_HELD_OUT: usize = 100;

/// The configuration file, as written.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineFile {
    /// Where every stage is kept.
    pub run_dir: PathBuf,
    /// The passages (BEIR JSONL, TSV or Parquet).
    pub corpus: PathBuf,
    #[serde(default)]
    pub held_out: HeldOutFile,
    /// Human queries with qrels; optional when `[generate]` makes synthetic ones.
    #[serde(default)]
    pub queries: Option<QueriesFile>,
    /// Synthetic queries (RECIPE.md sections 1 and 2).
    #[serde(default)]
    pub generate: Option<GenerateFile>,
    /// Dense retrievers for hard negatives (at least one).
    pub retrievers: Vec<ModelFile>,
    #[serde(default)]
    pub candidates: CandidateConfig,
    /// Teachers: cross-encoders, bi-encoders or BM25 (at least one for `label`).
    #[serde(default)]
    pub teachers: Vec<TeacherFile>,
    #[serde(default)]
    pub teacher: TeacherConfig,
    #[serde(default)]
    pub engine: EngineFile,
    #[serde(default)]
    pub output: OutputFile,
    /// The model to fine-tune (for `train`).
    #[serde(default)]
    pub student: Option<StudentFile>,
    /// How to train it; the recipe's settings by default.
    #[serde(default)]
    pub train: TrainSettings,
    /// What `run` evaluates the base and the fine-tuned student on.
    #[serde(default)]
    pub eval: EvalFile,
}

/// What `distillery run` evaluates on, besides the synthetic test set.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalFile {
    /// A BEIR dataset directory (corpus, queries.jsonl, `qrels/<split>.tsv`) to evaluate on.
    pub dataset: Option<PathBuf>,
    /// Its qrels split.
    pub split: String,
    /// Also evaluate on the generated queries of the held-out passages (RECIPE.md's
    /// synthetic test set), when the configuration generates queries.
    pub synthetic: bool,
    /// Before training, check the teachers on the same query sets: they rerank the base
    /// student's top 100 and are scored beside it (`run` warns when they are not better).
    pub check_teachers: bool,
}

impl Default for EvalFile {
    fn default() -> Self {
        Self {
            dataset: None,
            split: "test".into(),
            synthetic: true,
            check_teachers: true,
        }
    }
}

/// The student embedder to fine-tune.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StudentFile {
    pub model: String,
    #[serde(default = "default_query_max_length")]
    pub query_max_length: usize,
    #[serde(default = "default_passage_max_length")]
    pub passage_max_length: usize,
    #[serde(default)]
    pub query_prefix: Option<String>,
    #[serde(default)]
    pub passage_prefix: Option<String>,
}

fn default_query_max_length() -> usize {
    64
}
fn default_passage_max_length() -> usize {
    512
}

/// Which passages never appear as training candidates.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct HeldOutFile {
    /// How many passages to hold out, chosen by a seeded hash of their ids (stable when
    /// the corpus grows).
    pub count: usize,
    pub seed: u64,
}

impl Default for HeldOutFile {
    fn default() -> Self {
        Self {
            count: DEFAULT_HELD_OUT,
            seed: 42,
        }
    }
}

/// Human queries with relevance judgements (their relevant passages are the sources).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct QueriesFile {
    pub path: PathBuf,
    pub qrels: PathBuf,
    /// The `query_type` the examples record for these queries.
    #[serde(default = "default_query_type")]
    pub query_type: String,
}

fn default_query_type() -> String {
    "human".into()
}

/// An embedder: a model directory or hub id and optional overrides.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelFile {
    pub model: String,
    #[serde(default)]
    pub max_seq_length: Option<usize>,
    #[serde(default)]
    pub query_prefix: Option<String>,
    #[serde(default)]
    pub passage_prefix: Option<String>,
}

/// How the engine runs.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineFile {
    pub workers: usize,
    pub threads: Option<usize>,
    pub batch_tokens: usize,
    pub batch_rows: usize,
    /// `fail` (default) or `skip` (into `run_dir/quarantine.jsonl`).
    pub on_bad_record: String,
    /// Where every model runs: `cpu` (default) or `cuda:N` (a build with `--features
    /// cuda`); `cuda:{local}` is this process's index among the cluster's processes on
    /// its host, so that each process of a machine takes a GPU of its own.
    pub device: String,
    /// Queries retrieved per pass over the passage index while the candidates stream to
    /// teachers that score them ahead (a cross-encoder); unset: an eighth of the queries,
    /// at least 1,024 ([`crate::dataflow::retrieve::streaming_chunk`]). Smaller starts
    /// the teachers sooner and reads the passage index more often; the outputs are the
    /// same bits whatever it is.
    pub stream_queries: Option<usize>,
    /// Processes of timely's cluster that run the device stages (1: this one alone);
    /// `-n` on the command line.
    pub processes: usize,
    /// This process's index among them (`-p`); process 0 leads.
    pub process: usize,
    /// A file of `host:port` lines, one per process (`--hostfile`); default
    /// `localhost:2101` onwards.
    pub hostfile: Option<PathBuf>,
    /// An exact retrieval of at least this many scores (queries x passages) is shared
    /// among the cluster's processes; a smaller one runs on process 0 alone. Default
    /// [`cluster::MIN_SHARED_SCORES`].
    pub min_shared_scores: u64,
}

impl Default for EngineFile {
    fn default() -> Self {
        Self {
            workers: 1,
            threads: None,
            batch_tokens: DEFAULT_BATCH_TOKENS,
            batch_rows: DEFAULT_BATCH_ROWS,
            on_bad_record: "fail".into(),
            device: "cpu".into(),
            stream_queries: None,
            processes: 1,
            process: 0,
            hostfile: None,
            min_shared_scores: cluster::MIN_SHARED_SCORES,
        }
    }
}

/// Extra outputs.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutputFile {
    /// Also write the examples as `run_dir/examples.jsonl`.
    pub jsonl: bool,
}

/// The resolved pipeline the jobs run.
#[derive(Debug, Clone)]
pub struct Pipeline {
    pub run_dir: PathBuf,
    pub corpus: PathBuf,
    pub held_out: HeldOutFile,
    /// Human queries, their paths resolved.
    pub queries: Option<QueriesFile>,
    /// Query generation, as written (its paths resolved); the generate job resolves it
    /// further (prompts, generator).
    pub generate: Option<GenerateFile>,
    /// One embedding setting per retriever.
    pub retrievers: Vec<EmbedSettings>,
    pub candidates: CandidateConfig,
    pub teachers: Vec<TeacherSettings>,
    pub teacher: TeacherConfig,
    pub workers: usize,
    pub threads: usize,
    pub batch_tokens: usize,
    pub batch_rows: usize,
    /// `[engine] stream_queries`: queries per retrieval pass while the candidates
    /// stream to the teachers (`None`: [`crate::dataflow::retrieve::streaming_chunk`]).
    pub stream_queries: Option<usize>,
    /// The device every model of the run is loaded on (`[engine] device`), resolved once
    /// (again when the command line names another place in the cluster).
    pub device: candle_core::Device,
    /// `[engine] device` as written.
    pub device_name: String,
    /// `[engine] min_shared_scores`: the smallest exact retrieval shared among the
    /// cluster's processes.
    pub min_shared_scores: u64,
    /// The processes the device stages run over (`[engine] processes`, `-n`, ...).
    pub cluster: cluster::Cluster,
    pub quarantine: Option<PathBuf>,
    pub jsonl: bool,
    /// The student, its model path resolved.
    pub student: Option<StudentFile>,
    pub train: TrainSettings,
    /// What `run` evaluates on, its dataset path resolved.
    pub eval: EvalFile,
    /// No progress output (`--quiet`).
    pub quiet: bool,
    /// The file as written, for the record kept in the run directory.
    pub file: PipelineFile,
    /// The configuration file, for errors.
    pub origin: PathBuf,
}

fn invalid(path: &Path, message: impl std::fmt::Display) -> EngineError {
    EngineError::Invalid(format!("{}: {message}", path.display()))
}

impl Pipeline {
    /// Reads, checks and resolves a configuration file.
    pub fn load(path: &Path) -> Result<Self, EngineError> {
        let text = std::fs::read_to_string(path).map_err(|e| invalid(path, e))?;
        let file: PipelineFile = toml::from_str(&text).map_err(|e| invalid(path, e))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::resolve(file, base, path)
    }

    /// Checks `file` and resolves its relative paths against `base`; `origin` names the
    /// file in errors.
    pub fn resolve(file: PipelineFile, base: &Path, origin: &Path) -> Result<Self, EngineError> {
        // `.` components dropped: `run_dir = "."` is the base itself, not `base/.`.
        let at = |p: &Path| -> PathBuf {
            let joined = if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            };
            let clean: PathBuf = joined
                .components()
                .filter(|c| !matches!(c, std::path::Component::CurDir))
                .collect();
            if clean.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                clean
            }
        };
        if file.retrievers.is_empty() {
            return Err(invalid(origin, "`retrievers`: at least one is needed"));
        }
        if file.queries.is_none() && file.generate.is_none() {
            return Err(invalid(
                origin,
                "no queries: give `[queries]` (human queries with qrels), `[generate]` \
                 (synthetic ones) or both",
            ));
        }
        file.candidates
            .validate()
            .map_err(|e| invalid(origin, format!("[candidates] {e}")))?;
        file.teacher
            .validate()
            .map_err(|e| invalid(origin, format!("[teacher] {e}")))?;
        let run_dir = at(&file.run_dir);
        let quarantine = match file.engine.on_bad_record.as_str() {
            "fail" => None,
            "skip" => Some(run_dir.join(QUARANTINE_FILE)),
            other => {
                return Err(invalid(
                    origin,
                    format!("engine.on_bad_record must be `fail` or `skip`, found `{other}`"),
                ))
            }
        };
        let hostfile = file.engine.hostfile.as_deref().map(at);
        let cluster = cluster::Cluster::new(
            file.engine.processes,
            file.engine.process,
            hostfile.as_deref(),
        )
        .map_err(|e| invalid(origin, format!("[engine] {e}")))?;
        let device = resolve_device(&file.engine.device, &cluster).map_err(|e| {
            invalid(
                origin,
                format!("engine.device = {:?}: {e}", file.engine.device),
            )
        })?;
        let resolve_model = |m: &str| {
            let p = at(Path::new(m));
            if p.exists() {
                p.display().to_string()
            } else {
                m.to_string()
            }
        };
        let retrievers = file
            .retrievers
            .iter()
            .map(|r| EmbedSettings {
                model: Some(resolve_model(&r.model)),
                max_seq_length: r.max_seq_length,
                query_prefix: r.query_prefix.clone(),
                passage_prefix: r.passage_prefix.clone(),
                batch_tokens: file.engine.batch_tokens,
                batch_rows: file.engine.batch_rows,
                workers: file.engine.workers,
                quarantine: quarantine.clone(),
                quiet: false,
                device: device.clone(),
            })
            .collect();
        let teachers = file
            .teachers
            .iter()
            .enumerate()
            .map(|(i, t)| t.resolve(i, resolve_model))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid(origin, e))?;
        if file.engine.stream_queries == Some(0) {
            return Err(invalid(
                origin,
                "[engine] stream_queries: at least 1 (or leave it out: an eighth of the \
                 queries)",
            ));
        }
        let threads = file
            .engine
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        Ok(Self {
            run_dir,
            corpus: at(&file.corpus),
            held_out: file.held_out.clone(),
            queries: file.queries.as_ref().map(|q| QueriesFile {
                path: at(&q.path),
                qrels: at(&q.qrels),
                query_type: q.query_type.clone(),
            }),
            generate: file.generate.as_ref().map(|g| GenerateFile {
                model: g.model.as_deref().map(resolve_model),
                tokenizer: g.tokenizer.as_deref().map(at),
                custom_types: g
                    .custom_types
                    .iter()
                    .map(|c| CustomTypeFile {
                        examples: c.examples.as_deref().map(at),
                        ..c.clone()
                    })
                    .collect(),
                ..g.clone()
            }),
            retrievers,
            candidates: file.candidates.clone(),
            teachers,
            teacher: file.teacher.clone(),
            workers: file.engine.workers.max(1),
            threads,
            batch_tokens: file.engine.batch_tokens,
            batch_rows: file.engine.batch_rows,
            stream_queries: file.engine.stream_queries,
            device,
            device_name: file.engine.device.clone(),
            min_shared_scores: file.engine.min_shared_scores,
            cluster,
            quarantine,
            jsonl: file.output.jsonl,
            student: file.student.as_ref().map(|s| StudentFile {
                model: resolve_model(&s.model),
                ..s.clone()
            }),
            train: file.train.clone(),
            eval: EvalFile {
                dataset: file.eval.dataset.as_deref().map(at),
                ..file.eval.clone()
            },
            quiet: false,
            file,
            origin: origin.to_path_buf(),
        })
    }
}

impl Pipeline {
    /// Applies the command line's engine options over the file's: `--quiet`, `-w`,
    /// `--on-bad-record skip|fail` (`Some(true)` skips into `run_dir/quarantine.jsonl`).
    pub fn override_engine(
        &mut self,
        workers: Option<usize>,
        skip_bad_records: Option<bool>,
        quiet: bool,
    ) {
        self.override_engine_options(workers, skip_bad_records, quiet);
    }

    /// [`Pipeline::override_engine`], and the cluster the command line names (`-n`,
    /// `-p`, `--hostfile`) over `[engine]`'s (a device of `cuda:{local}` resolved again
    /// for this process's new place).
    pub fn override_engine_in(
        &mut self,
        workers: Option<usize>,
        skip_bad_records: Option<bool>,
        quiet: bool,
        cluster: Option<cluster::Cluster>,
    ) -> Result<(), EngineError> {
        if let Some(c) = cluster {
            if self.device_name.contains("{local}") {
                self.device = resolve_device(&self.device_name, &c).map_err(|e| {
                    EngineError::Invalid(format!(
                        "engine.device = {:?} (process {} of {}): {e}",
                        self.device_name, c.process, c.processes
                    ))
                })?;
                for r in &mut self.retrievers {
                    r.device = self.device.clone();
                }
            }
            self.cluster = c;
        }
        self.override_engine_options(workers, skip_bad_records, quiet);
        Ok(())
    }

    fn override_engine_options(
        &mut self,
        workers: Option<usize>,
        skip_bad_records: Option<bool>,
        quiet: bool,
    ) {
        if let Some(w) = workers {
            self.workers = w.max(1);
        }
        if let Some(skip) = skip_bad_records {
            self.quarantine = skip.then(|| self.run_dir.join(QUARANTINE_FILE));
        }
        self.quiet |= quiet;
        for r in &mut self.retrievers {
            r.workers = self.workers;
            r.quarantine.clone_from(&self.quarantine);
            r.quiet = self.quiet;
        }
    }

    /// How the run's exact retrievals are shared among its processes.
    pub fn sharing(&self) -> cluster::Sharing {
        cluster::Sharing {
            cluster: self.cluster.clone(),
            workers: self.workers,
            min_scores: self.min_shared_scores,
        }
    }

    /// The token-budget batcher of `[engine]`, for every model operator of the run.
    pub fn batcher(&self) -> distillery_operators::TokenBudgetBatcher {
        distillery_operators::TokenBudgetBatcher {
            max_tokens: self.batch_tokens.max(1),
            max_rows: self.batch_rows.max(1),
        }
    }

    /// The run's quarantine, opened (and shared by every reader of this process) when the
    /// run skips bad records.
    pub fn open_quarantine(&self) -> Result<Option<crate::corpus::Quarantine>, EngineError> {
        Ok(match &self.quarantine {
            Some(path) => {
                std::fs::create_dir_all(&self.run_dir).map_err(|source| EngineError::Write {
                    path: self.run_dir.clone(),
                    source,
                })?;
                Some(crate::corpus::Quarantine::open(path)?)
            }
            None => None,
        })
    }
}

/// The device `[engine] device` names for this process of `cluster`: `cpu`, or
/// `cuda:N` where the build has CUDA ([`device_ordinal`]).
pub fn resolve_device(
    name: &str,
    cluster: &cluster::Cluster,
) -> Result<candle_core::Device, String> {
    let Some(ordinal) = device_ordinal(name, cluster)? else {
        return Ok(candle_core::Device::Cpu);
    };
    candle_core::Device::new_cuda(ordinal).map_err(|e| match e {
        candle_core::Error::NotCompiledWithCudaSupport => {
            "this build has no CUDA support (build with `--features cuda`)".to_string()
        }
        other => format!("cannot open GPU {ordinal}: {other}"),
    })
}

/// The GPU ordinal `name` names for this process of `cluster` (`None`: the CPU):
/// `cuda:N`, or `cuda:{local}`, `{local}` standing for the process's index among the
/// processes of its host ([`cluster::Cluster::local_index`]).
pub fn device_ordinal(name: &str, cluster: &cluster::Cluster) -> Result<Option<usize>, String> {
    if name == "cpu" {
        return Ok(None);
    }
    let ordinal = name.strip_prefix("cuda:").and_then(|n| {
        if n == "{local}" {
            Some(cluster.local_index())
        } else {
            n.parse::<usize>().ok()
        }
    });
    ordinal.map(Some).ok_or_else(|| {
        "expected `cpu`, `cuda:N` (N the GPU's ordinal) or `cuda:{local}`".to_string()
    })
}

/// The quarantine's file name in a run directory.
pub const QUARANTINE_FILE: &str = "quarantine.jsonl";

#[cfg(test)]
mod tests {
    use super::*;

    /// A pipeline from TOML text, resolved as if read from `/base/p.toml`.
    pub(crate) fn parse(text: &str) -> Result<Pipeline, EngineError> {
        let file: PipelineFile =
            toml::from_str(text).map_err(|e| EngineError::Invalid(e.to_string()))?;
        Pipeline::resolve(file, Path::new("/base"), Path::new("/base/p.toml"))
    }

    /// The smallest valid configuration.
    pub(crate) const MINIMAL: &str = r#"
run_dir = "run"
corpus = "c.jsonl"
[queries]
path = "q.jsonl"
qrels = "/abs/train.tsv"
[[retrievers]]
model = "org/model"
"#;

    #[test]
    fn defaults_are_the_recipes_and_paths_resolve_against_the_file() {
        let p = parse(MINIMAL).unwrap();
        assert_eq!(p.run_dir, PathBuf::from("/base/run"));
        assert_eq!(p.corpus, PathBuf::from("/base/c.jsonl"));
        let queries = p.queries.as_ref().unwrap();
        assert_eq!(queries.qrels, PathBuf::from("/abs/train.tsv"));
        assert_eq!(queries.query_type, "human");
        assert!(p.generate.is_none());
        assert_eq!(p.candidates.rrf_k, 60.0);
        assert_eq!(p.candidates.retrieve_top, 100);
        assert_eq!(p.candidates.source_in_top, 20);
        assert_eq!(p.teacher.keep_top, 20);
        assert_eq!(p.held_out.count, 100);
        // A hub id that is not a local path stays a hub id.
        assert_eq!(p.retrievers[0].model.as_deref(), Some("org/model"));
    }

    #[test]
    fn the_device_is_resolved_once_and_a_bad_one_named() {
        assert!(matches!(
            parse(MINIMAL).unwrap().device,
            candle_core::Device::Cpu
        ));
        for (value, said) in [
            ("gpu", "expected `cpu`, `cuda:N`"),
            ("cuda:x", "expected `cpu`, `cuda:N`"),
            ("cuda:{process}", "or `cuda:{local}`"),
        ] {
            let e = parse(&format!("{MINIMAL}\n[engine]\ndevice = \"{value}\"\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("engine.device = \"{value}\"")), "{e}");
            assert!(e.contains(said), "{e}");
        }
        // `cuda:{local}`: each process of a host its own GPU.
        let dir = tempfile::tempdir().unwrap();
        let hosts = dir.path().join("hosts");
        std::fs::write(&hosts, "a:1\nb:1\na:2\n").unwrap();
        let ordinals: Vec<Option<usize>> = (0..3)
            .map(|p| {
                let c = cluster::Cluster::new(3, p, Some(&hosts)).unwrap();
                device_ordinal("cuda:{local}", &c).unwrap()
            })
            .collect();
        assert_eq!(ordinals, [Some(0), Some(0), Some(1)]);
        let one = cluster::Cluster::single();
        assert_eq!(device_ordinal("cuda:3", &one), Ok(Some(3)));
        assert_eq!(device_ordinal("cpu", &one), Ok(None));
        // Without the cuda feature a GPU is refused by name, not at the first model load.
        if !cfg!(feature = "cuda") {
            let e = parse(&format!("{MINIMAL}\n[engine]\ndevice = \"cuda:0\"\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("no CUDA support"), "{e}");
        }
    }

    #[test]
    fn unknown_fields_and_bad_values_are_named() {
        let e = parse(&format!("{MINIMAL}\n[candidates]\nrrf = 3\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `rrf`"), "{e}");
        let e = parse(&format!(
            "{MINIMAL}\n[engine]\non_bad_record = \"ignore\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("on_bad_record must be `fail` or `skip`, found `ignore`"),
            "{e}"
        );
        let e = parse(&format!(
            "{MINIMAL}\n[[teachers]]\nmodel = \"t\"\nweight = -1\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("teachers[0].weight"), "{e}");
        let no_retriever = "run_dir = \"r\"\ncorpus = \"c\"\nretrievers = []\n[queries]\npath = \"q\"\nqrels = \"t\"\n";
        let e = parse(no_retriever).unwrap_err().to_string();
        assert!(e.contains("at least one"), "{e}");
    }
}
