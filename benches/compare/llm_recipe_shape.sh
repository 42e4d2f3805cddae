#!/usr/bin/env bash
# Query generation at the recipe's own shape, side by side: distillery's in-process
# generator (candle, benches/llm_generate.rs) against llama.cpp (llama-cpp-python's
# low-level API, llm_throughput_llamacpp.py) on the same GGUF files of Qwen2.5-0.5B's
# shape (random weights, make_llm_bench_model.py), the same prompts as token ids, the
# same thread count.
#
# The prompts are the ones `distillery generate` renders (llm_generate --render): the
# first --passages passages of the corpus as generation prepares them (texts cut to
# 2,048 characters), one prompt per built-in query type (question, claim, title,
# keywords, search, web) with its few-shot examples drawn from the shipped pools, through
# the model's chat template and tokenizer: several hundred to about a thousand tokens
# each. Each prompt is continued by --new-tokens tokens (the recipe's cap, 50) sampled at
# the recipe's temperature 0.8; end-of-turn is barred on both sides so both make exactly
# that many (random weights would stop at random places).
#
# Modes: single (one prompt at a time) and batched (groups of --rows prompts, sorted by
# length, prefilled together then decoded together, on both sides). distillery runs
# twice per mode: with its shared-prefix reuse (the default: the keys and values of a
# prefix that prompts share, a query type's instruction and rules, computed once) and
# without it (`prefix off` rows), which is what the reuse saves. Rounds alternate the
# order of the two sides so drift in machine load hits both.
#
# usage: benches/compare/llm_recipe_shape.sh [-r ROUNDS] [--passages N] [--new-tokens N]
#            [--rows N] [--threads N] [--quants "q8_0 q4_k_m"] [--corpus FILE]
#            [--model-dir DIR] [--bufts noamx|cpu|auto] [--out DIR]
#   -r ROUNDS      rounds; default 1. Medians over rounds are reported.
#   --passages N   passages rendered (6 prompts each); default 2.
#   --new-tokens   new tokens per prompt; default 50 (the recipe's cap).
#   --rows N       prompts per batched group; default 8.
#   --threads      threads for both sides; default 2.
#   --quants       which GGUF files (model-<quant>.gguf); default "q8_0 q4_k_m".
#   --corpus FILE  BEIR corpus.jsonl the passages come from; default the shipped
#                  datasets/scifact-mini/corpus.jsonl (SciFact passages).
#   --model-dir    where the model files are (made there when missing); default
#                  $DISTILLERY_BENCH_CACHE/qwen2.5-0.5b-random or
#                  ~/.cache/distillery-bench/qwen2.5-0.5b-random.
#   --bufts        llama.cpp's weight layouts (see llm_throughput_llamacpp.py); default
#                  noamx.
#   --out DIR      keep every run's JSON, logs and summary.json there (default: a temp
#                  dir removed at the end).
# Environment: PEERS_PY (a Python with llama-cpp-python, gguf, tokenizers; default
# /root/.cache/distillery-peers/bin/python), CARGO_TARGET_DIR (where the bench builds).
#
# Reported per quantization and mode: prompt tokens, generated tokens, prefill and decode
# tokens/s, end-to-end passages/s (a passage is its six prompts) and generated tokens/s;
# the last line is `end-to-end ratio vs llama.cpp: X`, X the lowest candle / llama.cpp
# ratio of end-to-end time over the quantizations and modes (distillery as it runs by
# default, prefix reuse on).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
rounds=1
passages=2
new_tokens=50
rows=8
threads=2
quants="q8_0 q4_k_m"
corpus=$root/datasets/scifact-mini/corpus.jsonl
model_dir=${DISTILLERY_BENCH_CACHE:-$HOME/.cache/distillery-bench}/qwen2.5-0.5b-random
bufts=noamx
out=""
py=${PEERS_PY:-/root/.cache/distillery-peers/bin/python}
# The recipe's sampling temperature (RECIPE.md section 2).
temperature=0.8

die() { echo "llm_recipe_shape: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    -r|--rounds) rounds=${2:?-r needs a number}; shift 2 ;;
    --passages) passages=${2:?--passages needs a number}; shift 2 ;;
    --new-tokens) new_tokens=${2:?--new-tokens needs a number}; shift 2 ;;
    --rows) rows=${2:?--rows needs a number}; shift 2 ;;
    --threads) threads=${2:?--threads needs a number}; shift 2 ;;
    --quants) quants=${2:?--quants needs a list}; shift 2 ;;
    --corpus) corpus=${2:?--corpus needs a file}; shift 2 ;;
    --model-dir) model_dir=${2:?--model-dir needs a directory}; shift 2 ;;
    --bufts) bufts=${2:?--bufts needs noamx, cpu or auto}; shift 2 ;;
    --out) out=${2:?--out needs a directory}; shift 2 ;;
    -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done
