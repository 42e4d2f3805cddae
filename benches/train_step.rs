//! Training throughput of one optimizer step on the CPU, the distillery half of
//! benches/compare/train_throughput.sh (the PyTorch half is
//! benches/compare/train_step_torch.py, which builds the same batch).
//!
//! One step is the micro-batch: 16 queries, each with a teacher list of 20
//! passages (320 passages), every text exactly 128 tokens; the recipe's loss (listwise KL +
//! 0.1 InfoNCE), the backward pass, clipping at 1.0 and an AdamW update. Token ids come
//! from the first 336 SciFact passages (title + " " + text), tokenised once before timing
//! and made 128 long by repeating each text's own tokens between [CLS] and [SEP], so no
//! tokenizer and no padding is timed. Teacher scores fall by 0.05 down each list, so the
//! false-negative rule drops entries 1..=8 of a query's list from its InfoNCE candidates,
//! as on the PyTorch side.
//!
//! Modes:
//! - `cached`: the trainer's path, `batch_gradients` with a micro-batch of 16 (the
//!   student's CPU training kernel). One micro-batch is the whole step here, but gradient
//!   caching's extra forward pass without gradients is part of the cost, as it is at the
//!   recipe's scale (4,096 queries a step).
//! - `plain`: the same work PyTorch does: one forward keeping activations
//!   (`Student::forward_keep`), the loss, its gradient, one backward
//!   (`Student::backward_kept`), all on the CPU kernel.
//! - `graph`: one forward with candle's autograd graph, loss, `backward()` (the path of
//!   non-CPU devices; the path this bench measured before the kernel).
//!
//! One warm-up step, then `--steps` timed steps; prints one JSON line.
//!
//! usage: cargo bench -p distillery --bench train_step -- [--model DIR] [--corpus FILE]
//!            [--steps N] [--mode cached|plain|graph] [--json OUT]
//! Threads: set RAYON_NUM_THREADS (candle's CPU kernels run on rayon's pool).

use std::io::BufRead;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Var};
use distillery::train::gradcache::{batch_gradients, PreparedBatch};
use distillery::train::loss::{distillation_loss, LossConfig, TeacherLists};
use distillery::train::optim::{clip_grad_norm, grads_of, AdamW, AdamWConfig};
use distillery_operators::student::GradientPath;
use distillery_operators::{Student, StudentOptions, TextKind, TokenBatch, TokenizedText};

/// The micro-batch: queries per optimizer step.
const QUERIES: usize = 16;
/// Passages in each query's teacher list (the recipe's list length).
const LIST_LEN: usize = 20;
/// Every query and passage is exactly this many tokens, [CLS] and [SEP] included.
const TOKENS: usize = 128;
/// The recipe's gradient clipping threshold (global L2 norm).
const CLIP: f64 = 1.0;
/// The recipe's peak learning rate; its value does not change the work of a step.
const LR: f64 = 2e-4;
/// Each list's teacher scores fall by this much per position from 1.0 at the positive.
const SCORE_STEP: f32 = 0.05;
/// Timed steps unless `--steps` says otherwise: a step takes tens of seconds on 2 cores.
const DEFAULT_STEPS: usize = 3;
const DEFAULT_MODEL: &str = "/work/shared/models/all-MiniLM-L6-v2";
const DEFAULT_CORPUS: &str = "/work/shared/datasets/scifact/corpus.jsonl";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Cached,
    Plain,
    Graph,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Self::Cached => "cached",
            Self::Plain => "plain",
            Self::Graph => "graph",
        }
    }
}

