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
//! The generator does not report its phases, so each measurement is made twice: with one
//! new token (the prefill and the first sampled token: `prefill_seconds`) and with all of
//! them (`seconds`); `decode_seconds` is the difference, the time of the remaining
//! `new_tokens - 1` tokens per prompt. Model loading and one warm-up generation are not
//! timed. Prints one JSON line per mode (and writes them as a list to `--json`).
//!
//! usage: cargo bench -p distillery --bench llm_generate -- --model FILE.gguf
//!            --prompts prompts.json [--new-tokens N] [--mode single|batched|both]
//!            [--json OUT]
//! Threads: RAYON_NUM_THREADS (candle's CPU kernels and the generator's sampling run on
//! rayon's pool and on candle's pool of the same size).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use distillery_operators::llm::{LlmGenerator, LlmOptions, SamplingParams};
use serde_json::json;

/// New tokens per prompt unless `--new-tokens` says otherwise.
const DEFAULT_NEW_TOKENS: usize = 64;
/// New tokens of the untimed warm-up generation (first prompt only).
const WARMUP_TOKENS: usize = 4;

struct Args {
    model: PathBuf,
    prompts: PathBuf,
    new_tokens: usize,
    modes: Vec<&'static str>,
    json: Option<PathBuf>,
}

fn parse_args() -> Result<Args> {
    let mut model = None;
    let mut prompts = None;
    let mut new_tokens = DEFAULT_NEW_TOKENS;
    let mut modes = vec!["single", "batched"];
    let mut json = None;
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
                    other => bail!("--mode is single, batched or both, not `{other}`"),
                }
            }
            "--json" => json = Some(PathBuf::from(value()?)),
            other => {
                bail!("unknown argument `{other}` (see the header of benches/llm_generate.rs)")
            }
        }
    }
    Ok(Args {
        model: model.ok_or_else(|| anyhow!("--model FILE.gguf is required"))?,
        prompts: prompts.ok_or_else(|| anyhow!("--prompts prompts.json is required"))?,
        new_tokens,
        modes,
        json,
    })
}

fn read_prompts(path: &PathBuf) -> Result<Vec<Vec<u32>>> {
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
    Ok(prompts)
}

/// Exactly `n` greedy tokens per prompt.
fn greedy(n: usize) -> SamplingParams {
    SamplingParams {
        temperature: 0.0,
        top_p: 1.0,
        max_new_tokens: n,
        min_new_tokens: n,
    }
}

/// Runs `prompts` as one call; returns (new ids per prompt, seconds).
fn timed(
    generator: &LlmGenerator,
    prompts: &[Vec<u32>],
    new_tokens: usize,
) -> Result<(Vec<Vec<u32>>, f64)> {
    let seeds = vec![0u64; prompts.len()];
    let start = Instant::now();
    let out = generator.generate_ids(prompts, &seeds, &greedy(new_tokens))?;
    let seconds = start.elapsed().as_secs_f64();
    Ok((out.into_iter().map(|(ids, _)| ids).collect(), seconds))
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let prompts = read_prompts(&args.prompts)?;
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "default".into());
    let prompt_tokens: usize = prompts.iter().map(Vec::len).sum();
    let mut results = Vec::new();
    for mode in &args.modes {
        let rows = if *mode == "single" { 1 } else { prompts.len() };
        let options = LlmOptions {
            max_batch_rows: rows,
            max_batch_tokens: prompt_tokens.max(LlmOptions::default().max_batch_tokens),
            ..LlmOptions::default()
        };
        let generator = LlmGenerator::load(&args.model, &options)
            .with_context(|| format!("loading {}", args.model.display()))?;
        timed(
            &generator,
            &prompts[..1],
            WARMUP_TOKENS.min(args.new_tokens),
        )?;
        let groups: Vec<&[Vec<u32>]> = if *mode == "single" {
            prompts.chunks(1).collect()
        } else {
            vec![&prompts[..]]
        };
        let (mut prefill, mut total) = (0.0, 0.0);
        let mut new_ids = Vec::new();
        for group in groups {
            prefill += timed(&generator, group, 1)?.1;
            let (ids, seconds) = timed(&generator, group, args.new_tokens)?;
            total += seconds;
            new_ids.extend(ids);
        }
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
