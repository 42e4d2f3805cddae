//! The generation stage: synthetic queries for a corpus (RECIPE.md sections 1 and 2).
//!
//! passages -> [`Preparer`] (truncate, drop short, near-duplicates, sample, held-out)
//! -> one request per passage and query type -> the query cache -> the generator, for
//! what the cache does not hold -> the generated queries.
//!
//! Contracts:
//! - **Nothing regenerated.** Every outcome is appended to the generator's cache stage
//!   ([`crate::generate::cache`]) under a key of (passage hash, type, generator id,
//!   prompt hash, seed): an unchanged rerun generates nothing; an edited passage
//!   regenerates only its own queries; a killed run keeps every part committed before the
//!   kill (a part is at most [`PART_ROWS`] outcomes or [`PART_SECONDS`] of generation).
//! - **Nothing lost.** Each request ends as a query or as a failure with its reason:
//!   failures are listed in `run_dir/generate-failures.jsonl` and counted in the outcome;
//!   a rerun tries them again. Passages dropped by preparation are in the report
//!   (`run_dir/generate-report.json`).
//! - **Reproducible.** A request's seed derives from (passage hash, type, run seed), so
//!   the same seed gives the same queries; outputs are in passage order, then type order,
//!   whatever the batching.
//! - **Backpressure.** The generator runs on its own thread and hands finished batches to
//!   the writer through a channel of [`GENERATED_QUEUE_DEPTH`] batches: the generator
//!   (the device) never waits on Parquet writes, and a slow disk stops it after a bounded
//!   amount of unwritten work.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Sender};
use distillery_operators::llm::{LlmOptions, SamplingParams};
use serde::Serialize;

use crate::config::{GenerateFile, HeldOutFile, Pipeline};
use crate::corpus::open_passages;
use crate::corpus::{quarantined, read_options};
use crate::dataflow::corpus_change::{plan_and_record, ChangePlan, CorpusVersion};
use crate::dataflow::journal_device_stage;
use crate::error::EngineError;
use crate::executor::DeviceExecutor;
use crate::generate::cache::CachedOutcome;
use crate::generate::cache::{cache_batch, cache_key, cache_schema, cache_stage, read_cache};
use crate::generate::endpoint::{EndpointGenerator, EndpointOptions};
use crate::generate::extractive::{DocumentFrequencies, ExtractiveGenerator};
use crate::generate::llm::LlmQueryGenerator;
use crate::generate::prepare::{
    PrepareOptions, PrepareReport, Preparer, SampledPassage, SPILL_BUFFER_BYTES,
};
use crate::generate::prompts::{PromptSet, QueryTypeSpec, BUILTIN_TYPES};
use crate::generate::queries_table::{query_id, write_queries_file, GeneratedQuery};
use crate::generate::{Generated, QueryGenerator};
use crate::progress::Progress;
use crate::store::StageStore;

/// Most outcomes per cache part: small enough that a killed run loses little.
pub const PART_ROWS: usize = 1024;
/// A part is also committed after this long, so a slow LLM loses at most this much work.
pub const PART_SECONDS: Duration = Duration::from_secs(30);
/// Generated batches waiting for the writer: one being written while the next waits.
pub const GENERATED_QUEUE_DEPTH: usize = 2;

/// Requests failing in a row before the stage stops: a server that is down, a key that
/// is refused, a model that only emits end-of-turn. Far above what a few bad passages
/// give, low enough that a dead endpoint costs minutes of retries, not days. What was
/// generated is kept; the rerun retries the failures.
pub const MAX_FAILURES_IN_A_ROW: usize = 256;

/// The generated queries of a pipeline, as a file in its run directory.
pub const QUERIES_FILE: &str = "generated-queries.parquet";
/// The failures of the last run, one JSON object per line.
pub const FAILURES_FILE: &str = "generate-failures.jsonl";
/// The outcome and the preparation report of the last run.
pub const REPORT_FILE: &str = "generate-report.json";
/// Passage preparation's spill directory in the run directory: a temporary name, so the
/// store's recovery removes one a killed run left behind.
pub const PREPARE_SPILL_DIR: &str = ".prepare.tmp";

