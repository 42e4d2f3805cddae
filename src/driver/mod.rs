//! The driver: the recipe's stages in one place, from a corpus to a fine-tuned model
//! evaluated against its base. Every recipe command runs its part of the one graph here:
//! `generate` the generation stage, `mine` through the candidates, `label` through the
//! examples, `train` through the model, and `run` all of it with evaluation and the
//! report.
//!
//! The graph (each stage an operator of [`crate::dataflow`], keyed in the stage store):
//!
//! ```text
//! corpus ─┬─> generate ──────────────┐
//!         └─> passage index (r<i>) ──┴─> candidates ─> label ─> train ─> evaluate
//!                                            └─> score ahead ─┘
//! ```
//!
//! Generation and every retriever's passage index run at the same time (the passage
//! index needs only the corpus); the candidates stage starts when both are complete;
//! its rows stream, a chunk of queries at a time, to the teachers that score ahead
//! (a cross-encoder), and labelling starts when the candidates are complete. Each later
//! stage starts when the one before it is, since each needs its input whole: retrieval
//! is exact over the complete index, the teacher funnel normalises by corpus-wide
//! percentiles, training shuffles every example. Every model of the run (the
//! LLM, the retrievers, the teachers, the student) runs its batches on its device's one
//! executor ([`crate::executor`]), so stages that overlap take turns on the device rather
//! than oversubscribe it.
//!
//! Contracts:
//! - **One path.** A command runs the same stages over the same stage store as `run`:
//!   `run` writes the same examples and the same model bytes as `generate`, `mine`,
//!   `label` and `train` one by one, and after any of them it recomputes nothing they
//!   computed.
//! - **Resumable.** Every stage keeps its results in the stage store (or the trainer's
//!   checkpoint); a killed run started again resumes where its stages left off.
//! - **Checked first.** Every input of every stage a command runs is checked before the
//!   first starts ([`Pipeline::preflight`]).

pub mod bench;
pub mod demo;
pub mod report;

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Instant;

use crossbeam_channel::bounded;
use distillery_operators::TextKind;
use serde::Serialize;

use crate::config::{Pipeline, RunPart};
use crate::dataflow::candidates::{run_candidates_stage, MineOutcome};
use crate::dataflow::evaluate::{evaluate_models, Evaluation};
use crate::dataflow::generate::{
    build_generator, run_generate, run_generate_streaming, GenerateJob, GenerateOutcome,
};
use crate::dataflow::label::load::load_teachers;
use crate::dataflow::label::teacher::PairTeacher;
use crate::dataflow::label::{run_label_stage, LabelOutcome};
use crate::dataflow::memo_embed::embed_ahead;
use crate::dataflow::passage_index::{
    embed_passages, load_retrievers, retriever_stage, PassageIndex,
};
use crate::dataflow::read_device_journal;
use crate::dataflow::score_ahead::{score_ahead, ScoredAhead};
use crate::dataflow::teacher_check::{check_teachers, TeacherCheck};
use crate::dataflow::train::{run_train_stage, TrainOutcome};
use crate::error::EngineError;
use crate::schema::CandidateRow;
use crate::store::StageStore;

/// The parts of a run, in order: generate, mine, label, check teachers, train, evaluate.
const PARTS: usize = 6;

/// The summary `run` writes into the run directory.
pub const SUMMARY_FILE: &str = "run-summary.json";
/// The report `run` writes into the run directory.
pub const REPORT_FILE: &str = "report.html";

/// Wall time of one part of the run.
#[derive(Debug, Clone, Serialize)]
pub struct PartTime {
    pub part: String,
    pub seconds: f64,
}

/// What `run` did.
#[derive(Debug, Clone, Serialize)]
pub struct RunOutcome {
    /// Every device stage this invocation ran or served from its memo table, in order.
    pub device_stages: Vec<StageWork>,
    pub generate: Option<GenerateOutcome>,
    pub mine: MineOutcome,
    pub label: LabelOutcome,
    pub train: TrainOutcome,
    /// The teachers' reranking of the base student's top 100 beside the student, per
    /// query set, measured before training.
    pub teacher_checks: Vec<TeacherCheck>,
    pub evaluations: Vec<Evaluation>,
    pub parts: Vec<PartTime>,
    pub seconds: f64,
    pub base_model: PathBuf,
    pub model: PathBuf,
    pub summary: PathBuf,
    pub report: PathBuf,
}

/// What one device stage did in a run: items run on the device, items taken from its
/// memo table (embedded by an earlier run), and its device's figures.
#[derive(Debug, Clone, Serialize)]
pub struct StageWork {
    pub stage: String,
    pub label: String,
    pub run: u64,
    pub memoised: u64,
    pub seconds: f64,
    pub busy_fraction: f64,
}

