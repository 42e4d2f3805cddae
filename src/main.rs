//! The `distillery` command line.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use distillery::config::cluster::Cluster;
use distillery::config::EmbedSettings;
use distillery::config::{EndpointFile, GenerateFile, HeldOutFile, Pipeline, QUARANTINE_FILE};
use distillery::corpus::Quarantine;
use distillery::dataflow::candidates::MineOutcome;
use distillery::dataflow::cluster::{self, FollowerJob};
use distillery::dataflow::generate::{run_generate, GenerateJob, GenerateOutcome};
use distillery::driver::{self, demo, run_recipe};
use distillery::eval::EvalOptions;
use distillery::jobs::embed::{run_embed, EmbedJob};
use distillery::jobs::eval::{run_eval, EvalSettings};
use distillery::jobs::score::{run_score, ScoreJob};
use distillery::train::trainer::StopReason;
use distillery_operators::TextKind;

mod cli;
use cli::{
    set_threads, BenchArgs, Cli, Command, GenerateArgs, Kind, ModelArgs, OnBadRecord, RunArgs,
};

/// The job of `generate --input/--output`.
fn generate_job(
    a: &GenerateArgs,
    input: &std::path::Path,
    output: &std::path::Path,
) -> Result<GenerateJob> {
    let mut file = GenerateFile::with_generator(&a.generator);
    file.model = a.model.clone();
    file.tokenizer = a.tokenizer.clone();
    file.seed = a.seed;
    file.types = a.types.clone();
    if let Some(t) = a.temperature {
        file.temperature = t;
    }
    if a.max_passages.is_some() {
        file.max_passages = a.max_passages;
    }
    if let Some(b) = a.batch_size {
        file.batch_size = b;
    }
    if let Some(url) = &a.url {
        file.endpoint = Some(EndpointFile {
            url: url.clone(),
            api_key_env: a.api_key_env.clone(),
            concurrency: a.concurrency,
            timeout_s: None,
            max_retries: None,
        });
    }
    let run_dir = a
        .run_dir
        .clone()
        .unwrap_or_else(|| output.with_extension("run"));
    let held_out = HeldOutFile {
        count: a.held_out,
        ..HeldOutFile::default()
    };
    let quarantine =
        matches!(a.on_bad_record, Some(OnBadRecord::Skip)).then(|| run_dir.join(QUARANTINE_FILE));
    let mut job = GenerateJob::from_file(&file, input, &run_dir, &held_out, quarantine)?;
    job.output = Some(output.to_path_buf());
    job.quiet = a.quiet;
    job.set_device(&device_arg(&a.device, &Cluster::single())?);
    Ok(job)
}

fn print_generate(o: &GenerateOutcome) {
    let p = &o.prepare;
    println!(
        "passages read {}, kept {} (too short {}, near-duplicates {}, empty after normalising {}, sampled out {}), held out {}",
        p.read,
        p.kept,
        p.too_short.len(),
        p.duplicates.len(),
        p.empty_normalised.len(),
        p.sampled_out,
        p.held_out.len()
    );
    println!(
        "requests {} ({} from the cache, {} generated now): {} queries, {} failed",
        o.requests, o.cached, o.generated_now, o.queries, o.failed
    );
    if o.generated_now > 0 {
        let tokens = if o.tokens > 0 {
            format!(", {:.1} tokens/s", o.tokens_per_second)
        } else {
            String::new()
        };
        println!(
            "{:.1}s: {:.2} passages/s{tokens} ({})",
            o.seconds, o.passages_per_second, o.generator
        );
    }
    println!("queries  {}", o.queries_file.display());
    if o.failed > 0 {
        println!("failures {}", o.failures_file.display());
    }
}

/// Runs `command` on process 0 of `pipeline`'s cluster, then tells the other processes
/// it is done; on any other process, serves process 0's stages instead.
fn lead_or_follow(pipeline: &Pipeline, command: impl FnOnce() -> Result<()>) -> Result<()> {
    let c = &pipeline.cluster;
    if !c.is_leader() {
        return follow(c, pipeline.workers, &pipeline.device, pipeline.quiet, None);
    }
    let result = command();
    if c.is_distributed() {
        release_followers(c, pipeline.workers);
    }
    result
}

