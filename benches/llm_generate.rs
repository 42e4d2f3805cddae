//! Generation throughput of distillery's in-process LLM generator (candle) on the CPU, the
//! distillery half of benches/compare/llm_throughput.sh (the llama.cpp half is
//! benches/compare/llm_throughput_llamacpp.py, which does the same work).
//!
//! Work: every prompt of `--prompts` (a JSON file `{"prompts": [[token ids], ...]}`,
//! written by benches/compare/make_llm_bench_model.py) is continued by exactly
//! `--new-tokens` tokens, greedily, through [`LlmGenerator::generate_ids`]:
//! `min_new_tokens` equals `max_new_tokens`, so end-of-turn tokens are barred and every
//! prompt gets the same count (checked). No chat template and no tokenizer are timed.
//!
//! Modes:
//! - `single`: one prompt per `generate_ids` call, one after another;
//! - `batched`: all prompts in one call with `max_batch_rows` = the number of prompts
//!   (prefilled together, then decoded one token per row per step).
//!
//! Phases: the generator times its prompt steps (shared prefixes, each group's prefill
//! and the choice of its first tokens: `prefill_seconds`); `decode_seconds` is the rest
//! of the run (`seconds`), the remaining `new_tokens - 1` tokens per prompt. Model
//! loading and one warm-up generation are not timed. Prints one JSON line per mode (and
//! writes them as a list to `--json`).
//!
//! Options for the recipe's shape (benches/compare/llm_recipe_shape.sh):
//! - `--render CORPUS.jsonl --passages N --out FILE`: writes the prompts `distillery
//!   generate` renders for the first N passages generation takes from CORPUS (default
//!   preparation: titles, texts cut to 2,048 characters), one per built-in query type
//!   with its few-shot examples drawn as the run's seed (42) draws them, through the
//!   model's own chat template and tokenizer: `{"prompts": [[ids]], "seeds": [..],
//!   "types": [..], "passages": [..]}`. Nothing is generated.
//! - `--temperature T`: sample at T with each prompt's seed (`seeds` of the prompts
//!   file, else 0) instead of greedy decoding; end-of-turn stays barred, so every prompt
//!   still gets exactly `--new-tokens`.
//! - `--rows R`: `batched` runs groups of R prompts (the generator's `max_batch_rows`)
//!   instead of all at once.
//! - `--prefix-cache off`: every prompt computed whole (the generator's shared-prefix
//!   reuse off); the JSON line reports `prefix_tokens_reused` either way.
//!
//! `--mode kernels` is a diagnostic instead: it times candle's quantized products
//! (`QMatMul::forward`) for each distinct (matrix, storage type) of the GGUF file at 1, 8
//! and 128 rows, as stored and in the variants that could be faster (see [`kernels`]),
//! and sums them into the matrix time of one decode step and one prompt step. Comparing
//! that with the measured step says how much of a step is matrix products and how much
//! is everything else (attention, norms, RoPE, sampling, synchronisation).
//!
//! usage: cargo bench -p distillery --bench llm_generate -- --model FILE.gguf
//!            [--prompts prompts.json] [--new-tokens N]
//!            [--mode single|batched|both|kernels] [--json OUT]
//!            [--temperature T] [--rows R] [--prefix-cache on|off]
//!        cargo bench -p distillery --bench llm_generate -- --model FILE.gguf
//!            --render CORPUS.jsonl --passages N --out prompts.json
//! Threads: RAYON_NUM_THREADS (candle's CPU kernels and the generator's sampling run on
//! rayon's pool and on candle's pool of the same size).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use distillery::corpus::{open_passages, ReadOptions};
use distillery::generate::prepare::{prepare_passages, PrepareOptions};
use distillery::generate::prompts::PromptSet;
use distillery_operators::llm::{LlmGenerator, LlmOptions, SamplingParams};
use serde_json::json;

/// New tokens per prompt unless `--new-tokens` says otherwise.
const DEFAULT_NEW_TOKENS: usize = 64;
/// New tokens of the untimed warm-up generation (first prompt only).
const WARMUP_TOKENS: usize = 4;
/// The run seed of `distillery generate` unless a config says otherwise.
const RUN_SEED: u64 = 42;

/// What `--render` asks for.
struct Render {
    corpus: PathBuf,
    passages: usize,
    out: PathBuf,
}