for v in "$rounds" "$passages" "$new_tokens" "$rows" "$threads"; do
  case "$v" in ''|*[!0-9]*|0) die "-r, --passages, --new-tokens, --rows and --threads take positive integers, got '$v'" ;; esac
done
case "$bufts" in noamx|cpu|auto) ;; *) die "--bufts is noamx, cpu or auto, got '$bufts'" ;; esac
for q in $quants; do
  case "$q" in f16|q8_0|q4_k_m) ;; *) die "--quants takes f16, q8_0, q4_k_m; got '$q'" ;; esac
done
[ -f "$corpus" ] || die "no corpus at $corpus (--corpus)"
"$py" -c "import llama_cpp, gguf, tokenizers" 2>/dev/null \
  || die "$py cannot import llama_cpp, gguf and tokenizers (set PEERS_PY; PEERS_EXTRA=\"llama-cpp-python==0.3.36 gguf\" ../shared/tools/peers-venv.sh installs them)"

if [ -n "$out" ]; then
  mkdir -p "$out"
  work=$(cd "$out" && pwd)
else
  work=$(mktemp -d "${TMPDIR:-/tmp}/llm-recipe-shape.XXXXXX")
  trap 'rm -rf "$work"' EXIT
fi

# shellcheck source=benches/compare/llm_common.sh
. "$root/benches/compare/llm_common.sh"
llm_make_models
llm_build_bench
llm_describe_machine

# The prompts, rendered once with the first quantization's file (every file holds the
# same tokenizer and template).
first=${quants%% *}
"$bin" --model "$model_dir/model-$first.gguf" --render "$corpus" --passages "$passages" \
  --out "$work/prompts.json" 2>"$work/render.log" \
  || { cat "$work/render.log" >&2; die "rendering the prompts failed"; }
cat "$work/render.log" >&2

run_candle() {  # $1 = round, $2 = quant, $3 = on|off (prefix reuse)
  RAYON_NUM_THREADS=$threads "$bin" --model "$model_dir/model-$2.gguf" \
    --prompts "$work/prompts.json" --new-tokens "$new_tokens" --mode both --rows "$rows" \
    --temperature "$temperature" --prefix-cache "$3" \
    --json "$work/candle-$3-$2-$1.json" >"$work/candle-$3-$2-$1.log" 2>&1 \
    || { tail -n 20 "$work/candle-$3-$2-$1.log" >&2; die "llm_generate failed ($2, prefix $3, round $1)"; }
}

run_llamacpp() {  # $1 = round, $2 = quant
  OMP_NUM_THREADS=$threads OMP_WAIT_POLICY=PASSIVE \
    "$py" "$root/benches/compare/llm_throughput_llamacpp.py" --model "$model_dir/model-$2.gguf" \
    --prompts "$work/prompts.json" --new-tokens "$new_tokens" --threads "$threads" \
    --mode both --rows "$rows" --temperature "$temperature" --bufts "$bufts" \
    --json "$work/llamacpp-$2-$1.json" >"$work/llamacpp-$2-$1.log" 2>&1 \
    || { tail -n 20 "$work/llamacpp-$2-$1.log" >&2; die "llm_throughput_llamacpp.py failed ($2, round $1)"; }
}

for r in $(seq 1 "$rounds"); do
  for q in $quants; do
    if [ $((r % 2)) -eq 1 ]; then
      echo "round $r/$rounds, $q: candle ..." >&2; run_candle "$r" "$q" on
      echo "round $r/$rounds, $q: llama.cpp ..." >&2; run_llamacpp "$r" "$q"
      echo "round $r/$rounds, $q: candle, prefix reuse off ..." >&2; run_candle "$r" "$q" off
    else
      echo "round $r/$rounds, $q: candle, prefix reuse off ..." >&2; run_candle "$r" "$q" off
      echo "round $r/$rounds, $q: llama.cpp ..." >&2; run_llamacpp "$r" "$q"
      echo "round $r/$rounds, $q: candle ..." >&2; run_candle "$r" "$q" on
    fi
  done
done

load_after=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo unknown)
"$py" - "$work" "$rounds" "$threads" "$new_tokens" "$quants" "$cpu" "$git_rev" \
  "$load_before" "$load_after" "$bufts" "$passages" "$rows" <<'EOF'
import json, os, platform, statistics, sys, time

(work, rounds, threads, new_tokens, quants, cpu, git_rev, load_before, load_after, bufts,
 passages, rows) = sys.argv[1:]
rounds, new_tokens, passages = int(rounds), int(new_tokens), int(passages)
quants = quants.split()
with open(os.path.join(work, "prompts.json")) as f:
    rendered = json.load(f)