/// Which generator writes the queries.
#[derive(Debug, Clone)]
pub enum GeneratorChoice {
    /// No LLM: titles, sentences and TF-IDF keywords (a baseline).
    Extractive,
    /// An LLM in this process: a Hugging Face directory or a `.gguf` file.
    Llm { model: PathBuf, options: LlmOptions },
    /// An OpenAI-compatible server.
    Endpoint(EndpointOptions),
}

/// Everything `generate` needs, resolved.
#[derive(Debug, Clone)]
pub struct GenerateJob {
    /// The passages (BEIR JSONL, TSV or Parquet).
    pub corpus: PathBuf,
    pub run_dir: PathBuf,
    pub prepare: PrepareOptions,
    pub prompts: PromptSet,
    /// The run seed of every request's seed.
    pub seed: u64,
    pub generator: GeneratorChoice,
    pub sampling: SamplingParams,
    /// Requests handed to the generator at once.
    pub batch_size: usize,
    /// Also write the queries here (`.parquet`, else JSONL).
    pub output: Option<PathBuf>,
    /// Skip bad records into this quarantine file instead of stopping.
    pub quarantine: Option<PathBuf>,
    pub quiet: bool,
}

/// What `generate` did.
#[derive(Debug, Clone, Serialize)]
pub struct GenerateOutcome {
    pub generator: String,
    /// Passages prepared (after preparation's filters).
    pub passages: usize,
    /// Requests: prepared passages x query types.
    pub requests: usize,
    /// Requests served from the cache.
    pub cached: usize,
    /// Requests the generator ran now (queries and failures).
    pub generated_now: usize,
    /// Queries in the output.
    pub queries: usize,
    /// Requests without a query (listed in the failures file).
    pub failed: usize,
    /// Wall time of the generation (0 when everything came from the cache).
    pub seconds: f64,
    pub passages_per_second: f64,
    pub tokens: u64,
    pub tokens_per_second: f64,
    pub prepare: PrepareReport,
    pub skipped_records: u64,
    pub quarantine: Option<PathBuf>,
    pub queries_file: PathBuf,
    pub failures_file: PathBuf,
    /// What changed since the last generation that finished in this run directory.
    pub change: ChangePlan,
    /// Seconds the change plan took: reading the last version, the dataflow, recording
    /// this version.
    pub change_seconds: f64,
    /// The queries, in passage then type order.
    #[serde(skip)]
    pub rows: Vec<GeneratedQuery>,
}

/// One failed request, as the failures file lists it.
#[derive(Debug, Clone, Serialize)]
struct Failure<'a> {
    passage_id: &'a str,
    query_type: &'a str,
    reason: &'a str,
}

impl GenerateJob {
    /// The job of a pipeline's `[generate]` section (`None` when it has none).
    pub fn from_pipeline(pipeline: &Pipeline) -> Result<Option<Self>, EngineError> {
        let Some(file) = &pipeline.generate else {
            return Ok(None);
        };
        let mut job = Self::from_file(
            file,
            &pipeline.corpus,
            &pipeline.run_dir,
            &pipeline.held_out,
            pipeline.quarantine.clone(),
        )?;
        job.quiet = pipeline.quiet;
        job.set_device(&pipeline.device);
        Ok(Some(job))
    }

    /// Runs an in-process LLM on `device` (the other generators run no model here).
    pub fn set_device(&mut self, device: &candle_core::Device) {
        if let GeneratorChoice::Llm { options, .. } = &mut self.generator {
            options.device = device.clone();
        }
    }

    /// The job of a `[generate]` section over `corpus`; `held_out` is the pipeline's
    /// choice of held-out passages, so that `mine` and `generate` agree.
    pub fn from_file(
        file: &GenerateFile,
        corpus: &Path,
        run_dir: &Path,
        held_out: &HeldOutFile,
        quarantine: Option<PathBuf>,
    ) -> Result<Self, EngineError> {
        let invalid = |m: String| EngineError::Invalid(format!("[generate] {m}"));
        let sampling = SamplingParams {
            temperature: file.temperature,
            top_p: file.top_p,
            max_new_tokens: file.max_new_tokens,
            min_new_tokens: file.min_new_tokens,
        };
        let prompts = prompt_set(file).map_err(|e| invalid(e.to_string()))?;
        let generator = generator_choice(file, sampling)?;
        if file.batch_size == 0 {
            return Err(invalid("batch_size must be at least 1".into()));
        }
        let prepare = PrepareOptions {
            max_chars: file.max_chars,
            min_chars: file.min_chars,
            dedup: file.dedup,
            max_passages: file.max_passages,
            held_out: held_out.count,
            seed: held_out.seed,
            ..PrepareOptions::default()
        };
        prepare.check().map_err(|e| invalid(e.to_string()))?;
        Ok(GenerateJob {
            corpus: corpus.to_path_buf(),
            run_dir: run_dir.to_path_buf(),
            prepare,
            prompts,
            seed: file.seed,
            generator,
            sampling,
            batch_size: file.batch_size,
            output: None,
            quarantine,
            quiet: false,
        })
    }
}