/// `generate`: the pipeline's `[generate]` alone (an error when it has none).
pub fn generate(pipeline: &Pipeline) -> Result<GenerateOutcome, EngineError> {
    pipeline.preflight(RunPart::Generate)?;
    generate_stage(pipeline)?
        .ok_or_else(|| EngineError::Invalid("the configuration has no [generate] section".into()))
}

/// `mine`: generation (when the pipeline has it) and the passage index, then the
/// candidates stage.
pub fn mine(pipeline: &Pipeline) -> Result<MineOutcome, EngineError> {
    pipeline.preflight(RunPart::Mine)?;
    Ok(Driver::new(pipeline, false).mine(None)?.1)
}

/// `label`: [`mine`]'s stages, then teacher scoring and the examples.
pub fn label(pipeline: &Pipeline) -> Result<LabelOutcome, EngineError> {
    pipeline.preflight(RunPart::Label)?;
    Ok(Driver::new(pipeline, false).label()?.1)
}

/// `train`: [`label`]'s stages, then training (stopped after `stop_after` steps when
/// given, as a killed run would be).
pub fn train(pipeline: &Pipeline, stop_after: Option<u64>) -> Result<TrainOutcome, EngineError> {
    pipeline.preflight(RunPart::Train)?;
    Ok(Driver::new(pipeline, false).train(stop_after)?.1)
}

/// The pipeline's generation stage, `None` when it has no `[generate]`.
fn generate_stage(pipeline: &Pipeline) -> Result<Option<GenerateOutcome>, EngineError> {
    match GenerateJob::from_pipeline(pipeline)? {
        Some(job) => run_generate(&job).map(Some),
        None => Ok(None),
    }
}

/// Batches of generated queries waiting for the embedding ahead, per retriever: enough
/// to ride out a slow batch of the device, few enough that a fast generator (the
/// extractive one) does not pile texts up in memory; what finds a stream full is
/// embedded by the candidates stage instead.
const QUERIES_AHEAD_BATCHES: usize = 16;

/// Chunks of candidate rows waiting for the teachers that score ahead: one in hand while
/// the next is retrieved; a teacher slower than retrieval then holds the retrieval back
/// instead of piling rows up in memory.
const CANDIDATE_CHUNKS_AHEAD: usize = 1;

/// Runs the stages in order, timing each part and, for `run`, saying which starts (the
/// stages' own progress lines follow).
struct Driver<'p> {
    pipeline: &'p Pipeline,
    announce: bool,
    parts: Vec<PartTime>,
}

impl<'p> Driver<'p> {
    fn new(pipeline: &'p Pipeline, announce: bool) -> Self {
        Self {
            pipeline,
            announce: announce && !pipeline.quiet,
            parts: Vec::new(),
        }
    }

    fn begin(&self, name: &str, index: usize) -> Instant {
        if self.announce {
            eprintln!("run [{index}/{PARTS}] {name}");
        }
        Instant::now()
    }

    fn timed(&mut self, name: &str, since: Instant) {
        self.parts.push(PartTime {
            part: name.to_string(),
            seconds: since.elapsed().as_secs_f64(),
        });
    }