/// A follower's whole command: it serves process 0's stages until process 0 is done.
fn follow(
    c: &Cluster,
    workers: usize,
    device: &candle_core::Device,
    quiet: bool,
    json: Option<&std::path::Path>,
) -> Result<()> {
    let served = distillery::dataflow::follower::serve(c, workers, device, quiet)?;
    println!(
        "process {} of {}: ran {} items on this device in {} stage(s) for process 0, \
         {} retrieval block(s), and its share of {} training batch(es)",
        c.process,
        c.processes,
        served.items,
        served.stages,
        served.retrieval_blocks,
        served.train_batches
    );
    if let Some(path) = json {
        write_json(path, &served)?;
    }
    Ok(())
}

/// Process 0 tells its followers its command is over, whether it succeeded or not (a
/// follower that cannot be told is reported, and the command's own outcome stands).
fn release_followers(c: &Cluster, workers: usize) {
    if let Err(e) = cluster::announce(c, workers, FollowerJob::Done) {
        eprintln!("warning: could not tell the other processes that process 0 is done: {e}");
    }
}

/// The device `--device` names for this process of `cluster`.
fn device_arg(name: &str, cluster: &Cluster) -> Result<candle_core::Device> {
    distillery::config::resolve_device(name, cluster)
        .map_err(|e| anyhow::anyhow!("--device {name}: {e}"))
}

fn embed_settings(
    m: &ModelArgs,
    run_dir: &std::path::Path,
    cluster: &Cluster,
) -> Result<EmbedSettings> {
    Ok(EmbedSettings {
        model: m.model.clone(),
        max_seq_length: m.max_seq_length,
        query_prefix: m.query_prefix.clone(),
        passage_prefix: m.passage_prefix.clone(),
        batch_tokens: m.batch_tokens,
        batch_rows: m.batch_rows,
        workers: m.workers,
        quarantine: matches!(m.on_bad_record, OnBadRecord::Skip)
            .then(|| run_dir.join(QUARANTINE_FILE)),
        quiet: m.quiet,
        device: device_arg(&m.device, cluster)?,
    })
}

