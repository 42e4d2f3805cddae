#!/usr/bin/env bash
# Side-by-side LLM generation throughput: distillery's in-process generator (candle,
# benches/llm_generate.rs) against llama.cpp (llama-cpp-python's low-level API,
# llm_throughput_llamacpp.py) on the same GGUF files of Qwen2.5-0.5B's shape (random
# weights, make_llm_bench_model.py), same prompts (token ids), same thread count, greedy,
# exactly --new-tokens tokens per prompt on both sides. Runs alternate (candle, llama.cpp,
# then llama.cpp, candle in the next round, ...) so drift in machine load hits both.
#
# usage: benches/compare/llm_throughput.sh [-r ROUNDS] [--new-tokens N] [--threads N]
#            [--quants "q8_0 q4_k_m"] [--model-dir DIR] [--bufts noamx|cpu|auto]
#            [--out DIR]
#   -r ROUNDS      rounds; default 2. Medians over rounds are reported.
#   --new-tokens   new tokens per prompt; default 64.
#   --threads      threads for both sides; default 2.
#   --quants       which GGUF files (model-<quant>.gguf); default "q8_0 q4_k_m".
#   --model-dir    where the model files are (made there when missing); default
#                  $DISTILLERY_BENCH_CACHE/qwen2.5-0.5b-random or
#                  ~/.cache/distillery-bench/qwen2.5-0.5b-random.
#   --bufts        llama.cpp's weight layouts (see llm_throughput_llamacpp.py); default
#                  noamx (its AMX path crashes on these machines).
#   --out DIR      keep every run's JSON, logs and summary.json there (default: a temp
#                  dir removed at the end).
# Environment: PEERS_PY (a Python with llama-cpp-python, gguf, tokenizers; default
# /root/.cache/distillery-peers/bin/python), CARGO_TARGET_DIR (where the bench builds).
#
# Both sides run each prompt set twice per mode, single (one prompt at a time) and
# batched (all prompts in one batch), and report prefill tokens/s, decode tokens/s (the
# new tokens after the first) and generated tokens/s end to end (prefill included).
# Model loading and a warm-up generation are not timed.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
rounds=2
new_tokens=64
threads=2
quants="q8_0 q4_k_m"
model_dir=${DISTILLERY_BENCH_CACHE:-$HOME/.cache/distillery-bench}/qwen2.5-0.5b-random
bufts=noamx
out=""
py=${PEERS_PY:-/root/.cache/distillery-peers/bin/python}

die() { echo "llm_throughput: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    -r|--rounds) rounds=${2:?-r needs a number}; shift 2 ;;
    --new-tokens) new_tokens=${2:?--new-tokens needs a number}; shift 2 ;;
    --threads) threads=${2:?--threads needs a number}; shift 2 ;;
    --quants) quants=${2:?--quants needs a list}; shift 2 ;;
    --model-dir) model_dir=${2:?--model-dir needs a directory}; shift 2 ;;
    --bufts) bufts=${2:?--bufts needs noamx, cpu or auto}; shift 2 ;;
    --out) out=${2:?--out needs a directory}; shift 2 ;;
    -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done
for v in "$rounds" "$new_tokens" "$threads"; do
  case "$v" in ''|*[!0-9]*|0) die "-r, --new-tokens and --threads take positive integers, got '$v'" ;; esac
done
case "$bufts" in noamx|cpu|auto) ;; *) die "--bufts is noamx, cpu or auto, got '$bufts'" ;; esac
for q in $quants; do
  case "$q" in f16|q8_0|q4_k_m) ;; *) die "--quants takes f16, q8_0, q4_k_m; got '$q'" ;; esac
done
"$py" -c "import llama_cpp, gguf, tokenizers" 2>/dev/null \
  || die "$py cannot import llama_cpp, gguf and tokenizers (set PEERS_PY)"

if [ -n "$out" ]; then
  mkdir -p "$out"
  work=$(cd "$out" && pwd)
else
  work=$(mktemp -d "${TMPDIR:-/tmp}/llm-throughput.XXXXXX")
  trap 'rm -rf "$work"' EXIT
fi

# shellcheck source=benches/compare/llm_common.sh
. "$root/benches/compare/llm_common.sh"
llm_make_models
llm_build_bench
llm_describe_machine

run_candle() {  # $1 = round, $2 = quant
  # RAYON_NUM_THREADS sizes rayon's pool and candle's own CPU pool.
  RAYON_NUM_THREADS=$threads "$bin" --model "$model_dir/model-$2.gguf" \
    --prompts "$model_dir/prompts.json" --new-tokens "$new_tokens" --mode both \
    --json "$work/candle-$2-$1.json" >"$work/candle-$2-$1.log" 2>&1 \
    || { tail -n 20 "$work/candle-$2-$1.log" >&2; die "llm_generate failed ($2, round $1)"; }
}

run_llamacpp() {  # $1 = round, $2 = quant
  OMP_NUM_THREADS=$threads OMP_WAIT_POLICY=PASSIVE \
    "$py" "$root/benches/compare/llm_throughput_llamacpp.py" --model "$model_dir/model-$2.gguf" \
    --prompts "$model_dir/prompts.json" --new-tokens "$new_tokens" --threads "$threads" \
    --mode both --bufts "$bufts" --json "$work/llamacpp-$2-$1.json" \
    >"$work/llamacpp-$2-$1.log" 2>&1 \
    || { tail -n 20 "$work/llamacpp-$2-$1.log" >&2; die "llm_throughput_llamacpp.py failed ($2, round $1)"; }
}