    /// Generation and every retriever's passage index at the same time (neither needs
    /// the other's output: the passage index is built while the queries are generated,
    /// its batches taking turns with a local LLM's on the device's executor), with the
    /// generated queries streaming into each retriever's query embeddings as they come
    /// ([`embed_ahead`]); then the candidates stage over all of it, whose query stages
    /// find those texts in their memo tables.
    ///
    /// With `teachers` of which some score ahead ([`ScoredAhead::wanted`]), the
    /// candidates stream to them as each chunk of queries is retrieved
    /// ([`score_ahead`], on a thread of its own behind a bounded channel: a slow teacher
    /// holds the retrieval back), and what they scored is returned for labelling.
    fn mine(
        &mut self,
        teachers: Option<&[Box<dyn PairTeacher>]>,
    ) -> Result<(Option<GenerateOutcome>, MineOutcome, Option<ScoredAhead>), EngineError> {
        let pipeline = self.pipeline;
        let t = self.begin("generate (and the passage index alongside)", 1);
        let retrievers = load_retrievers(pipeline)?;
        let job = GenerateJob::from_pipeline(pipeline)?;
        let store = StageStore::open(&pipeline.run_dir)?;
        // One stream per distinct query embedding (two retrievers of one model share a
        // memo table, which one writer fills).
        let mut ahead = Vec::new();
        if job.is_some() {
            let mut seen = HashSet::new();
            for (i, r) in retrievers.iter().enumerate() {
                let stage = retriever_stage(pipeline, i, &r.embedder, TextKind::Query, "", None)?;
                if seen.insert(stage.key.settings_hash.clone()) {
                    let (tx, rx) = bounded::<Vec<String>>(QUERIES_AHEAD_BATCHES);
                    ahead.push((tx, rx, r.embedder.clone(), stage));
                }
            }
        }
        let (streams, consumers): (Vec<_>, Vec<_>) = ahead
            .into_iter()
            .map(|(tx, rx, embedder, stage)| (tx, (rx, embedder, stage)))
            .unzip();
        let (generate, indexes, generated_at) = std::thread::scope(|scope| {
            let indexing = scope.spawn(|| embed_passages(pipeline, &retrievers));
            let embedding: Vec<_> = consumers
                .into_iter()
                .map(|(rx, embedder, stage)| {
                    let store = &store;
                    scope.spawn(move || {
                        embed_ahead(store, embedder, rx.into_iter().flatten(), &stage)
                    })
                })
                .collect();
            let generate = match &job {
                Some(job) => run_generate_streaming(
                    job,
                    &|passages| build_generator(job, passages),
                    &streams,
                )
                .map(Some),
                None => Ok(None),
            };
            // Closes the streams: the embedding ahead ends with what it was sent.
            drop(streams);
            let generated_at = Instant::now();
            let panicked =
                |what: &str| EngineError::Dataflow(format!("the {what} thread panicked"));
            let indexes: Result<Vec<PassageIndex>, EngineError> = indexing
                .join()
                .unwrap_or_else(|_| Err(panicked("passage embedding")));
            let mut ahead = Ok(());
            for handle in embedding {
                if let Err(e) = handle
                    .join()
                    .unwrap_or_else(|_| Err(panicked("query embedding")))
                {
                    ahead = Err(e);
                }
            }
            // Generation's error first: it is the one the user is waiting on.
            let generate = generate?;
            let indexes = indexes?;
            ahead?;
            Ok::<_, EngineError>((generate, indexes, generated_at))
        })?;
        self.parts.push(PartTime {
            part: "generate".into(),
            seconds: generated_at.duration_since(t).as_secs_f64(),
        });
        let streaming = teachers.filter(|t| ScoredAhead::wanted(t));
        if self.announce {
            let ahead = if streaming.is_some() {
                " (and teacher scoring ahead)"
            } else {
                ""
            };
            eprintln!("run [2/{PARTS}] mine{ahead}");
        }
        let (mine, ahead) = match streaming {
            None => (
                run_candidates_stage(pipeline, generate.as_ref(), indexes, None)?,
                None,
            ),
            Some(teachers) => {
                let (tx, rx) = bounded::<Vec<CandidateRow>>(CANDIDATE_CHUNKS_AHEAD);
                std::thread::scope(|scope| {
                    let scoring =
                        scope.spawn(move || score_ahead(pipeline, teachers, rx.into_iter()));
                    let mut send = |rows: Vec<CandidateRow>| {
                        tx.send(rows).map_err(|_| {
                            EngineError::Dataflow("teacher scoring ahead stopped".into())
                        })
                    };
                    let mine =
                        run_candidates_stage(pipeline, generate.as_ref(), indexes, Some(&mut send));
                    // Closes the stream: scoring ahead ends with what it was sent.
                    drop(tx);
                    let ahead = scoring.join().unwrap_or_else(|_| {
                        Err(EngineError::Dataflow(
                            "the teacher scoring thread panicked".into(),
                        ))
                    });
                    // The scoring's error first: a failed teacher stops the stream,
                    // which the candidates stage reports only as stopped.
                    let ahead = ahead?;
                    Ok::<_, EngineError>((mine?, Some(ahead)))
                })?
            }
        };
        self.timed("mine", generated_at);
        Ok((generate, mine, ahead))
    }

    fn label(&mut self) -> Result<(Option<GenerateOutcome>, LabelOutcome), EngineError> {
        // Loaded once: the candidates stream to them, and labelling needs them whole.
        let teachers = load_teachers(self.pipeline)?;
        let (generate, mine, ahead) = self.mine(Some(&teachers))?;
        let t = self.begin("label", 3);
        let label = run_label_stage(self.pipeline, mine, &teachers, ahead)?;
        self.timed("label", t);
        Ok((generate, label))
    }