/// Writes `value` as JSON through the store's durable protocol: whole or absent.
fn write_json<T: serde::Serialize>(path: &std::path::Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    distillery::store::write_file_atomically(path, (text + "\n").as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

fn print_mine(outcome: &MineOutcome, pipeline: &Pipeline) {
    println!(
        "passages {} (held out {}), queries {} (human ones with a relevant passage, generated ones of passages not held out)",
        outcome.passages, outcome.held_out, outcome.queries
    );
    println!("{}", outcome.stats);
    for r in &outcome.retrievals {
        if r.reused {
            println!(
                "{}: {} lists read back (nothing changed)",
                r.stage, r.queries
            );
        } else if r.lists_repaired > 0 {
            println!(
                "{}: {} lists repaired, {} retrieved again ({} passages new, {} gone) in {:.1} s",
                r.stage,
                r.lists_repaired,
                r.lists_retrieved,
                r.passages_added,
                r.passages_removed,
                r.seconds
            );
        } else {
            println!(
                "{}: {} lists over {} passages in {:.1} s",
                r.stage, r.lists_retrieved, r.passages, r.seconds
            );
        }
    }
    if outcome.reused {
        println!("(candidates reused from {})", pipeline.run_dir.display());
    }
}

fn report_quarantine(skipped: u64, path: Option<&std::path::Path>) {
    if let Some(path) = path {
        eprintln!(
            "skipped {skipped} bad record(s); each is in {} with its reason",
            path.display()
        );
    }
}

/// `distillery run`: the recipe of a configuration, or the demo.
fn run_command(a: &RunArgs) -> Result<()> {
    let (pipeline, tiny_demo) = run_pipeline(a)?;
    lead_or_follow(&pipeline, || report_recipe(&pipeline, tiny_demo))
}

/// `bench`: the recipe on a sample, each part scaled to the full corpus.
fn bench_command(a: &BenchArgs) -> Result<()> {
    let (mut pipeline, tiny_demo) = run_pipeline(&a.run)?;
    if let Some(name) = &a.device {
        pipeline.device = device_arg(name, &pipeline.cluster)?;
        pipeline.device_name = name.clone();
    }
    lead_or_follow(&pipeline, || {
        let outcome = distillery::driver::bench::bench(&pipeline, a.sample, a.passages)?;
        print!("{}", outcome.render());
        if tiny_demo {
            println!("(a TINY RANDOM model: rates are the tiny model's, not a real one's)");
        }
        if let Some(path) = &a.json {
            write_json(path, &outcome)?;
        }
        Ok(())
    })
}

/// The pipeline `run` and `bench` take: the configuration's, or the demo's; and whether
/// the demo had to build a tiny random model.
fn run_pipeline(a: &RunArgs) -> Result<(Pipeline, bool)> {
    // Set when the demo had to build a tiny random model: its metrics mean nothing.
    let mut tiny_demo = false;
    let pipeline = match &a.config {
        Some(config) => {
            let mut p = Pipeline::load(config)?;
            if let Some(dir) = &a.run_dir {
                p.run_dir = dir.clone();
            }
            p
        }
        None => {
            let dir = a
                .run_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(demo::DEMO_RUN_DIR));
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            let (p, model) = demo::demo_pipeline(&dir)?;
            eprintln!(
                "demo: the recipe on the SciFact subset shipped with distillery, with {}",
                demo::describe(&model)
            );
            eprintln!("demo: its configuration is {}", p.origin.display());
            tiny_demo = model.tiny;
            p
        }
    };
    Ok((a.engine.apply(pipeline)?, tiny_demo))
}

/// `run` on process 0: the recipe, its summary printed.
fn report_recipe(pipeline: &Pipeline, tiny_demo: bool) -> Result<()> {
    let quarantine = pipeline.open_quarantine()?;
    let outcome = run_recipe(pipeline)?;
    let metric = |v: Option<f64>| v.map_or_else(|| "n/a".to_string(), |x| format!("{x:.4}"));
    println!(
        "examples {} (train {}, dev {}); trained {} steps",
        outcome.label.examples,
        outcome.label.train,
        outcome.label.dev,
        outcome.train.report.state.global_step
    );
    if let Some(frozen) = &outcome.train.frozen_passages {
        println!("{frozen}");
    }
    for e in &outcome.evaluations {
        println!("{} ({} queries):", e.set, e.queries);
        let check = outcome.teacher_checks.iter().find(|c| c.set == e.set);
        let teachers = check.map(|c| ("teachers*", &c.teachers));
        for (model, m) in [("base", &e.base), ("fine-tuned", &e.fine_tuned)]
            .into_iter()
            .chain(teachers)
        {
            println!(
                "  {model:<11} nDCG@10 {}  Recall@100 {}  MRR@10 {}",
                metric(m.ndcg_at_10),
                metric(m.recall_at_100),
                metric(m.mrr_at_10)
            );
        }
        if let Some(check) = check {
            println!("  (* the teachers reranking the base model's top 100, before training)");
            if !check.teachers_better() {
                println!(
                    "  the teachers do not rank better than the base model here: distilling \
                     them is unlikely to improve it"
                );
            }
        }
        if let (Some(base), Some(tuned)) = (e.base.ndcg_at_10, e.fine_tuned.ndcg_at_10) {
            if tuned < base {
                println!(
                    "  the fine-tuned model is WORSE than its base here ({:+.4} nDCG@10): \
                     keep the base, or change the teachers or the training (see the README)",
                    tuned - base
                );
            }
        }
    }
    println!("reused and recomputed (kept from earlier runs / computed now / retracted):");
    for r in driver::report::reuse_rows(&outcome) {
        let gone = r
            .retracted
            .map_or_else(|| "-".to_string(), |g| g.to_string());
        println!(
            "  {:<36} {:>9} / {:>9} / {:>7} {}",
            r.stage, r.kept, r.now, gone, r.unit
        );
    }
    println!("model    {}", outcome.model.display());
    println!(
        "examples {}",
        pipeline.run_dir.join("stages").join("examples").display()
    );
    println!("report   {}", outcome.report.display());
    if tiny_demo {
        println!(
            "(a TINY RANDOM model: the recipe ran, these metrics mean nothing; see the README \
             for all-MiniLM-L6-v2)"
        );
    }
    println!(
        "summary  {} ({:.1} s)",
        outcome.summary.display(),
        outcome.seconds
    );
    report_run_quarantine(quarantine)
}

/// Reports what the run's quarantine (held open by the command, so every stage's readers
/// shared it) received: the bad records this command skipped.
fn report_run_quarantine(quarantine: Option<Quarantine>) -> Result<()> {
    if let Some(q) = quarantine {
        let skipped = q.finish()?;
        report_quarantine(skipped, Some(q.path()));
    }
    Ok(())
}

/// Restores the default action of SIGPIPE (the Rust runtime ignores it), so that
/// `distillery ... | head` ends quietly like any Unix tool instead of panicking in
/// `println!` on the closed pipe.
#[cfg(unix)]
fn restore_sigpipe() {
    /// SIGPIPE and SIG_DFL: 13 and 0 on Linux, macOS and the BSDs.
    const SIGPIPE: i32 = 13;
    const SIG_DFL: usize = 0;
    unsafe extern "C" {
        fn signal(signum: i32, handler: usize) -> usize;
    }
    // SAFETY: called first in main, before any thread exists; SIG_DFL is a valid
    // disposition for SIGPIPE.
    unsafe {
        signal(SIGPIPE, SIG_DFL);
    }
}

/// Runs the command; an error is printed as its chain of causes (`error: ...: ...`) with
/// exit status 1, never as a panic or a backtrace: the errors a user meets name the file,
/// field or value to fix, and a backtrace would only bury that.
/// When a process of a cluster dies, timely's communication threads on the others panic
/// on purpose, to stop the computation; the engine reports that as an error. Their panics
/// are shown as one line each, not as a crash with a backtrace.
fn quiet_timely_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let timely = std::thread::current()
            .name()
            .is_some_and(|n| n.starts_with("timely:"))
            || info
                .location()
                .is_some_and(|l| l.file().contains("timely_communication"));
        if timely {
            let message = info
                .payload()
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| info.payload().downcast_ref::<&str>().copied())
                .unwrap_or("a communication thread stopped");
            eprintln!("timely: {message}");
        } else {
            default(info);
        }
    }));
}

