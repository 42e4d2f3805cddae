//! The command line as written: the subcommands, their arguments and the options they
//! share (`clap` derives). What each command does is in `main.rs`; what the options
//! mean for the engine is in the library's resolved settings.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use distillery::config::cluster::Cluster;
use distillery::config::Pipeline;
use distillery::config::{DEFAULT_BATCH_ROWS, DEFAULT_BATCH_TOKENS};

#[derive(Parser)]
#[command(
    name = "distillery",
    version,
    about = "Turn a passage corpus into a fine-tuned dense retriever"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Run the whole recipe: generate, mine, label, train, then evaluate the base and
    /// the fine-tuned model; writes run-summary.json and report.html. Without --config,
    /// the demo on the SciFact subset shipped with distillery.
    Run(RunArgs),
    /// Embed a BEIR dataset, retrieve exactly, and report nDCG@10, Recall@100, MRR@10.
    Eval(EvalArgs),
    /// Embed any passages (.jsonl, .tsv, .parquet) or queries file into a Parquet file.
    Embed(EmbedArgs),
    /// Generate synthetic queries for passages: from a configuration's [generate], or for
    /// any passages file (--input/--output).
    Generate(GenerateArgs),
    /// Mine hard-negative candidates for every query (retrieve, filter, fuse by RRF).
    Mine(ConfigArgs),
    /// Mine (reused when unchanged), score every candidate with the teachers, filter,
    /// normalise, split: the examples table.
    Label(ConfigArgs),
    /// Score every (query, passage) pair of a file (.jsonl, .tsv) with a cross-encoder
    /// into a Parquet file.
    Score(ScoreArgs),
    /// Label (reused) and fine-tune the student: listwise KL + InfoNCE with gradient
    /// caching; resumes from the run's checkpoint; exports the best model.
    Train(ConfigArgs),
    /// Print the CPU, its features and the CPU path the hand-written kernels take.
    ///
    /// The path is generic, avx2 or avx512: the best this CPU runs unless DISTILLERY_CPU
    /// forces one. Fails when DISTILLERY_CPU names no path or one this CPU cannot run.
    Cpu,
    /// Print what this binary was built with (features, CPU path) and the devices it can
    /// use; with --device, open that device and run a small product on it, or say why it
    /// cannot be used (exit status 1).
    Doctor(DoctorArgs),
    /// Run the recipe on a sample of the configuration's corpus on the chosen device:
    /// each device stage's rate, each part's time, and the estimated wall time of a full
    /// run on N passages. Without --config, the demo's.
    Bench(BenchArgs),
}

#[derive(Args)]
pub(crate) struct BenchArgs {
    #[command(flatten)]
    pub(crate) run: RunArgs,
    /// The device to measure, over the configuration's [engine] device: `cpu` or
    /// `cuda:N`.
    #[arg(long)]
    pub(crate) device: Option<String>,
    /// Passages of the sample run: a seeded draw from the corpus.
    #[arg(long, default_value_t = distillery::driver::bench::DEFAULT_SAMPLE)]
    pub(crate) sample: usize,
    /// Estimate a run on this many passages (default: the corpus's).
    #[arg(long)]
    pub(crate) passages: Option<u64>,
    /// Write the measurements and the estimate as JSON here.
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
}

#[derive(Args)]
pub(crate) struct DoctorArgs {
    /// A device to check: `cpu` or `cuda:N`.
    #[arg(long)]
    pub(crate) device: Option<String>,
}

#[derive(Args)]
pub(crate) struct ConfigArgs {
    /// The pipeline configuration (TOML; see the README).
    #[arg(long)]
    pub(crate) config: PathBuf,
    #[command(flatten)]
    pub(crate) engine: EngineArgs,
}