n_passages = len(set(rendered["passages"]))

runs = {}  # (side, quant, mode) -> [result per round]
for side, prefix in (("candle", "on"), ("candle-prefix-off", "off"), ("llamacpp", None)):
    for q in quants:
        for r in range(1, rounds + 1):
            name = f"llamacpp-{q}-{r}.json" if prefix is None else f"candle-{prefix}-{q}-{r}.json"
            with open(os.path.join(work, name)) as f:
                for result in json.load(f):
                    runs.setdefault((side, q, result["mode"]), []).append(result)
for (side, q, mode), results in runs.items():
    for res in results:
        if any(c != new_tokens for c in res["generated_per_prompt"]):
            sys.exit(f"{side} {q} {mode}: generated {res['generated_per_prompt']}, not {new_tokens} each")

def med(results, key):
    return statistics.median(r[key] for r in results)

summary = {
    "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "nproc": os.cpu_count(), "cpu": cpu, "kernel": platform.release(), "git": git_rev,
    "loadavg_before": load_before, "loadavg_after": load_after, "threads": int(threads),
    "rounds": rounds, "new_tokens": new_tokens, "rows": int(rows), "llamacpp_bufts": bufts,
    "passages": n_passages, "prompts": len(rendered["prompts"]),
    "prompt_tokens": [len(p) for p in rendered["prompts"]], "results": [],
}
print(f"{summary['date_utc']}  nproc {summary['nproc']}  {cpu}  git {git_rev}")
toks = summary["prompt_tokens"]
print(f"{threads} threads, {rounds} round(s); {n_passages} passages x 6 query types = {len(toks)} "
      f"prompts of {min(toks)} to {max(toks)} tokens ({sum(toks)} in all); {new_tokens} new "
      f"tokens each sampled at 0.8; batched groups of {rows}; llama.cpp bufts {bufts}; "
      f"load {load_before} -> {load_after}")
print()
print("| quant | mode | side | prefill tok/s | decode tok/s | end to end s | passages/s | generated tok/s | prefix tokens reused |")
print("|---|---|---|---|---|---|---|---|---|")
lowest = None
for q in quants:
    for mode in ("single", "batched"):
        base = runs[("llamacpp", q, mode)]
        row = {"quant": q, "mode": mode}
        for side in ("candle", "candle-prefix-off", "llamacpp"):
            rs = runs[(side, q, mode)]
            if rs[0]["prompt_tokens"] != base[0]["prompt_tokens"]:
                sys.exit(f"{q} {mode}: {side} ran other prompts")
            seconds = med(rs, "seconds")
            generated = sum(rs[0]["generated_per_prompt"])
            row[side] = {
                "prefill_tokens_per_second": med(rs, "prefill_tokens_per_second"),
                "decode_tokens_per_second": med(rs, "decode_tokens_per_second"),
                "seconds": seconds, "passages_per_second": n_passages / seconds,
                "generated_tokens_per_second": generated / seconds,
                "prefix_tokens_reused": rs[0].get("prefix_tokens_reused"),
                "runs_seconds": [r["seconds"] for r in rs],
            }
            v = row[side]
            name = {"candle": "distillery", "candle-prefix-off": "distillery, prefix off",
                    "llamacpp": "llama.cpp"}[side]
            reused = "" if v["prefix_tokens_reused"] is None else str(v["prefix_tokens_reused"])
            print(f"| {q} | {mode} | {name} | {v['prefill_tokens_per_second']:.1f} | "
                  f"{v['decode_tokens_per_second']:.1f} | {seconds:.1f} | "
                  f"{v['passages_per_second']:.4f} | {v['generated_tokens_per_second']:.2f} | {reused} |")
        # End to end, candle / llama.cpp as speed (llama.cpp's time over candle's), the
        # median of the per-round ratios.
        ratio = statistics.median(
            b["seconds"] / c["seconds"] for c, b in zip(runs[("candle", q, mode)], base))
        saved = 1 - med(runs[("candle", q, mode)], "seconds") / med(runs[("candle-prefix-off", q, mode)], "seconds")
        row["end_to_end_ratio"] = ratio
        row["prefix_reuse_saves"] = saved
        summary["results"].append(row)
        lowest = ratio if lowest is None else min(lowest, ratio)
print()
for row in summary["results"]:
    print(f"{row['quant']} {row['mode']}: distillery {row['end_to_end_ratio']:.2f}x llama.cpp's "
          f"speed end to end; prefix reuse saves {row['prefix_reuse_saves']:.1%} of distillery's time")
with open(os.path.join(work, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
    f.write("\n")
print(f"end-to-end ratio vs llama.cpp: {lowest:.2f}")
EOF
[ -n "$out" ] && echo "results kept in $work" >&2
exit 0