fn main() {
    #[cfg(unix)]
    restore_sigpipe();
    quiet_timely_panics();
    if let Err(e) = run_cli(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run_cli(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run(a) => run_command(&a)?,
        Command::Bench(a) => bench_command(&a)?,
        Command::Doctor(a) => {
            print!("{}", distillery::doctor::report());
            if let Some(name) = &a.device {
                match distillery::doctor::check_device(name) {
                    Ok(ran) => println!("{ran}"),
                    Err(why) => anyhow::bail!("--device {name}: {why}"),
                }
            }
        }
        Command::Cpu => {
            print!("{}", distillery_operators::cpu_report());
            distillery_operators::CpuPath::active()?;
        }
        Command::Eval(a) => {
            let threads = set_threads(a.model.threads);
            let name = a
                .dataset
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "dataset".into());
            let run_dir = a
                .run_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from("runs").join(format!("eval-{name}")));
            std::fs::create_dir_all(&run_dir)
                .with_context(|| format!("cannot create {}", run_dir.display()))?;
            let teachers = match &a.teachers {
                Some(config) => {
                    let mut pipeline = Pipeline::load(config)?;
                    if pipeline.teachers.is_empty() {
                        anyhow::bail!("{}: no [[teachers]] to check", config.display());
                    }
                    // The teachers' caches live with this evaluation's stages.
                    pipeline.run_dir = run_dir.clone();
                    pipeline.quiet = a.model.quiet;
                    Some(pipeline)
                }
                None => None,
            };
            let settings = EvalSettings {
                embed: embed_settings(&a.model, &run_dir, &Cluster::single())?,
                dataset: a.dataset.clone(),
                split: a.split.clone(),
                run_dir,
                eval: EvalOptions::default(),
                threads,
                teachers,
            };
            let (outcome, _model) = run_eval(&settings)?;
            println!("dataset    {} ({} split)", a.dataset.display(), a.split);
            println!("passages   {}", outcome.passages);
            println!("queries    {}", outcome.queries);
            for m in outcome.report.measures() {
                if let Some(v) = outcome.report.mean(*m) {
                    println!("{:<10} {v:.4}", m.key());
                }
            }
            if let Some(t) = &outcome.teachers {
                let metric =
                    |v: Option<f64>| v.map_or_else(|| "n/a".to_string(), |x| format!("{x:.4}"));
                println!(
                    "teachers reranking the top 100: nDCG@10 {}  Recall@100 {}  MRR@10 {}",
                    metric(t.ndcg_at_10),
                    metric(t.recall_at_100),
                    metric(t.mrr_at_10)
                );
                if t.ndcg_at_10 <= outcome.ndcg_at_10 {
                    println!(
                        "warning: the teachers do not rank better than the model: distilling \
                         them is unlikely to improve it"
                    );
                }
            }
            match outcome.passages_per_second {
                Some(r) => println!("passages/s {r:.1}"),
                None => println!(
                    "passages/s (embeddings reused from {})",
                    settings.run_dir.display()
                ),
            }
            println!("run file   {}", outcome.run_file.display());
            report_quarantine(outcome.skipped_records, outcome.quarantine.as_deref());
            if let Some(path) = &a.json {
                write_json(path, &outcome)?;
            }
        }
        Command::Embed(a) => {
            set_threads(a.model.threads);
            let run_dir = a
                .run_dir
                .clone()
                .unwrap_or_else(|| a.output.with_extension("run"));
            let cluster = a.cluster.cluster()?;
            if cluster.is_leader() {
                std::fs::create_dir_all(&run_dir)
                    .with_context(|| format!("cannot create {}", run_dir.display()))?;
            }
            let job = EmbedJob {
                embed: embed_settings(&a.model, &run_dir, &cluster)?,
                input: a.input.clone(),
                output: a.output.clone(),
                kind: match a.kind {
                    Kind::Passage => TextKind::Passage,
                    Kind::Query => TextKind::Query,
                },
                run_dir,
                cluster,
            };
            if !job.cluster.is_leader() {
                return follow(
                    &job.cluster,
                    job.embed.workers,
                    &job.embed.device,
                    job.embed.quiet,
                    a.json.as_deref(),
                );
            }
            let ran = run_embed(&job);
            release_followers(&job.cluster, job.embed.workers);
            let (outcome, _model) = ran?;
            let memo = if outcome.memoised > 0 {
                format!(
                    " ({} of them from the run's memo table, embedded before)",
                    outcome.memoised
                )
            } else {
                String::new()
            };
            println!(
                "embedded {} texts{memo} ({} dims) in {:.2}s: {:.1}/s, padding {:.1}% -> {}",
                outcome.passages,
                outcome.dim,
                outcome.seconds,
                outcome.passages_per_second,
                100.0 * outcome.padding_fraction,
                a.output.display()
            );
            report_quarantine(outcome.skipped_records, outcome.quarantine.as_deref());
            if let Some(path) = &a.json {
                write_json(path, &outcome)?;
            }
        }
        Command::Generate(a) => {
            set_threads(a.threads);
            let outcome = match (&a.config, &a.input, &a.output) {
                (Some(config), _, _) => {
                    let mut pipeline = Pipeline::load(config)?;
                    pipeline.override_engine(
                        None,
                        a.on_bad_record.map(|o| matches!(o, OnBadRecord::Skip)),
                        a.quiet,
                    );
                    if pipeline.generate.is_none() {
                        anyhow::bail!("{}: no [generate] section", config.display());
                    }
                    driver::generate(&pipeline)?
                }
                (None, Some(input), Some(output)) => {
                    run_generate(&generate_job(&a, input, output)?)?
                }
                _ => anyhow::bail!("give --config, or --input and --output"),
            };
            print_generate(&outcome);
            report_quarantine(outcome.skipped_records, outcome.quarantine.as_deref());
            if let Some(path) = &a.json {
                write_json(path, &outcome)?;
            }
        }
        Command::Mine(a) => {
            let pipeline = a.pipeline()?;
            lead_or_follow(&pipeline, || {
                let quarantine = pipeline.open_quarantine()?;
                let outcome = driver::mine(&pipeline)?;
                print_mine(&outcome, &pipeline);
                report_run_quarantine(quarantine)
            })?;
        }
        Command::Label(a) => {
            let pipeline = a.pipeline()?;
            lead_or_follow(&pipeline, || {
                let quarantine = pipeline.open_quarantine()?;
                let outcome = driver::label(&pipeline)?;
                print_mine(&outcome.mine, &pipeline);
                println!("{}", driver::pairs_line(&outcome));
                println!("{}", outcome.stats);
                println!(
                    "examples {} (train {}, dev {}) in {}",
                    outcome.examples,
                    outcome.train,
                    outcome.dev,
                    pipeline.run_dir.join("stages/examples").display()
                );
                if let Some(p) = &outcome.jsonl {
                    println!("examples as JSONL: {}", p.display());
                }
                let stats = pipeline.run_dir.join("label-stats.json");
                write_json(&stats, &outcome)?;
                report_run_quarantine(quarantine)
            })?;
        }
        Command::Train(a) => {
            let pipeline = a.pipeline()?;
            lead_or_follow(&pipeline, || {
                let quarantine = pipeline.open_quarantine()?;
                let outcome = driver::train(&pipeline, None)?;
                let r = &outcome.report;
                if let Some(step) = r.resumed_from {
                    println!("resumed from the checkpoint at step {step}");
                }
                if outcome
                    .started_from
                    .ends_with(distillery::train::warm_start::WARM_START_DIR)
                {
                    println!(
                        "warm start: trained on from the last run's model ({})",
                        outcome.started_from.display()
                    );
                }
                println!(
                    "trained {} steps ({} per epoch, {} epochs) on {} train queries, {} dev",
                    r.state.global_step,
                    r.steps_per_epoch,
                    r.state.epoch,
                    r.train_queries,
                    r.dev_queries
                );
                let losses: Vec<String> = r.dev_losses.iter().map(|l| format!("{l:.5}")).collect();
                println!("dev loss per epoch: {}", losses.join(", "));
                match r.stopped {
                    StopReason::Patience => println!(
                        "stopped early: no better dev loss for {} epochs (patience); the best \
                         model is epoch {}'s",
                        r.state.epochs_without_improvement,
                        r.best_epoch
                            .map_or_else(|| "none".into(), |e| e.to_string())
                    ),
                    StopReason::MaxEpochs => println!("stopped after max_epochs"),
                    StopReason::Interrupted => println!("stopped before the end; rerun to resume"),
                }
                if let Some(frozen) = &outcome.frozen_passages {
                    println!("{frozen}");
                }
                println!("best model: {}", outcome.model.display());
                write_json(&pipeline.run_dir.join("train-report.json"), &outcome)?;
                report_run_quarantine(quarantine)
            })?;
        }
        Command::Score(a) => {
            set_threads(a.threads);
            let cluster = a.cluster.cluster()?;
            let device = device_arg(&a.device, &cluster)?;
            if !cluster.is_leader() {
                return follow(&cluster, a.workers, &device, a.quiet, a.json.as_deref());
            }
            let run_dir = a
                .run_dir
                .clone()
                .unwrap_or_else(|| a.output.with_extension("run"));
            std::fs::create_dir_all(&run_dir)
                .with_context(|| format!("cannot create {}", run_dir.display()))?;
            let mut job = ScoreJob::new(
                a.model.clone(),
                a.input.clone(),
                a.output.clone(),
                run_dir.clone(),
            );
            job.max_length = a.max_length;
            job.batch_tokens = a.batch_tokens;
            job.workers = a.workers;
            job.quarantine =
                matches!(a.on_bad_record, OnBadRecord::Skip).then(|| run_dir.join(QUARANTINE_FILE));
            job.quiet = a.quiet;
            job.cluster = cluster;
            job.device = device;
            let ran = run_score(&job);
            release_followers(&job.cluster, job.workers);
            let outcome = ran?;
            if outcome.reused {
                println!(
                    "{} pair scores reused from {} -> {}",
                    outcome.pairs,
                    run_dir.display(),
                    a.output.display()
                );
            } else {
                println!(
                    "scored {} pairs in {:.2}s: {:.1}/s -> {}",
                    outcome.pairs,
                    outcome.seconds,
                    outcome.pairs_per_second,
                    a.output.display()
                );
            }
            report_quarantine(outcome.skipped_records, outcome.quarantine.as_deref());
            if let Some(path) = &a.json {
                write_json(path, &outcome)?;
            }
        }
    }
    Ok(())
}