/// The options that override a configuration's `[engine]`.
#[derive(Args)]
pub(crate) struct EngineArgs {
    /// Timely worker threads (tokenisation and batching); default: the configuration's
    /// [engine] workers.
    #[arg(short = 'w', long)]
    pub(crate) workers: Option<usize>,
    /// What to do with a bad input record: stop with an error naming it, or skip it into
    /// the run directory's quarantine.jsonl; default: the configuration's
    /// [engine] on_bad_record.
    #[arg(long, value_enum)]
    pub(crate) on_bad_record: Option<OnBadRecord>,
    /// No progress output.
    #[arg(long)]
    pub(crate) quiet: bool,
    /// Processes of timely's cluster (default: the configuration's [engine] processes).
    #[arg(short = 'n', long)]
    pub(crate) processes: Option<usize>,
    /// This process's index (default: the configuration's [engine] process).
    #[arg(short = 'p', long)]
    pub(crate) process: Option<usize>,
    /// host:port lines, one per process (default: the configuration's [engine]
    /// hostfile, else localhost:2101 onwards).
    #[arg(long)]
    pub(crate) hostfile: Option<PathBuf>,
}

impl EngineArgs {
    /// `pipeline` with these options over its `[engine]`, its compute threads set and
    /// its run directory made.
    pub(crate) fn apply(&self, mut pipeline: Pipeline) -> Result<Pipeline> {
        let c = &pipeline.cluster;
        let cluster =
            if self.processes.is_some() || self.process.is_some() || self.hostfile.is_some() {
                Some(Cluster::new(
                    self.processes.unwrap_or(c.processes),
                    self.process.unwrap_or(c.process),
                    self.hostfile.as_deref().or(c.hostfile.as_deref()),
                )?)
            } else {
                None
            };
        pipeline.override_engine_in(
            self.workers,
            self.on_bad_record.map(|o| o == OnBadRecord::Skip),
            self.quiet,
            cluster,
        )?;
        set_threads(Some(pipeline.threads));
        // A follower keeps no run directory: process 0 holds the run.
        if pipeline.cluster.is_leader() {
            std::fs::create_dir_all(&pipeline.run_dir)
                .with_context(|| format!("cannot create {}", pipeline.run_dir.display()))?;
        }
        Ok(pipeline)
    }
}

impl ConfigArgs {
    /// The configuration, checked and resolved, with the command line's options over it.
    pub(crate) fn pipeline(&self) -> Result<Pipeline> {
        self.engine.apply(Pipeline::load(&self.config)?)
    }
}

#[derive(Args)]
pub(crate) struct RunArgs {
    /// The pipeline configuration (TOML; see the README). Default: the demo.
    #[arg(long)]
    pub(crate) config: Option<PathBuf>,
    /// The run directory, over the configuration's run_dir (the demo's default:
    /// runs/demo).
    #[arg(long)]
    pub(crate) run_dir: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) engine: EngineArgs,
}

#[derive(Args)]
pub(crate) struct ModelArgs {
    /// Model directory or Hugging Face hub id (in the local hub cache). Default:
    /// $DISTILLERY_MODEL, then all-MiniLM-L6-v2 from the hub cache, then a tiny random
    /// model (said so plainly).
    #[arg(long)]
    pub(crate) model: Option<String>,
    /// Maximum tokens per text (default: the model's max_seq_length).
    #[arg(long)]
    pub(crate) max_seq_length: Option<usize>,
    /// Prefix for queries (default: the model's `query` prompt).
    #[arg(long)]
    pub(crate) query_prefix: Option<String>,
    /// Prefix for passages (default: the model's `passage`/`document` prompt).
    #[arg(long)]
    pub(crate) passage_prefix: Option<String>,
    /// Padded tokens per device batch.
    #[arg(long, default_value_t = DEFAULT_BATCH_TOKENS)]
    pub(crate) batch_tokens: usize,
    /// Most texts per device batch.
    #[arg(long, default_value_t = DEFAULT_BATCH_ROWS)]
    pub(crate) batch_rows: usize,
    /// The device the model runs on: `cpu`, or `cuda:N` (a build with `--features
    /// cuda`; `distillery doctor` says what this build can use). With several processes
    /// on a host, `cuda:{local}` gives each its own GPU.
    #[arg(long, default_value = "cpu")]
    pub(crate) device: String,
    /// Compute threads for the model (default: all cores).
    #[arg(long)]
    pub(crate) threads: Option<usize>,
    /// Timely worker threads (tokenisation and batching).
    #[arg(short = 'w', long, default_value_t = 1)]
    pub(crate) workers: usize,
    /// What to do with a bad input record: stop with an error naming it, or skip it into
    /// the run directory's quarantine.jsonl.
    #[arg(long, value_enum, default_value_t = OnBadRecord::Fail)]
    pub(crate) on_bad_record: OnBadRecord,
    /// No progress output.
    #[arg(long)]
    pub(crate) quiet: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum OnBadRecord {
    Fail,
    Skip,
}

#[derive(Args)]
pub(crate) struct EvalArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// BEIR dataset directory (corpus.jsonl, queries.jsonl, qrels/<split>.tsv).
    #[arg(long)]
    pub(crate) dataset: PathBuf,
    #[arg(long, default_value = "test")]
    pub(crate) split: String,
    /// Run directory (stages are reused from it when inputs and settings are unchanged).
    /// Default: runs/eval-<dataset name>.
    #[arg(long)]
    pub(crate) run_dir: Option<PathBuf>,
    /// Write the metrics as JSON here.
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
    /// A pipeline configuration whose [[teachers]] rerank each query's top 100 (the
    /// teacher check): their metrics are reported beside the model's.
    #[arg(long, value_name = "CONFIG")]
    pub(crate) teachers: Option<PathBuf>,
}