struct Args {
    model: PathBuf,
    prompts: PathBuf,
    new_tokens: usize,
    modes: Vec<&'static str>,
    kernels: bool,
    json: Option<PathBuf>,
    temperature: f64,
    rows: Option<usize>,
    prefix_cache: bool,
    render: Option<Render>,
}

fn parse_args() -> Result<Args> {
    let mut model = None;
    let mut prompts = None;
    let mut new_tokens = DEFAULT_NEW_TOKENS;
    let mut modes = vec!["single", "batched"];
    let mut kernels = false;
    let mut json = None;
    let mut temperature = 0.0;
    let mut rows = None;
    let mut prefix_cache = true;
    let (mut corpus, mut passages, mut out) = (None, None, None);
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        // `cargo bench` appends --bench to the arguments of a harness-less target.
        if flag == "--bench" {
            continue;
        }
        let mut value = || it.next().ok_or_else(|| anyhow!("{flag} needs a value"));
        match flag.as_str() {
            "--model" => model = Some(PathBuf::from(value()?)),
            "--prompts" => prompts = Some(PathBuf::from(value()?)),
            "--new-tokens" => {
                new_tokens = value()?
                    .parse()
                    .context("--new-tokens needs a positive integer")?;
                if new_tokens == 0 {
                    bail!("--new-tokens needs a positive integer");
                }
            }
            "--mode" => {
                modes = match value()?.as_str() {
                    "single" => vec!["single"],
                    "batched" => vec!["batched"],
                    "both" => vec!["single", "batched"],
                    "kernels" => {
                        kernels = true;
                        vec![]
                    }
                    other => bail!("--mode is single, batched, both or kernels, not `{other}`"),
                }
            }
            "--json" => json = Some(PathBuf::from(value()?)),
            "--temperature" => {
                temperature = value()?
                    .parse()
                    .context("--temperature needs a number >= 0")?;
            }
            "--rows" => {
                let r: usize = value()?
                    .parse()
                    .context("--rows needs a positive integer")?;
                if r == 0 {
                    bail!("--rows needs a positive integer");
                }
                rows = Some(r);
            }
            "--prefix-cache" => {
                prefix_cache = match value()?.as_str() {
                    "on" => true,
                    "off" => false,
                    other => bail!("--prefix-cache is on or off, not `{other}`"),
                }
            }
            "--render" => corpus = Some(PathBuf::from(value()?)),
            "--passages" => {
                passages = Some(
                    value()?
                        .parse::<usize>()
                        .context("--passages needs a positive integer")?,
                )
            }
            "--out" => out = Some(PathBuf::from(value()?)),
            other => {
                bail!("unknown argument `{other}` (see the header of benches/llm_generate.rs)")
            }
        }
    }
    let render = match (corpus, passages, out) {
        (Some(corpus), Some(passages), Some(out)) if passages > 0 => Some(Render {
            corpus,
            passages,
            out,
        }),
        (None, None, None) => None,
        _ => bail!("--render needs --passages (a positive integer) and --out"),
    };
    if !kernels && render.is_none() && prompts.is_none() {
        bail!("--prompts prompts.json is required");
    }
    Ok(Args {
        model: model.ok_or_else(|| anyhow!("--model FILE.gguf is required"))?,
        prompts: prompts.unwrap_or_default(),
        new_tokens,
        modes,
        kernels,
        json,
        temperature,
        rows,
        prefix_cache,
        render,
    })
}

/// The prompts (token ids) of a prompts file, and their seeds (`seeds`, else 0 each).
fn read_prompts(path: &PathBuf) -> Result<(Vec<Vec<u32>>, Vec<u64>)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let prompts: Vec<Vec<u32>> = serde_json::from_value(
        value
            .get("prompts")
            .cloned()
            .ok_or_else(|| anyhow!("{}: no `prompts` field", path.display()))?,
    )
    .with_context(|| {
        format!(
            "{}: `prompts` is not a list of token id lists",
            path.display()
        )
    })?;
    if prompts.is_empty() || prompts.iter().any(Vec::is_empty) {
        bail!("{}: no prompts, or an empty one", path.display());
    }
    let seeds: Vec<u64> = match value.get("seeds") {
        Some(seeds) => serde_json::from_value(seeds.clone())
            .with_context(|| format!("{}: `seeds` is not a list of integers", path.display()))?,
        None => vec![0; prompts.len()],
    };
    if seeds.len() != prompts.len() {
        bail!(
            "{}: {} seeds for {} prompts",
            path.display(),
            seeds.len(),
            prompts.len()
        );
    }
    Ok((prompts, seeds))
}