loads=()
for r in $(seq 1 "$rounds"); do
  for q in $quants; do
    loads+=("$(cut -d' ' -f1 /proc/loadavg)")
    if [ $((r % 2)) -eq 1 ]; then
      echo "round $r/$rounds, $q: candle ..." >&2; run_candle "$r" "$q"
      echo "round $r/$rounds, $q: llama.cpp ..." >&2; run_llamacpp "$r" "$q"
    else
      echo "round $r/$rounds, $q: llama.cpp ..." >&2; run_llamacpp "$r" "$q"
      echo "round $r/$rounds, $q: candle ..." >&2; run_candle "$r" "$q"
    fi
  done
done

load_after=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo unknown)
"$py" - "$work" "$rounds" "$threads" "$new_tokens" "$quants" "$cpu" "$git_rev" \
  "$load_before" "$load_after" "$bufts" "${loads[*]}" <<'EOF'
import json, os, platform, statistics, sys, time

(work, rounds, threads, new_tokens, quants, cpu, git_rev, load_before, load_after, bufts,
 loads) = sys.argv[1:]
rounds, new_tokens = int(rounds), int(new_tokens)
quants = quants.split()
METRICS = ("prefill_tokens_per_second", "decode_tokens_per_second",
           "generated_tokens_per_second")

runs = {}  # (side, quant, mode) -> [result per round]
for side in ("candle", "llamacpp"):
    for q in quants:
        for r in range(1, rounds + 1):
            with open(os.path.join(work, f"{side}-{q}-{r}.json")) as f:
                for result in json.load(f):
                    runs.setdefault((side, q, result["mode"]), []).append(result)

summary = {
    "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "nproc": os.cpu_count(),
    "cpu": cpu,
    "kernel": platform.release(),
    "git": git_rev,
    "loadavg_before": load_before,
    "loadavg_after": load_after,
    "loadavg_1min_at_each_pair": [float(x) for x in loads.split()],
    "threads": int(threads),
    "rounds": rounds,
    "new_tokens": new_tokens,
    "llamacpp_bufts": bufts,
    "results": [],
}
for (side, q, mode), results in sorted(runs.items()):
    for res in results:
        counts = res["generated_per_prompt"]
        if any(c != new_tokens for c in counts):
            sys.exit(f"{side} {q} {mode}: generated {counts}, not {new_tokens} per prompt")
first = {key: rs[0] for key, rs in runs.items()}
for q in quants:
    for mode in ("single", "batched"):
        c, l = runs[("candle", q, mode)], runs[("llamacpp", q, mode)]
        if c[0]["prompt_tokens"] != l[0]["prompt_tokens"] or c[0]["prompts"] != l[0]["prompts"]:
            sys.exit(f"{q} {mode}: the two sides ran different prompts")
        row = {"quant": q, "mode": mode, "prompts": c[0]["prompts"],
               "prompt_tokens": c[0]["prompt_tokens"]}
        for m in METRICS:
            cm = statistics.median(r[m] for r in c)
            lm = statistics.median(r[m] for r in l)
            # The ratio is the median of the per-round ratios (each round ran both sides
            # back to back), not the ratio of the medians.
            ratio = statistics.median(a[m] / b[m] for a, b in zip(c, l))
            row[m] = {"candle": cm, "llamacpp": lm, "ratio": ratio,
                      "candle_runs": [r[m] for r in c], "llamacpp_runs": [r[m] for r in l]}
        # Greedy agreement: random weights give near-ties, so 8-bit and 4-bit kernels that
        # round differently part ways after a few tokens; the first token checks that both
        # sides run the same model on the same prompt.
        ci, li = first[("candle", q, mode)]["token_ids"], first[("llamacpp", q, mode)]["token_ids"]
        prefix = []
        for a, b in zip(ci, li):
            n = 0
            while n < min(len(a), len(b)) and a[n] == b[n]:
                n += 1
            prefix.append(n)
        row["first_token_agreement"] = sum(p > 0 for p in prefix) / len(prefix)
        row["common_prefix_tokens"] = prefix
        summary["results"].append(row)

with open(os.path.join(work, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
    f.write("\n")

print(f"{summary['date_utc']}  nproc {summary['nproc']}  {cpu}  git {git_rev}")
print(f"{threads} threads, {rounds} rounds, {new_tokens} new tokens per prompt, llama.cpp "
      f"bufts {bufts}; load {load_before} -> {load_after}")
print()
print("| quant | mode | prompts x tokens | metric (tokens/s) | candle | llama.cpp | candle / llama.cpp (median of per-round ratios) |")
print("|---|---|---|---|---|---|---|")
names = {"prefill_tokens_per_second": "prefill", "decode_tokens_per_second": "decode",
         "generated_tokens_per_second": "generated, end to end"}
for row in summary["results"]:
    shape = f"{row['prompts']} x {row['prompt_tokens'] // row['prompts']}"
    for m in METRICS:
        v = row[m]
        print(f"| {row['quant']} | {row['mode']} | {shape} | {names[m]} | {v['candle']:.2f} "
              f"| {v['llamacpp']:.2f} | {v['ratio']:.2f} |")
print()
for row in summary["results"]:
    print(f"{row['quant']} {row['mode']}: first greedy token equal on "
          f"{row['first_token_agreement']:.0%} of prompts; common prefix "
          f"{row['common_prefix_tokens']}")
EOF
[ -n "$out" ] && echo "results kept in $work" >&2
exit 0