#[derive(Args)]
pub(crate) struct EmbedArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// Passages (.jsonl BEIR corpus, .tsv, .parquet) or, with --kind query, queries.
    #[arg(long)]
    pub(crate) input: PathBuf,
    /// Output Parquet file: columns id, embedding.
    #[arg(long)]
    pub(crate) output: PathBuf,
    #[arg(long, value_enum, default_value_t = Kind::Passage)]
    pub(crate) kind: Kind,
    /// Run directory for the stage's parts (resume). Default: <output>.run
    #[arg(long)]
    pub(crate) run_dir: Option<PathBuf>,
    /// Write timing as JSON here (passages, seconds, passages_per_second).
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) cluster: ClusterArgs,
}

/// Timely's cluster, as its own examples take it: the same command on every process,
/// with its own `-p`.
#[derive(Args)]
pub(crate) struct ClusterArgs {
    /// Processes in the cluster; process 0 reads the input, writes the output and feeds
    /// the others.
    #[arg(short = 'n', long, default_value_t = 1)]
    pub(crate) processes: usize,
    /// This process's index, 0 to processes - 1.
    #[arg(short = 'p', long, default_value_t = 0)]
    pub(crate) process: usize,
    /// A file of host:port lines, one per process, in process order (default:
    /// localhost:2101, localhost:2102, ...).
    #[arg(long)]
    pub(crate) hostfile: Option<PathBuf>,
}

impl ClusterArgs {
    /// The cluster these flags name.
    pub(crate) fn cluster(&self) -> Result<Cluster> {
        Ok(Cluster::new(
            self.processes,
            self.process,
            self.hostfile.as_deref(),
        )?)
    }
}

#[derive(Args)]
pub(crate) struct ScoreArgs {
    /// Cross-encoder directory (config.json, tokenizer.json, model.safetensors): BERT,
    /// ELECTRA or XLM-RoBERTa sequence classification.
    #[arg(long)]
    pub(crate) model: PathBuf,
    /// Pairs: .jsonl lines {"id"?, "query", "passage"}, or .tsv `query<TAB>passage` or
    /// `id<TAB>query<TAB>passage`. Without an id, a pair's id is its line number.
    #[arg(long)]
    pub(crate) input: PathBuf,
    /// Output Parquet file: columns id, score, in input order.
    #[arg(long)]
    pub(crate) output: PathBuf,
    /// Most tokens per pair, special tokens included (default: the model's).
    #[arg(long)]
    pub(crate) max_length: Option<usize>,
    /// Write the outcome as JSON here (pairs, seconds, pairs_per_second, ...).
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
    /// Run directory for the stage's parts (resume). Default: <output>.run
    #[arg(long)]
    pub(crate) run_dir: Option<PathBuf>,
    /// The device the model runs on: `cpu`, or `cuda:N` (a build with `--features
    /// cuda`; `distillery doctor` says what this build can use). With several processes
    /// on a host, `cuda:{local}` gives each its own GPU.
    #[arg(long, default_value = "cpu")]
    pub(crate) device: String,
    /// Compute threads for the model (default: all cores).
    #[arg(long)]
    pub(crate) threads: Option<usize>,
    /// Padded tokens per device batch.
    #[arg(long, default_value_t = DEFAULT_BATCH_TOKENS)]
    pub(crate) batch_tokens: usize,
    /// Timely worker threads (tokenisation and batching).
    #[arg(short = 'w', long, default_value_t = 1)]
    pub(crate) workers: usize,
    /// What to do with a bad input record: stop with an error naming it, or skip it into
    /// the run directory's quarantine.jsonl.
    #[arg(long, value_enum, default_value_t = OnBadRecord::Fail)]
    pub(crate) on_bad_record: OnBadRecord,
    /// No progress output.
    #[arg(long)]
    pub(crate) quiet: bool,
    #[command(flatten)]
    pub(crate) cluster: ClusterArgs,
}