/// The query types the extractive baseline writes by default: its `search` and `web`
/// queries are its keywords again, which would only repeat the `keywords` query.
pub const EXTRACTIVE_DEFAULT_TYPES: [&str; 3] = ["title", "claim", "keywords"];

/// The query types of `[generate]`: built-in names and the custom types they refer to.
fn prompt_set(file: &GenerateFile) -> Result<PromptSet, EngineError> {
    let extractive = file.generator == "extractive";
    let names: Vec<String> = match &file.types {
        Some(types) => types.clone(),
        None if extractive => EXTRACTIVE_DEFAULT_TYPES.map(String::from).to_vec(),
        None => BUILTIN_TYPES.map(String::from).to_vec(),
    };
    if extractive {
        if let Some(bad) = names.iter().find(|n| !ExtractiveGenerator::supports(n)) {
            return Err(EngineError::Invalid(format!(
                "the extractive generator writes no `{bad}` queries; it writes title, claim, \
                 keywords, search and web (an LLM writes every type)"
            )));
        }
    }
    let mut specs = Vec::new();
    for name in &names {
        let spec = match file.custom_types.iter().find(|c| &c.name == name) {
            Some(c) => {
                QueryTypeSpec::custom(&c.name, &c.instruction, c.examples.as_deref(), c.shots)
            }
            None => QueryTypeSpec::builtin(name),
        };
        specs.push(spec.map_err(|e| EngineError::Invalid(e.to_string()))?);
    }
    for custom in &file.custom_types {
        if BUILTIN_TYPES.contains(&custom.name.as_str()) {
            return Err(EngineError::Invalid(format!(
                "custom type `{}` has the name of a built-in type",
                custom.name
            )));
        }
        if !names.contains(&custom.name) {
            return Err(EngineError::Invalid(format!(
                "custom type `{}` is not listed in `types`, so it would never run",
                custom.name
            )));
        }
    }
    PromptSet::new(specs).map_err(|e| EngineError::Invalid(e.to_string()))
}

fn generator_choice(
    file: &GenerateFile,
    sampling: SamplingParams,
) -> Result<GeneratorChoice, EngineError> {
    let invalid = |m: &str| EngineError::Invalid(format!("[generate] {m}"));
    Ok(match file.generator.as_str() {
        "extractive" => GeneratorChoice::Extractive,
        "llm" => {
            let model = file
                .model
                .as_ref()
                .ok_or_else(|| invalid("generator `llm` needs `model` (a directory or .gguf)"))?;
            GeneratorChoice::Llm {
                model: PathBuf::from(model),
                options: LlmOptions {
                    tokenizer_dir: file.tokenizer.clone(),
                    max_batch_rows: file.batch_size.max(1),
                    prefix_cache_bytes: file.prefix_cache_mb.saturating_mul(1 << 20),
                    ..LlmOptions::default()
                },
            }
        }
        "endpoint" => {
            let endpoint = file
                .endpoint
                .as_ref()
                .ok_or_else(|| invalid("generator `endpoint` needs `[generate.endpoint]`"))?;
            let model = file
                .model
                .as_ref()
                .ok_or_else(|| invalid("generator `endpoint` needs `model` (the served name)"))?;
            let mut options = EndpointOptions::new(&endpoint.url, model);
            options.api_key_env = endpoint.api_key_env.clone();
            if let Some(c) = endpoint.concurrency {
                options.concurrency = c;
            }
            if let Some(t) = endpoint.timeout_s {
                if !(t.is_finite() && t > 0.0) {
                    return Err(invalid("endpoint.timeout_s must be a positive number"));
                }
                options.timeout = Duration::from_secs_f64(t);
            }
            if let Some(r) = endpoint.max_retries {
                options.max_retries = r;
            }
            options.sampling = sampling;
            GeneratorChoice::Endpoint(options)
        }
        other => {
            return Err(invalid(&format!(
                "generator must be `extractive`, `llm` or `endpoint`, found `{other}`"
            )))
        }
    })
}