/// Writes the prompts `distillery generate` renders for the first passages of a corpus
/// (see the module docs).
fn render(model: &std::path::Path, r: &Render) -> Result<()> {
    let generator = LlmGenerator::load(model, &LlmOptions::default())
        .with_context(|| format!("loading {}", model.display()))?;
    let reader = open_passages(&r.corpus, &ReadOptions::default())
        .with_context(|| format!("opening {}", r.corpus.display()))?;
    let passages = reader
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("reading {}", r.corpus.display()))?;
    let prepared = prepare_passages(passages, &PrepareOptions::default())
        .with_context(|| format!("preparing {}", r.corpus.display()))?;
    let types = PromptSet::builtin().context("the built-in query types")?;
    let (mut prompts, mut seeds, mut names, mut ids) = (vec![], vec![], vec![], vec![]);
    for sampled in prepared.passages.iter().take(r.passages) {
        for request in types.requests(&sampled.passage, RUN_SEED) {
            prompts.push(generator.prompt_ids(&request.messages)?);
            seeds.push(request.seed);
            names.push(request.query_type);
            ids.push(sampled.passage.id.clone());
        }
    }
    if prompts.is_empty() {
        bail!("{}: no passage to render", r.corpus.display());
    }
    let out = json!({"prompts": prompts, "seeds": seeds, "types": names, "passages": ids});
    std::fs::write(&r.out, serde_json::to_string(&out)? + "\n")
        .with_context(|| format!("writing {}", r.out.display()))?;
    let tokens: Vec<usize> = prompts.iter().map(Vec::len).collect();
    eprintln!(
        "{} prompts ({} passages x {} types), {} to {} tokens, {} in all",
        prompts.len(),
        prompts.len() / types.types().len(),
        types.types().len(),
        tokens.iter().min().copied().unwrap_or(0),
        tokens.iter().max().copied().unwrap_or(0),
        tokens.iter().sum::<usize>()
    );
    Ok(())
}

/// Exactly `n` tokens per prompt: greedy at temperature 0, else sampled.
fn exactly(n: usize, temperature: f64) -> SamplingParams {
    SamplingParams {
        temperature,
        top_p: 1.0,
        max_new_tokens: n,
        min_new_tokens: n,
    }
}

/// Runs `prompts` as one call; returns (new ids per prompt, seconds).
fn timed(
    generator: &LlmGenerator,
    prompts: &[Vec<u32>],
    seeds: &[u64],
    new_tokens: usize,
    temperature: f64,
) -> Result<(Vec<Vec<u32>>, f64)> {
    let start = Instant::now();
    let out = generator.generate_ids(prompts, seeds, &exactly(new_tokens, temperature))?;
    let seconds = start.elapsed().as_secs_f64();
    Ok((out.into_iter().map(|(ids, _)| ids).collect(), seconds))
}