struct Args {
    model: PathBuf,
    corpus: PathBuf,
    steps: usize,
    mode: Mode,
    json: Option<PathBuf>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        model: std::env::var_os("DISTILLERY_MINILM_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_MODEL)),
        corpus: PathBuf::from(DEFAULT_CORPUS),
        steps: DEFAULT_STEPS,
        mode: Mode::Cached,
        json: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        // `cargo bench` appends --bench to the arguments of a harness-less target.
        if flag == "--bench" {
            continue;
        }
        let mut value = || it.next().ok_or_else(|| anyhow!("{flag} needs a value"));
        match flag.as_str() {
            "--model" => args.model = PathBuf::from(value()?),
            "--corpus" => args.corpus = PathBuf::from(value()?),
            "--steps" => {
                args.steps = value()?
                    .parse()
                    .context("--steps needs a positive integer")?;
                if args.steps == 0 {
                    bail!("--steps needs a positive integer");
                }
            }
            "--mode" => {
                args.mode = match value()?.as_str() {
                    "cached" => Mode::Cached,
                    "plain" => Mode::Plain,
                    "graph" => Mode::Graph,
                    other => bail!("--mode is cached, plain or graph, not `{other}`"),
                }
            }
            "--json" => args.json = Some(PathBuf::from(value()?)),
            other => bail!("unknown argument `{other}` (see the header of benches/train_step.rs)"),
        }
    }
    Ok(args)
}

/// The first `n` non-empty passage texts of a BEIR corpus, `title + " " + text`.
fn corpus_texts(path: &PathBuf, n: usize) -> Result<Vec<String>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut out = Vec::with_capacity(n);
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let doc: serde_json::Value =
            serde_json::from_str(&line).with_context(|| format!("{}:{}", path.display(), i + 1))?;
        let field = |k: &str| {
            doc.get(k)
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_string()
        };
        let (title, text) = (field("title"), field("text"));
        let joined = if title.is_empty() {
            text
        } else {
            format!("{title} {text}")
        };
        if !joined.trim().is_empty() {
            out.push(joined);
        }
        if out.len() == n {
            return Ok(out);
        }
    }
    bail!(
        "{} holds {} passages; the bench needs {n}",
        path.display(),
        out.len()
    )
}

/// `[CLS] body... [SEP]` -> exactly `TOKENS` ids, the body repeated to fill.
fn fill(ids: &[u32]) -> Result<Vec<u32>> {
    let (&cls, rest) = ids
        .split_first()
        .ok_or_else(|| anyhow!("empty tokenisation"))?;
    let (&sep, body) = rest.split_last().ok_or_else(|| anyhow!("no [SEP]"))?;
    if body.is_empty() {
        bail!("a text tokenised to no content tokens");
    }
    let mut out = Vec::with_capacity(TOKENS);
    out.push(cls);
    out.extend(body.iter().cycle().take(TOKENS - 2));
    out.push(sep);
    Ok(out)
}

/// The same checksum train_step_torch.py prints: sum of id * (flat position % 1000 + 1).
fn checksum(rows: &[Vec<u32>]) -> u64 {
    rows.iter()
        .flatten()
        .enumerate()
        .map(|(i, &id)| u64::from(id) * (i as u64 % 1000 + 1))
        .sum()
}

fn teacher_lists() -> Result<TeacherLists> {
    let mut lists = TeacherLists::new(LIST_LEN);
    let scores: Vec<f32> = (0..LIST_LEN).map(|j| 1.0 - SCORE_STEP * j as f32).collect();
    for q in 0..QUERIES {
        let ids: Vec<u32> = (0..LIST_LEN).map(|j| (q * LIST_LEN + j) as u32).collect();
        lists.push(&ids, &scores)?;
    }
    Ok(lists)
}