/// The generator `job` names, over its prepared passages (the extractive one takes their
/// document frequencies).
pub fn build_generator(
    job: &GenerateJob,
    passages: &[SampledPassage],
) -> Result<Box<dyn QueryGenerator>, EngineError> {
    Ok(match &job.generator {
        GeneratorChoice::Extractive => {
            let cores = std::thread::available_parallelism().map_or(1, usize::from);
            Box::new(ExtractiveGenerator::new(
                DocumentFrequencies::from_passages_on_threads(passages, |p| &p.passage, cores),
            ))
        }
        GeneratorChoice::Llm { model, options } => {
            Box::new(LlmQueryGenerator::load(model, options, job.sampling)?)
        }
        GeneratorChoice::Endpoint(options) => Box::new(EndpointGenerator::new(options.clone())?),
    })
}

/// Runs the job with the generator it names.
pub fn run_generate(job: &GenerateJob) -> Result<GenerateOutcome, EngineError> {
    run_generate_with(job, &|passages| build_generator(job, passages))
}

/// Builds the generator once the passages are prepared (the extractive baseline needs
/// their document frequencies).
pub type GeneratorFactory<'a> =
    dyn Fn(&[SampledPassage]) -> Result<Box<dyn QueryGenerator>, EngineError> + 'a;

/// Runs the job with the generator `make` builds (`job.generator` is not used): for
/// generators of the caller's own.
pub fn run_generate_with(
    job: &GenerateJob,
    make: &GeneratorFactory<'_>,
) -> Result<GenerateOutcome, EngineError> {
    run_generate_streaming(job, make, &[])
}

/// Where the generation stage sends the texts of the training queries (those of passages
/// not held out) as they come: each receiver gets every batch it has room for. What a
/// full receiver misses, its consumer meets later in the queries file; the stream is
/// for work that can start early (embedding the queries ahead), never the only copy.
pub type QueryStream = Sender<Vec<String>>;

/// Offers `texts` to every stream that has room (see [`QueryStream`]).
fn offer(streams: &[QueryStream], texts: Vec<String>) {
    if texts.is_empty() {
        return;
    }
    for stream in streams {
        // Full or closed: the consumer is behind or gone, and finds these later.
        let _ = stream.try_send(texts.clone());
    }
}