fn main() -> Result<()> {
    let args = parse_args()?;
    if args.kernels {
        let report = kernels::report(&args.model)?;
        if let Some(path) = &args.json {
            std::fs::write(path, serde_json::to_string(&report)? + "\n")
                .with_context(|| format!("writing {}", path.display()))?;
        }
        return Ok(());
    }
    if let Some(r) = &args.render {
        return render(&args.model, r);
    }
    let (prompts, seeds) = read_prompts(&args.prompts)?;
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "default".into());
    let prompt_tokens: usize = prompts.iter().map(Vec::len).sum();
    let mut results = Vec::new();
    for mode in &args.modes {
        let rows = if *mode == "single" {
            1
        } else {
            args.rows.unwrap_or(prompts.len())
        };
        let options = LlmOptions {
            max_batch_rows: rows,
            max_batch_tokens: prompt_tokens.max(LlmOptions::default().max_batch_tokens),
            prefix_cache_bytes: if args.prefix_cache {
                LlmOptions::default().prefix_cache_bytes
            } else {
                0
            },
            ..LlmOptions::default()
        };
        let generator = LlmGenerator::load(&args.model, &options)
            .with_context(|| format!("loading {}", args.model.display()))?;
        timed(
            &generator,
            &prompts[..1],
            &seeds[..1],
            WARMUP_TOKENS.min(args.new_tokens),
            args.temperature,
        )?;
        // The timed runs start with no shared prefix kept (the warm-up's dropped) and
        // keep what they compute, as one job's calls do.
        generator.forget_prefixes();
        let size = if *mode == "single" { 1 } else { prompts.len() };
        let mut total = 0.0;
        let mut new_ids = Vec::new();
        let reused_before = generator.prefix_tokens_reused();
        let (prefill_before, _) = generator.step_seconds();
        for (group, group_seeds) in prompts.chunks(size).zip(seeds.chunks(size)) {
            let t = args.temperature;
            let (ids, seconds) = timed(&generator, group, group_seeds, args.new_tokens, t)?;
            total += seconds;
            new_ids.extend(ids);
        }
        // Prompt steps, as the generator times them (prefixes, prefill, first tokens);
        // everything else is decoding.
        let prefill = generator.step_seconds().0 - prefill_before;
        let reused = generator.prefix_tokens_reused() - reused_before;
        let counts: Vec<usize> = new_ids.iter().map(Vec::len).collect();
        if counts.iter().any(|&c| c != args.new_tokens) {
            bail!(
                "generated {counts:?} tokens, not {} per prompt",
                args.new_tokens
            );
        }
        let generated: usize = counts.iter().sum();
        let decode = total - prefill;
        let result = json!({
            "side": "candle",
            "model": args.model.file_name().map(|f| f.to_string_lossy().into_owned()),
            "quantization": generator.quantization(),
            "mode": mode,
            "rows": rows,
            "temperature": args.temperature,
            "prefix_cache": args.prefix_cache,
            "prefix_tokens_reused": reused,
            "threads": threads,
            "prompts": prompts.len(),
            "prompt_tokens": prompt_tokens,
            "new_tokens": args.new_tokens,
            "generated_per_prompt": counts,
            "prefill_seconds": prefill,
            "decode_seconds": decode,
            "seconds": total,
            "prefill_tokens_per_second": prompt_tokens as f64 / prefill,
            "decode_tokens_per_second": if decode > 0.0 {
                Some((generated - prompts.len()) as f64 / decode)
            } else {
                None
            },
            "generated_tokens_per_second": generated as f64 / total,
            "token_ids": new_ids,
        });
        let mut line = result.clone();
        if let Some(map) = line.as_object_mut() {
            map.remove("token_ids");
        }
        println!("{line}");
        results.push(result);
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string(&results)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Timing of candle's quantized matrix products, matrix by matrix.
///
/// Variants timed besides the stored weight:
/// - `q8_0 widened` (Q5_0 matrices): candle 0.11's Q5_0 x Q8_0 dot product is its
///   scalar fallback (no SIMD). A Q5_0 block is `d * (q - 16)` with 5-bit `q`, so the
///   same block in Q8_0 (same `d`, `q - 16` as i8) holds exactly the same values and
///   runs on the SIMD Q8_0 kernel, for 34 bytes per 32 weights instead of 22.
/// - `k padded to a multiple of 256` (Q8_0, also after widening): candle's AVX-512 VNNI
///   tiled kernels for Q8_0 are chosen only when the input width is a multiple of 256
///   (`repack_x86::select`); Qwen2.5-0.5B's 896 is not, so every matrix but ffn_down
///   runs on the plain dot-product kernel. Zero blocks appended to each row (and zeros
///   to each input row, the copy timed too) change no product.
/// - `dequantized f32` (8 and 128 rows): dequantize the whole matrix, then a dense f32
///   product, both timed per call.
///
/// Every variant's output at 8 rows is compared with the exact f32 product of the stored
/// weights (`max_abs_diff_vs_f32`): the quantized kernels round the input rows to 8 bits
/// (per 32 values for Q8_0 / Q5_0, per 256 for the k-quants and the tiled kernels), so
/// their error is that rounding, and a variant as accurate as the stored path shows an
/// error of the same size.
mod kernels {
    use std::collections::BTreeMap;
    use std::fs::File;
    use std::path::Path;
    use std::time::Instant;

    use anyhow::{bail, Context, Result};
    use candle_core::quantized::{ggml_file, gguf_file, GgmlDType, QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};
    use distillery_operators::llm::widen_to_q8_0;
    use serde_json::{json, Value};

    /// Rows timed: one decode step of one sequence, of the batched bench's 8, and a
    /// 128-token prompt.
    const ROWS: [usize; 3] = [1, 8, 128];
    /// Each timing repeats the product until this many seconds have passed...
    const MIN_SECONDS: f64 = 0.15;
    /// ...in this many batches, whose median per-call time is reported.
    const BATCHES: usize = 3;
    /// candle's x86 tiled kernels need input widths in multiples of this (QK_K).
    const TILE_K: usize = 256;
    const Q8_0_BLOCK: usize = 32;
    const Q8_0_BYTES: usize = 34;

    /// A product under test: the weight and whether inputs are zero-padded to its width.
    struct Variant {
        name: String,
        weight: Weight,
        k: usize,
    }

    enum Weight {
        Quantized(QMatMul),
        /// Dequantized (and multiplied in f32) on every call.
        Dequantized(std::sync::Arc<QTensor>),
    }

    impl Variant {
        fn forward(&self, x: &Tensor) -> Result<Tensor> {
            let (_, width) = x.dims2()?;
            let x = if self.k > width {
                x.pad_with_zeros(1, 0, self.k - width)?
            } else {
                x.clone()
            };
            Ok(match &self.weight {
                Weight::Quantized(w) => w.forward(&x)?,
                Weight::Dequantized(q) => x.matmul(&q.dequantize(&Device::Cpu)?.t()?)?,
            })
        }
    }

    /// Q5_0 -> Q8_0, block for block, exactly (the loader's own widening).
    fn widen_q5_0(q: &QTensor) -> Result<QTensor> {
        let data = q.data()?;
        let Some(out) = widen_to_q8_0(GgmlDType::Q5_0, &data) else {
            bail!("Q5_0 data of {} bytes: not whole blocks", data.len());
        };
        Ok(ggml_file::qtensor_from_ggml(
            GgmlDType::Q8_0,
            &out,
            q.shape().dims().to_vec(),
            &Device::Cpu,
        )?)
    }

    /// A Q8_0 matrix with zero blocks appended to each row up to width `k`.
    fn pad_q8_0(q: &QTensor, k: usize) -> Result<QTensor> {
        let (n, width) = q.shape().dims2()?;
        let data = q.data()?;
        let row = width / Q8_0_BLOCK * Q8_0_BYTES;
        let pad = vec![0u8; (k - width) / Q8_0_BLOCK * Q8_0_BYTES];
        let mut out = Vec::with_capacity(n * (row + pad.len()));
        for r in data.chunks_exact(row) {
            out.extend_from_slice(r);
            out.extend_from_slice(&pad);
        }
        Ok(ggml_file::qtensor_from_ggml(
            GgmlDType::Q8_0,
            &out,
            vec![n, k],
            &Device::Cpu,
        )?)
    }

    /// Median seconds per call of `f`.
    fn time(mut f: impl FnMut() -> Result<()>) -> Result<f64> {
        f()?;
        let start = Instant::now();
        f()?;
        let once = start.elapsed().as_secs_f64().max(1e-7);
        let reps = ((MIN_SECONDS / BATCHES as f64 / once).ceil() as usize).clamp(1, 100_000);
        let mut per_call = Vec::with_capacity(BATCHES);
        for _ in 0..BATCHES {
            let start = Instant::now();
            for _ in 0..reps {
                f()?;
            }
            per_call.push(start.elapsed().as_secs_f64() / reps as f64);
        }
        per_call.sort_by(f64::total_cmp);
        Ok(per_call[BATCHES / 2])
    }

    /// `blk.3.ffn_down.weight` -> `ffn_down`; other names as they are.
    fn kind(name: &str) -> String {
        match name.strip_prefix("blk.") {
            Some(rest) => rest
                .split_once('.')
                .map(|(_, r)| r.trim_end_matches(".weight").to_string())
                .unwrap_or_else(|| name.to_string()),
            None => name.trim_end_matches(".weight").to_string(),
        }
    }

    pub fn report(path: &Path) -> Result<Value> {
        let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let content = gguf_file::Content::read(&mut file)
            .with_context(|| format!("reading {}", path.display()))?;
        let tied = !content.tensor_infos.contains_key("output.weight");
        // (kind, type) -> (a representative tensor name, count)
        let mut groups: BTreeMap<(String, String), (String, usize)> = BTreeMap::new();
        for (name, info) in &content.tensor_infos {
            if info.shape.rank() != 2 || (name == "token_embd.weight" && !tied) {
                continue;
            }
            let key = (kind(name), format!("{:?}", info.ggml_dtype));
            let entry = groups.entry(key).or_insert_with(|| (name.clone(), 0));
            entry.1 += 1;
            if name < &entry.0 {
                entry.0 = name.clone();
            }
        }
        let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "default".into());
        let mut rows_out = Vec::new();
        // rows -> (stored, best) summed seconds of one step's products.
        let mut step: BTreeMap<usize, (f64, f64)> = BTreeMap::new();
        for ((kind, dtype), (name, count)) in &groups {
            let q = std::sync::Arc::new(content.tensor(&mut file, name, &Device::Cpu)?);
            let (n, k) = q.shape().dims2()?;
            let mut variants = vec![Variant {
                name: "stored".into(),
                weight: Weight::Quantized(QMatMul::from_arc(q.clone())?),
                k,
            }];
            let q8 = match q.dtype() {
                GgmlDType::Q5_0 => {
                    let w = widen_q5_0(&q)?;
                    let w = std::sync::Arc::new(w);
                    variants.push(Variant {
                        name: "q8_0 widened".into(),
                        weight: Weight::Quantized(QMatMul::from_arc(w.clone())?),
                        k,
                    });
                    Some(w)
                }
                GgmlDType::Q8_0 => Some(q.clone()),
                _ => None,
            };
            if let Some(q8) = q8 {
                if k % TILE_K != 0 {
                    let kp = k.div_ceil(TILE_K) * TILE_K;
                    variants.push(Variant {
                        name: format!("q8_0 k padded {k}->{kp}"),
                        weight: Weight::Quantized(QMatMul::from_qtensor(pad_q8_0(&q8, kp)?)?),
                        k: kp,
                    });
                }
            }
            variants.push(Variant {
                name: "dequantized f32".into(),
                weight: Weight::Dequantized(q.clone()),
                k,
            });
            let probe = Tensor::randn(0f32, 1f32, (8, k), &Device::Cpu)?;
            // The exact product of the stored weights (dequantized, f32).
            let reference = probe.matmul(&q.dequantize(&Device::Cpu)?.t()?)?;
            for &m in &ROWS {
                let x = Tensor::randn(0f32, 1f32, (m, k), &Device::Cpu)?;
                let mut stored = f64::NAN;
                let mut best = f64::INFINITY;
                for v in &variants {
                    if m == 1 && matches!(v.weight, Weight::Dequantized(_)) {
                        continue;
                    }
                    let seconds = time(|| {
                        v.forward(&x)?;
                        Ok(())
                    })?;
                    let diff = (v.forward(&probe)? - &reference)?
                        .abs()?
                        .flatten_all()?
                        .max(0)?
                        .to_scalar::<f32>()?;
                    if v.name == "stored" {
                        stored = seconds;
                    }
                    best = best.min(seconds);
                    let row = json!({
                        "matrix": kind, "type": dtype, "count": count, "n": n, "k": k,
                        "rows": m, "variant": v.name, "ms_per_call": seconds * 1e3,
                        "max_abs_diff_vs_f32": diff, "threads": threads,
                    });
                    println!("{row}");
                    rows_out.push(row);
                }
                let e = step.entry(m).or_insert((0.0, 0.0));
                e.0 += stored * *count as f64;
                e.1 += best * *count as f64;
            }
        }
        let steps: Vec<Value> = step
            .iter()
            .map(|(m, (stored, best))| {
                json!({"rows": m, "stored_ms": stored * 1e3, "best_variant_ms": best * 1e3})
            })
            .collect();
        println!("{}", json!({ "step_matrix_time": steps }));
        Ok(
            json!({ "model": path.display().to_string(), "threads": threads,
                   "products": rows_out, "step_matrix_time": steps }),
        )
    }
}