fn token_batch(rows: &[Vec<u32>]) -> TokenBatch {
    TokenBatch {
        rows: rows
            .iter()
            .enumerate()
            .map(|(i, ids)| TokenizedText::new(i, ids.clone()))
            .collect(),
    }
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let options = StudentOptions {
        query_max_length: TOKENS,
        passage_max_length: TOKENS,
        ..StudentOptions::default()
    };
    let student = Student::load(&args.model, &options, &Device::Cpu)?;
    let texts = corpus_texts(&args.corpus, QUERIES * (LIST_LEN + 1))?;
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let queries = student
        .tokenize(&refs[..QUERIES], TextKind::Query)?
        .iter()
        .map(|ids| fill(ids))
        .collect::<Result<Vec<_>>>()?;
    let passages = student
        .tokenize(&refs[QUERIES..], TextKind::Passage)?
        .iter()
        .map(|ids| fill(ids))
        .collect::<Result<Vec<_>>>()?;
    let sum = checksum(&queries) + checksum(&passages);
    let lists: Vec<Vec<Vec<u32>>> = passages.chunks(LIST_LEN).map(<[_]>::to_vec).collect();
    let batch = PreparedBatch::from_tokens(queries.clone(), lists, teacher_lists()?)?;
    let (qb, pb) = (token_batch(&queries), token_batch(&passages));
    let q_rows: Vec<&[u32]> = queries.iter().map(Vec::as_slice).collect();
    let p_rows: Vec<&[u32]> = passages.iter().map(Vec::as_slice).collect();

    let loss = LossConfig::default();
    let vars = student.vars();
    let mut optim = AdamW::new(vars.clone(), AdamWConfig::default())?;
    let mut step = || -> Result<f64> {
        let (mut grads, value) = if args.mode == Mode::Plain {
            let (q, q_kept) = student.forward_keep(&q_rows)?;
            let (p, p_kept) = student.forward_keep(&p_rows)?;
            let (q, p) = (Var::from_tensor(&q)?, Var::from_tensor(&p)?);
            let d = p.dim(1)?;
            let p3 = p.as_tensor().reshape((QUERIES, LIST_LEN, d))?;
            let terms = distillation_loss(&loss, q.as_tensor(), &p3, &teacher_lists()?)?;
            let value = terms.total.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            let g = terms.total.backward()?;
            let zero = |v: &Var| v.as_tensor().zeros_like();
            let dq = g.get(q.as_tensor()).cloned().map_or_else(|| zero(&q), Ok)?;
            let dp = g.get(p.as_tensor()).cloned().map_or_else(|| zero(&p), Ok)?;
            let mut total = student.zero_gradients_on(GradientPath::Kernel);
            student.backward_kept(q_kept, &dq, &mut total)?;
            student.backward_kept(p_kept, &dp, &mut total)?;
            (student.gradient_tensors(total)?, value)
        } else if args.mode == Mode::Graph {
            let q = student.embed(&qb)?;
            let p = student.embed(&pb)?;
            let d = p.dim(1)?;
            let p = p.reshape((QUERIES, LIST_LEN, d))?;
            let terms = distillation_loss(&loss, &q, &p, &teacher_lists()?)?;
            let value = terms.total.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            (grads_of(&terms.total.backward()?, &vars), value)
        } else {
            let (g, v) = batch_gradients(&student, &loss, &batch, QUERIES)?;
            (g, v.total)
        };
        clip_grad_norm(&mut grads, CLIP)?;
        optim.step(&grads, LR)?;
        Ok(value)
    };

    let warm = Instant::now();
    let first_loss = step()?;
    let warmup_seconds = warm.elapsed().as_secs_f64();
    let mut step_seconds = Vec::with_capacity(args.steps);
    let mut losses = vec![first_loss];
    for _ in 0..args.steps {
        let t = Instant::now();
        losses.push(step()?);
        step_seconds.push(t.elapsed().as_secs_f64());
    }
    let seconds: f64 = step_seconds.iter().sum();
    // A loss that is not finite means the step computed garbage; the timing would be void.
    if losses.iter().any(|l| !l.is_finite()) {
        bail!("non-finite loss: {losses:?}");
    }
    let report = serde_json::json!({
        "side": "distillery",
        "mode": args.mode.name(),
        "queries_per_step": QUERIES,
        "passages_per_step": QUERIES * LIST_LEN,
        "tokens": TOKENS,
        "steps": args.steps,
        "seconds": seconds,
        "step_seconds": step_seconds,
        "warmup_seconds": warmup_seconds,
        "queries_per_second": (QUERIES * args.steps) as f64 / seconds,
        "losses": losses,
        "token_checksum": sum,
        "threads": std::env::var("RAYON_NUM_THREADS").ok(),
        "parameters": student.num_parameters(),
    });
    println!("{report}");
    if let Some(path) = &args.json {
        std::fs::write(path, format!("{report}\n"))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
