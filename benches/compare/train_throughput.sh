#!/usr/bin/env bash
# Side-by-side training throughput: one optimizer step (16 queries x 20 passages, 128
# tokens each, the recipe's loss, backward, clip 1.0, AdamW) in distillery
# (benches/train_step.rs: the student's CPU training kernel, or candle's autograd with
# --mode graph) and in PyTorch (train_step_torch.py, transformers' BertModel), same machine, same thread count, same run, interleaved (distillery, PyTorch,
# distillery, PyTorch, ...) so drift in machine load hits both.
#
# usage: benches/compare/train_throughput.sh [-r ROUNDS] [--steps N] [--threads N]
#            [--model DIR] [--corpus corpus.jsonl] [--mode cached|plain|graph] [--out DIR]
#            [--torch-only]
#   -r ROUNDS   rounds of (distillery, PyTorch); default 2. Medians are reported.
#   --steps N   timed steps per run after one warm-up step; default 3.
#   --threads   threads for both sides; default 2.
#   --mode      distillery's path: cached (the trainer's: gradient caching with one
#               micro-batch of 16, which adds a forward pass without gradients), plain
#               (one forward keeping activations, then backward: the same work PyTorch
#               does; both on the student's CPU kernel) or graph (candle's autograd, the
#               path before the kernel); default cached.
#   --out DIR   keep every run's JSON, logs and summary.json there (default: a temp dir
#               that is removed at the end).
#   --torch-only  skip distillery (checks the PyTorch half alone).
# Environment: CARGO_TARGET_DIR (where the bench build goes), PEERS_PY (a Python with torch
# + transformers; default: the one /work/shared/tools/peers-venv.sh prints),
# DISTILLERY_MINILM_DIR (the default --model).
#
# Each side's time excludes model loading, tokenising and the warm-up step. queries/s is
# 16 x steps / the timed seconds. Both sides print a checksum of their token ids; the
# script stops if they differ, so both train on the same batch.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
rounds=2
steps=3
threads=2
model=${DISTILLERY_MINILM_DIR:-/work/shared/models/all-MiniLM-L6-v2}
corpus=/work/shared/datasets/scifact/corpus.jsonl
mode=cached
out=""
torch_only=0

die() { echo "train_throughput: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    -r|--rounds) rounds=${2:?-r needs a number}; shift 2 ;;
    --steps) steps=${2:?--steps needs a number}; shift 2 ;;
    --threads) threads=${2:?--threads needs a number}; shift 2 ;;
    --model) model=${2:?--model needs a directory}; shift 2 ;;
    --corpus) corpus=${2:?--corpus needs a file}; shift 2 ;;
    --mode) mode=${2:?--mode needs cached or plain}; shift 2 ;;
    --out) out=${2:?--out needs a directory}; shift 2 ;;
    --torch-only) torch_only=1; shift ;;
    -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done
for v in "$rounds" "$steps" "$threads"; do
  case "$v" in ''|*[!0-9]*|0) die "-r, --steps and --threads take positive integers, got '$v'" ;; esac
done
case "$mode" in cached|plain|graph) ;; *) die "--mode is cached, plain or graph, got '$mode'" ;; esac
[ -f "$model/config.json" ] || die "model directory not found: $model (pass --model DIR)"
[ -f "$corpus" ] || die "corpus not found: $corpus"

if [ -n "${PEERS_PY:-}" ]; then
  py=$PEERS_PY
else
  [ -x /work/shared/tools/peers-venv.sh ] || die "set PEERS_PY to a Python with torch and transformers"
  py=$(/work/shared/tools/peers-venv.sh) || die "peers-venv.sh failed"
fi
"$py" -c "import torch, transformers" 2>/dev/null || die "$py cannot import torch and transformers"

if [ -n "$out" ]; then
  mkdir -p "$out"
  work=$(cd "$out" && pwd)
else
  work=$(mktemp -d "${TMPDIR:-/tmp}/train-throughput.XXXXXX")
  trap 'rm -rf "$work"' EXIT
fi

if [ "$torch_only" -eq 0 ]; then
  echo "building benches/train_step.rs (cargo bench --no-run) ..." >&2
  (cd "$root" && cargo bench -p distillery --bench train_step --no-run --message-format=json) \
    >"$work/build.json" 2>"$work/build.log" \
    || { tail -n 30 "$work/build.log" >&2; die "cargo build of the bench failed (log above)"; }
  bin=$("$py" -c '
import json, sys
for line in open(sys.argv[1]):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == "train_step" \
            and m.get("executable"):
        print(m["executable"])
' "$work/build.json" | tail -n 1)
  [ -n "$bin" ] && [ -x "$bin" ] || die "no train_step executable in cargo's output ($work/build.json)"
fi

cpu=$(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | sed 's/.*: //' || true)
[ -n "$cpu" ] || cpu=$(uname -m)
# The vector extensions both sides' matmul kernels pick from.
isa=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | tr ' ' '\n' \
  | grep -x -E 'avx2|avx512f|avx512_bf16|avx512_vnni|amx_tile' | tr '\n' ' ' | sed 's/ $//' || true)
[ -n "$isa" ] && cpu="$cpu [$isa]"
git_rev=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)
load_before=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo unknown)
echo "date $(date -u +%Y-%m-%dT%H:%M:%SZ)  nproc $(nproc)  cpu: $cpu  load: $load_before  git $git_rev" >&2
if [ "$torch_only" -eq 0 ]; then
  # The distillery binary, for its CPU report (the bench above built the library).
  target=${CARGO_TARGET_DIR:-$root/target}
  (cd "$root" && cargo build --release -p distillery --bin distillery) >>"$work/build.log" 2>&1 \
    || { tail -n 30 "$work/build.log" >&2; die "cargo build of distillery failed (log above)"; }
  # The CPU, its features and the path distillery's hand-written kernels take
  # (DISTILLERY_CPU forces one): `distillery cpu`.
  if "$target/release/distillery" cpu --help >/dev/null 2>&1; then
    "$target/release/distillery" cpu >&2 || die "'$target/release/distillery cpu' failed: DISTILLERY_CPU refused (message above)"
  else
    echo "($target/release/distillery has no 'cpu' command: CPU path not reported)" >&2
  fi