/// [`run_generate_with`], sending the training queries' texts to `streams` as they
/// are generated (those from the cache were sent when they were generated).
pub fn run_generate_streaming(
    job: &GenerateJob,
    make: &GeneratorFactory<'_>,
    streams: &[QueryStream],
) -> Result<GenerateOutcome, EngineError> {
    std::fs::create_dir_all(&job.run_dir).map_err(|source| EngineError::Write {
        path: job.run_dir.clone(),
        source,
    })?;
    let store = StageStore::open(&job.run_dir)?;
    let read = read_options(job.quarantine.as_deref())?;
    let mut preparer = Preparer::new(job.prepare.clone())
        .map_err(|e| EngineError::Invalid(e.to_string()))?
        .spill_to(job.run_dir.join(PREPARE_SPILL_DIR), SPILL_BUFFER_BYTES);
    for passage in open_passages(&job.corpus, &read)? {
        preparer
            .push(passage?)
            .map_err(|e| EngineError::Invalid(format!("{}: {e}", job.corpus.display())))?;
    }
    let prepared = preparer
        .finish()
        .map_err(|e| EngineError::Invalid(e.to_string()))?;
    let (skipped_records, quarantine) = quarantined(&read)?;
    let passages = prepared.passages;
    let read_passages = prepared.read;

    let generator = make(&passages)?;
    let generator_id = generator.id();
    let types = job.prompts.types();
    let prompt_hashes: Vec<String> = types.iter().map(|t| t.prompt_hash()).collect();
    // Every request's cache key, passage-major: (passage, type) -> key. A generator's
    // inputs may read the whole passage (the extractive keywords' term frequencies), so
    // the passages are split over the cores, in order.
    let type_names: Vec<&str> = types.iter().map(|t| t.name()).collect();
    let key_of = |p: &SampledPassage| -> Vec<String> {
        let inputs = generator.request_inputs_of_types(&p.passage, &type_names);
        types
            .iter()
            .zip(&prompt_hashes)
            .zip(inputs)
            .map(|((t, prompt_hash), inputs)| {
                let seed = crate::generate::prompts::seed_for(&p.passage.hash, t.name(), job.seed);
                cache_key(
                    &p.passage.hash,
                    t.name(),
                    &generator_id,
                    prompt_hash,
                    seed,
                    inputs.as_deref(),
                )
            })
            .collect()
    };
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let per_core = passages.len().div_ceil(cores).max(1);
    let keys: Vec<Vec<String>> = std::thread::scope(|scope| {
        let parts: Vec<_> = passages
            .chunks(per_core)
            .map(|chunk| scope.spawn(move || chunk.iter().map(key_of).collect::<Vec<_>>()))
            .collect();
        let mut keys = Vec::with_capacity(passages.len());
        for part in parts {
            keys.extend(part.join().map_err(|_| {
                EngineError::Dataflow("a cache key thread panicked; this is a bug".into())
            })?);
        }
        Ok::<_, EngineError>(keys)
    })?;
    let (stage, stage_key) = cache_stage(&generator_id);
    let mut known = read_cache(&store, &stage, &stage_key)?;
    let missing: Vec<(usize, usize)> = keys
        .iter()
        .enumerate()
        .flat_map(|(p, row)| {
            row.iter()
                .enumerate()
                .filter(|(_, k)| !known.contains_key(*k))
                .map(move |(t, _)| (p, t))
        })
        .collect();
    let requests = passages.len() * types.len();
    let cached = requests - missing.len();
    // passages_missing[i]: distinct passages among missing[..=i].
    let passages_missing = distinct_prefix_counts(&missing);
    let generated_passages = passages_missing.last().copied().unwrap_or(0);

    let mut failures: HashMap<(usize, usize), String> = HashMap::new();
    let mut tokens = 0u64;
    let start = Instant::now();
    if !missing.is_empty() {
        let progress = Progress::new(
            &format!("generate ({})", short_id(&generator_id)),
            Some(generated_passages as u64),
            job.quiet,
        )
        .with_secondary("tokens");
        let mut writer = store.begin(&stage, stage_key.clone(), cache_schema())?;
        // A generator that runs a model here takes its device from the device's executor
        // for each batch, so no other stage runs a model on it meanwhile.
        let device = match generator.device() {
            Some(device) => Some(
                DeviceExecutor::shared(device)
                    .and_then(|executor| executor.open_lease_queue())
                    .map_err(|e| EngineError::Dataflow(format!("the device executor: {e}")))?,
            ),
            None => None,
        };
        let (tx, rx) =
            bounded::<Result<(usize, Vec<Generated>), EngineError>>(GENERATED_QUEUE_DEPTH);
        std::thread::scope(|scope| -> Result<(), EngineError> {
            let generator = &generator;
            let missing = &missing;
            let passages = &passages;
            let seed = job.seed;
            let reads_prompts = generator.reads_prompts();
            let device = device.clone();
            scope.spawn(move || {
                for (chunk_index, chunk) in missing.chunks(job.batch_size.max(1)).enumerate() {
                    let requests: Vec<_> = chunk
                        .iter()
                        .map(|&(p, t)| {
                            let passage = &passages[p].passage;
                            if reads_prompts {
                                types[t].request(passage, seed)
                            } else {
                                types[t].request_without_prompt(passage, seed)
                            }
                        })
                        .collect();
                    let lease = device
                        .as_ref()
                        .map(|queue| queue.lease(requests.len() as u64))
                        .transpose();
                    let result = match lease {
                        Ok(_held) => generator.generate(&requests),
                        Err(e) => Err(EngineError::Dataflow(format!("generation: {e}"))),
                    };
                    let failed = result.is_err();
                    if tx.send(result.map(|o| (chunk_index, o))).is_err() || failed {
                        break;
                    }
                }
            });
            // Owned here so that an early return drops it, which ends the generator
            // thread's sends before the scope waits for it.
            let rx = rx;
            let mut pending: Vec<CachedOutcome> = Vec::new();
            let mut last_commit = Instant::now();
            let mut done = 0usize;
            let mut passages_done = 0usize;
            let mut failures_in_a_row = 0usize;
            let mut last_failure = String::new();
            for message in rx.iter() {
                let (chunk_index, outcomes) = match message {
                    Ok(batch) => batch,
                    Err(e) => {
                        // Keep what was generated before the failure: a rerun resumes
                        // after it.
                        if !pending.is_empty() {
                            writer.write_part(&[cache_batch(&pending)?])?;
                        }
                        return Err(e);
                    }
                };
                crate::crash::point("generate.batch");
                let chunk_start = chunk_index * job.batch_size.max(1);
                let chunk = &missing[chunk_start..chunk_start + outcomes.len()];
                let mut chunk_tokens = 0u64;
                let mut texts = Vec::new();
                for (&(p, t), outcome) in chunk.iter().zip(outcomes) {
                    let passage = &passages[p].passage;
                    match &outcome {
                        Generated::Query { tokens, text, .. } => {
                            chunk_tokens += *tokens as u64;
                            failures_in_a_row = 0;
                            if !streams.is_empty() && !passages[p].held_out {
                                texts.push(text.clone());
                            }
                        }
                        Generated::Failed { reason } => {
                            failures.insert((p, t), reason.clone());
                            failures_in_a_row += 1;
                            last_failure.clone_from(reason);
                        }
                    }
                    let row = CachedOutcome {
                        key: keys[p][t].clone(),
                        passage_id: passage.id.clone(),
                        query_type: types[t].name().to_string(),
                        outcome,
                    };
                    if matches!(row.outcome, Generated::Query { .. }) {
                        known.insert(row.key.clone(), row.clone());
                    }
                    pending.push(row);
                }
                offer(streams, texts);
                tokens += chunk_tokens;
                done += chunk.len();
                // A passage is done when its last missing request is.
                let now_done = if done == missing.len() || missing[done].0 != missing[done - 1].0 {
                    passages_missing[done - 1]
                } else {
                    passages_missing[done - 1] - 1
                };
                progress.inc_with((now_done - passages_done) as u64, chunk_tokens);
                passages_done = now_done;
                if failures_in_a_row >= MAX_FAILURES_IN_A_ROW {
                    writer.write_part(&[cache_batch(&pending)?])?;
                    return Err(EngineError::Invalid(format!(
                        "{failures_in_a_row} requests in a row failed, the last: {last_failure}; \
                         stopping (the queries generated so far are kept and a rerun \
                         retries the failures)"
                    )));
                }
                if pending.len() >= PART_ROWS || last_commit.elapsed() >= PART_SECONDS {
                    writer.write_part(&[cache_batch(&pending)?])?;
                    pending.clear();
                    last_commit = Instant::now();
                }
            }
            if !pending.is_empty() {
                writer.write_part(&[cache_batch(&pending)?])?;
            }
            Ok(())
        })?;
        drop(writer);
        progress.finish();
        if let Some(queue) = &device {
            let stats = queue.stats();
            journal_device_stage(
                &store,
                &stage,
                &format!("generate ({})", short_id(&generator_id)),
                (stats.rows, 0),
                start.elapsed().as_secs_f64(),
                &stats,
            )?;
        }
    }
    let seconds = if missing.is_empty() {
        0.0
    } else {
        start.elapsed().as_secs_f64()
    };

    // The output, in passage then type order.
    let mut rows = Vec::new();
    let mut failure_list = Vec::new();
    for (p, sampled) in passages.iter().enumerate() {
        for (t, spec) in types.iter().enumerate() {
            match known.get(&keys[p][t]).map(|c| &c.outcome) {
                Some(Generated::Query { text, .. }) => rows.push(GeneratedQuery {
                    query_id: query_id(&sampled.passage.id, spec.name()),
                    query_text: text.clone(),
                    query_type: spec.name().to_string(),
                    source_id: sampled.passage.id.clone(),
                    held_out: sampled.held_out,
                }),
                _ => failure_list.push((p, t)),
            }
        }
    }
    let failures_file = job.run_dir.join(FAILURES_FILE);
    write_failures(&failures_file, &failure_list, &failures, &passages, types)?;
    let queries_file = job.run_dir.join(QUERIES_FILE);
    write_queries_file(&queries_file, &rows)?;
    if let Some(output) = &job.output {
        write_queries_file(output, &rows)?;
    }
    // The corpus change plan, against the last version this run directory finished;
    // then this version becomes the last.
    let plan_start = Instant::now();
    let version = CorpusVersion::new(read_passages, &rows);
    let change = plan_and_record(&store, &version, job.prepare.held_out, job.prepare.seed)?;
    drop(version);
    let change_seconds = plan_start.elapsed().as_secs_f64();
    if !job.quiet {
        eprintln!("{}", change.line());
    }
    let per_second = |n: f64| if seconds > 0.0 { n / seconds } else { 0.0 };
    let outcome = GenerateOutcome {
        generator: generator_id,
        passages: passages.len(),
        requests,
        cached,
        generated_now: missing.len(),
        queries: rows.len(),
        failed: failure_list.len(),
        seconds,
        passages_per_second: per_second(generated_passages as f64),
        tokens,
        tokens_per_second: per_second(tokens as f64),
        prepare: prepared.report,
        skipped_records,
        quarantine,
        queries_file,
        failures_file,
        change,
        change_seconds,
        rows,
    };
    let report = job.run_dir.join(REPORT_FILE);
    let text =
        serde_json::to_string_pretty(&outcome).map_err(|e| EngineError::Invalid(e.to_string()))?;
    crate::store::write_file_atomically(&report, (text + "\n").as_bytes())?;
    Ok(outcome)
}