#[derive(Args)]
pub(crate) struct GenerateArgs {
    /// The pipeline configuration (its [generate] section); or give --input and --output.
    #[arg(long, conflicts_with_all = ["input", "output"])]
    pub(crate) config: Option<PathBuf>,
    /// Passages (.jsonl BEIR corpus, .tsv, .parquet).
    #[arg(long, requires = "output")]
    pub(crate) input: Option<PathBuf>,
    /// The queries: .parquet, else JSONL (query_id, query_text, query_type, source_id,
    /// held_out).
    #[arg(long, requires = "input")]
    pub(crate) output: Option<PathBuf>,
    /// extractive (no LLM: a baseline), llm (--model: a Hugging Face directory or a .gguf
    /// file) or endpoint (--url: an OpenAI-compatible server).
    #[arg(long, default_value = "extractive")]
    pub(crate) generator: String,
    /// The LLM (llm), or the model name the server knows (endpoint).
    #[arg(long)]
    pub(crate) model: Option<String>,
    /// Tokenizer directory of a .gguf model (default: the file's directory).
    #[arg(long)]
    pub(crate) tokenizer: Option<PathBuf>,
    /// Endpoint base URL, e.g. http://localhost:8000/v1.
    #[arg(long)]
    pub(crate) url: Option<String>,
    /// The NAME of the environment variable holding the endpoint's API key.
    #[arg(long)]
    pub(crate) api_key_env: Option<String>,
    /// Requests in flight at once (endpoint).
    #[arg(long)]
    pub(crate) concurrency: Option<usize>,
    /// Query types, comma-separated (default: all six; title,claim,keywords for
    /// extractive).
    #[arg(long, value_delimiter = ',')]
    pub(crate) types: Option<Vec<String>>,
    /// The run seed.
    #[arg(long, default_value_t = 42)]
    pub(crate) seed: u64,
    #[arg(long)]
    pub(crate) temperature: Option<f64>,
    /// At most this many passages (default: the recipe's 100,000).
    #[arg(long)]
    pub(crate) max_passages: Option<usize>,
    /// Passages held out as a synthetic test set (their queries are marked held_out).
    #[arg(long, default_value_t = distillery::config::DEFAULT_HELD_OUT)]
    pub(crate) held_out: usize,
    /// Requests handed to the generator at once.
    #[arg(long)]
    pub(crate) batch_size: Option<usize>,
    /// Run directory (the query cache lives here). Default: <output>.run
    #[arg(long)]
    pub(crate) run_dir: Option<PathBuf>,
    /// The device the in-process LLM (`--generator llm`) runs on: `cpu`, or `cuda:N` (a
    /// build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub(crate) device: String,
    /// Compute threads for the model (default: all cores).
    #[arg(long)]
    pub(crate) threads: Option<usize>,
    /// Write the outcome as JSON here.
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
    /// What to do with a bad input record: stop with an error naming it, or skip it into
    /// the run directory's quarantine.jsonl (default: fail; with --config, the
    /// configuration's [engine] on_bad_record).
    #[arg(long, value_enum)]
    pub(crate) on_bad_record: Option<OnBadRecord>,
    /// No progress output.
    #[arg(long)]
    pub(crate) quiet: bool,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum Kind {
    Passage,
    Query,
}

/// Sets the compute thread count before any model code starts its thread pools.
pub(crate) fn set_threads(threads: Option<usize>) -> usize {
    let n = threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    // Safety of set_var: called first thing in main, before any other thread exists.
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    n
}