fi

run_distillery() {  # $1 = round
  # RAYON_NUM_THREADS sizes the pool candle's CPU kernels and gemm run on.
  RAYON_NUM_THREADS=$threads "$bin" --model "$model" --corpus "$corpus" --steps "$steps" \
    --mode "$mode" --json "$work/distillery-$1.json" >"$work/distillery-$1.log" 2>&1 \
    || { tail -n 20 "$work/distillery-$1.log" >&2; die "train_step failed (round $1)"; }
}

run_torch() {  # $1 = round
  OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads OMP_WAIT_POLICY=PASSIVE \
    "$py" "$root/benches/compare/train_step_torch.py" --model "$model" --corpus "$corpus" \
    --steps "$steps" --threads "$threads" --json "$work/torch-$1.json" \
    >"$work/torch-$1.log" 2>&1 \
    || { tail -n 20 "$work/torch-$1.log" >&2; die "train_step_torch.py failed (round $1)"; }
}

for r in $(seq 1 "$rounds"); do
  if [ "$torch_only" -eq 0 ]; then
    echo "round $r/$rounds: distillery ($mode) ..." >&2
    run_distillery "$r"
  fi
  echo "round $r/$rounds: PyTorch ..." >&2
  run_torch "$r"
done

load_after=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo unknown)
"$py" - "$work" "$rounds" "$threads" "$cpu" "$git_rev" "$load_before" "$load_after" "$mode" <<'EOF'
import json, os, platform, statistics, sys, time

work, rounds, threads, cpu, git_rev, load_before, load_after, mode = sys.argv[1:]
rounds = int(rounds)

def load(side):
    runs = []
    for r in range(1, rounds + 1):
        path = os.path.join(work, f"{side}-{r}.json")
        if os.path.exists(path):
            with open(path) as f:
                runs.append(json.load(f))
    return runs

summary = {
    "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "nproc": os.cpu_count(),
    "cpu": cpu,
    "kernel": platform.release(),
    "git": git_rev,
    "loadavg_before": load_before,
    "loadavg_after": load_after,
    "threads": int(threads),
    "rounds": rounds,
    "distillery_mode": mode,
}
for side in ("distillery", "torch"):
    runs = load(side)
    if not runs:
        continue
    for run in runs:
        for key in ("queries_per_step", "steps", "seconds", "queries_per_second", "token_checksum"):
            if key not in run:
                sys.exit(f"{side} JSON lacks '{key}': {run}")
    summary[side] = {
        "queries_per_step": runs[0]["queries_per_step"],
        "passages_per_step": runs[0].get("passages_per_step"),
        "tokens": runs[0].get("tokens"),
        "steps": runs[0]["steps"],
        "token_checksum": runs[0]["token_checksum"],
        "parameters": runs[0].get("parameters"),
        "queries_per_second": [r["queries_per_second"] for r in runs],
        "step_seconds": [r.get("step_seconds") for r in runs],
        "first_losses": [r.get("losses", [None])[0] for r in runs],
        "median_queries_per_second": statistics.median(r["queries_per_second"] for r in runs),
    }
if "distillery" in summary and "torch" in summary:
    d, t = summary["distillery"], summary["torch"]
    for key in ("queries_per_step", "passages_per_step", "tokens", "token_checksum", "parameters"):
        if d[key] != t[key]:
            sys.exit(f"the two sides did different work: {key} distillery {d[key]}, PyTorch {t[key]}")
    # One way to report a ratio: the median of the per-round ratios (the two sides of a
    # round ran back to back, under the same machine load).
    per_round = [a / b for a, b in zip(summary["distillery"]["queries_per_second"],
                                       summary["torch"]["queries_per_second"])]
    if len(summary["distillery"]["queries_per_second"]) != len(summary["torch"]["queries_per_second"]):
        sys.exit("the two sides finished different numbers of rounds")
    summary["ratio_per_round"] = per_round
    summary["ratio_distillery_over_torch"] = statistics.median(per_round)

with open(os.path.join(work, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
    f.write("\n")

print(f"{summary['date_utc']}  nproc {summary['nproc']}  {cpu}  git {git_rev}")
print(f"{threads} threads, {rounds} rounds, load {load_before} -> {load_after}")
for side, name in (("distillery", f"distillery ({mode})"), ("torch", "PyTorch (BertModel)")):
    if side in summary:
        s = summary[side]
        each = ", ".join(f"{v:.3f}" for v in s["queries_per_second"])
        loss = ", ".join(f"{v:.4f}" for v in s["first_losses"] if v is not None)
        print(f"{name:30s} median {s['median_queries_per_second']:7.3f} queries/s"
              f"  ({s['steps']} steps of {s['queries_per_step']} queries; runs: {each};"
              f" first-step loss {loss})")
if "ratio_distillery_over_torch" in summary:
    print(f"ratio distillery / PyTorch (median of per-round ratios): {summary['ratio_distillery_over_torch']:.2f}"
          f" (rounds: {', '.join(f'{r:.2f}' for r in summary['ratio_per_round'])})")
EOF
[ -n "$out" ] && echo "results kept in $work" >&2
exit 0