/// `counts[i]` = distinct passages among `missing[..=i]` (requests are passage-major).
fn distinct_prefix_counts(missing: &[(usize, usize)]) -> Vec<usize> {
    let mut counts = Vec::with_capacity(missing.len());
    let mut n = 0;
    for (i, &(p, _)) in missing.iter().enumerate() {
        if i == 0 || missing[i - 1].0 != p {
            n += 1;
        }
        counts.push(n);
    }
    counts
}

fn short_id(id: &str) -> &str {
    id.split(':').next().unwrap_or(id)
}

/// Lists every request without a query: its reason from this run, or why it has none.
fn write_failures(
    path: &Path,
    list: &[(usize, usize)],
    reasons: &HashMap<(usize, usize), String>,
    passages: &[SampledPassage],
    types: &[QueryTypeSpec],
) -> Result<(), EngineError> {
    use std::io::Write;
    let io = |source| EngineError::Write {
        path: path.to_path_buf(),
        source,
    };
    crate::store::write_file_with(path, |file: &mut std::fs::File, _| {
        let mut out = std::io::BufWriter::new(file);
        for &(p, t) in list {
            let reason = reasons
                .get(&(p, t))
                .map(String::as_str)
                .unwrap_or("the generator returned no outcome for this request; this is a bug");
            let line = serde_json::to_string(&Failure {
                passage_id: &passages[p].passage.id,
                query_type: types[t].name(),
                reason,
            })
            .map_err(|e| EngineError::Invalid(e.to_string()))?;
            writeln!(out, "{line}").map_err(io)?;
        }
        out.flush().map_err(io)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prefix_cache_size_reaches_the_llm() {
        let mut file = GenerateFile::with_generator("llm");
        file.model = Some("model.gguf".into());
        let size = |file: &GenerateFile| match generator_choice(file, SamplingParams::default()) {
            Ok(GeneratorChoice::Llm { options, .. }) => options.prefix_cache_bytes,
            _ => usize::MAX,
        };
        assert_eq!(size(&file), 128 << 20);
        file.prefix_cache_mb = 0;
        assert_eq!(size(&file), 0);
        file.prefix_cache_mb = 3;
        assert_eq!(size(&file), 3 << 20);
    }

    #[test]
    fn passages_done_count_distinct_passages() {
        let missing = [(0, 0), (0, 1), (2, 0), (5, 1), (5, 2)];
        assert_eq!(distinct_prefix_counts(&missing), vec![1, 1, 2, 3, 3]);
        assert!(distinct_prefix_counts(&[]).is_empty());
    }
}