    fn train(
        &mut self,
        stop_after: Option<u64>,
    ) -> Result<(Option<GenerateOutcome>, TrainOutcome), EngineError> {
        let (generate, label) = self.label()?;
        let t = self.begin("train", 5);
        let train = run_train_stage(self.pipeline, label, stop_after)?;
        self.timed("train", t);
        Ok((generate, train))
    }
}

/// One line on labelling's teacher pairs: how many, and per teacher how many it scored
/// now (and of those, how many ahead, while the candidates were made).
pub fn pairs_line(label: &LabelOutcome) -> String {
    let now: Vec<String> = label
        .scored_now
        .iter()
        .zip(label.scored_ahead.iter().chain(std::iter::repeat(&0)))
        .map(|(now, ahead)| {
            if *ahead > 0 {
                format!("{now} ({ahead} ahead)")
            } else {
                now.to_string()
            }
        })
        .collect();
    format!(
        "teacher pairs {} (scored now per teacher: {}; the rest from the cache)",
        label.pairs,
        now.join(", ")
    )
}

/// One line on the teacher check of a set, with a plain warning when the teachers do not
/// rank better than the student they are about to train.
pub fn check_line(check: &TeacherCheck) -> String {
    let fmt = |m: Option<f64>| m.map_or_else(|| "-".into(), |v| format!("{v:.4}"));
    let line = format!(
        "teacher check on {} ({} queries): nDCG@10 base student {}, teachers reranking its top 100 {}",
        check.set,
        check.queries,
        fmt(check.student.ndcg_at_10),
        fmt(check.teachers.ndcg_at_10)
    );
    if check.teachers_better() {
        line
    } else {
        format!(
            "{line}\nwarning: the teachers do not rank better than the base student on {}; \
             distilling them is unlikely to improve it (a stronger teacher, e.g. a \
             cross-encoder, is what the recipe needs)",
            check.set
        )
    }
}

/// `run`: the whole recipe of `pipeline` (see the module docs), ending with the
/// summary and the report.
pub fn run_recipe(pipeline: &Pipeline) -> Result<RunOutcome, EngineError> {
    pipeline.preflight(RunPart::Evaluate)?;
    // The journal's records from here on are this invocation's.
    let journal_before = read_device_journal(&pipeline.run_dir).len();
    let start = Instant::now();
    let mut driver = Driver::new(pipeline, true);
    let student = pipeline
        .student
        .as_ref()
        .ok_or_else(|| EngineError::Invalid("no [student]: preflight let it through".into()))?;
    let base_model = PathBuf::from(&student.model);
    let (generate, label) = driver.label()?;
    let t = driver.begin("check teachers", 4);
    let teacher_checks = if pipeline.eval.check_teachers {
        check_teachers(
            pipeline,
            generate.as_ref().map(|g| g.rows.as_slice()),
            &base_model,
        )?
    } else {
        Vec::new()
    };
    driver.timed("check teachers", t);
    if !pipeline.quiet {
        for check in &teacher_checks {
            eprintln!("{}", check_line(check));
        }
    }
    let t = driver.begin("train", 5);
    let train = run_train_stage(pipeline, label, None)?;
    driver.timed("train", t);
    let t = driver.begin("evaluate", 6);
    let evaluations = evaluate_models(
        pipeline,
        generate.as_ref().map(|g| g.rows.as_slice()),
        &base_model,
        &train.model,
    )?;
    driver.timed("evaluate", t);
    let parts = driver.parts;
    let mine = train.label.mine.clone();
    let label = train.label.clone();

    let device_stages = read_device_journal(&pipeline.run_dir)
        .into_iter()
        .skip(journal_before)
        .map(|r| StageWork {
            busy_fraction: r.busy_fraction(),
            stage: r.stage,
            label: r.label,
            run: r.rows,
            memoised: r.memoised,
            seconds: r.seconds,
        })
        .collect();
    let outcome = RunOutcome {
        device_stages,
        generate,
        mine,
        label,
        train: train.clone(),
        teacher_checks,
        evaluations,
        parts,
        seconds: start.elapsed().as_secs_f64(),
        base_model,
        model: train.model.clone(),
        summary: pipeline.run_dir.join(SUMMARY_FILE),
        report: pipeline.run_dir.join(REPORT_FILE),
    };
    let text = serde_json::to_string_pretty(&outcome)
        .map_err(|e| EngineError::Invalid(format!("run summary: {e}")))?;
    crate::store::write_file_atomically(&outcome.summary, (text + "\n").as_bytes())?;
    let html = report::render(pipeline, &outcome)?;
    crate::store::write_file_atomically(&outcome.report, html.as_bytes())?;
    Ok(outcome)
}
