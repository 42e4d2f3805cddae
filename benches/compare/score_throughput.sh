#!/usr/bin/env bash
# Side-by-side cross-encoder scoring throughput: `distillery score` against
# sentence-transformers' CrossEncoder on PyTorch, same machine, same model files, same
# pairs, same thread count, same run, interleaved (distillery, ST, distillery, ST, ...)
# so drift in machine load hits both.
#
# usage: benches/compare/score_throughput.sh [-r ROUNDS] [--threads N] [--model DIR]
#            [--dataset DIR] [--queries N] [--per-query N] [--out DIR] [--bin PATH]
#            [--st-only]
#   -r ROUNDS     rounds of (distillery, ST); default 2. Medians are reported.
#   --threads     threads for both sides; default 2.
#   --model DIR   the cross-encoder; default $TMPDIR/distillery-ce-minilm-l6-random,
#                 written by make_ce_model.py when it has no config.json.
#   --dataset     BEIR dataset the pairs come from; default /work/shared/datasets/scifact.
#   --queries, --per-query
#                 pairs = queries x per-query (score_st.py builds them); default 100 x 10.
#   --out DIR     keep every run's JSON, logs, the pairs and summary.json there (default:
#                 a temp dir that is removed at the end).
#   --bin PATH    use this distillery binary instead of building one.
#   --st-only     skip distillery (checks the PyTorch half alone).
# Environment: CARGO_TARGET_DIR (where the release build goes), PEERS_PY (a Python with
# torch + sentence-transformers; default: the one /work/shared/tools/peers-venv.sh prints).
#
# Each side's time excludes model loading: distillery's --json reports the scoring
# dataflow only (reading and tokenising the pairs included); score_st.py warms up on 32
# pairs and times one predict() call. Every distillery round starts from an empty
# directory, so nothing is reused from a store. Both sides truncate pairs at 512 tokens.
# After the rounds the last round's scores of the two sides are compared pair by pair
# (max |difference|) when that Python can import pyarrow (e.g. pip install --target DIR
# pyarrow, then PYTHONPATH=DIR); otherwise the summary says the check was not run.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
rounds=2
threads=2
model=${TMPDIR:-/tmp}/distillery-ce-minilm-l6-random
dataset=/work/shared/datasets/scifact
queries=100
per_query=10
out=""
st_only=0
bin=""
# The model's position limit, set on both sides.
max_length=512

die() { echo "score_throughput: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    -r|--rounds) rounds=${2:?-r needs a number}; shift 2 ;;
    --threads) threads=${2:?--threads needs a number}; shift 2 ;;
    --model) model=${2:?--model needs a directory}; shift 2 ;;
    --dataset) dataset=${2:?--dataset needs a directory}; shift 2 ;;
    --queries) queries=${2:?--queries needs a number}; shift 2 ;;
    --per-query) per_query=${2:?--per-query needs a number}; shift 2 ;;
    --out) out=${2:?--out needs a directory}; shift 2 ;;
    --bin) bin=${2:?--bin needs a path}; shift 2 ;;
    --st-only) st_only=1; shift ;;
    -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done
for v in rounds threads queries per_query; do
  case "${!v}" in ''|*[!0-9]*|0) die "$v must be a positive integer, got '${!v}'" ;; esac
done
[ -f "$dataset/queries.jsonl" ] || die "dataset not found (no queries.jsonl): $dataset"

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
  work=$(mktemp -d "${TMPDIR:-/tmp}/score-throughput.XXXXXX")
  trap 'rm -rf "$work"' EXIT
fi

if [ ! -f "$model/config.json" ]; then
  echo "writing the random MiniLM-L6-shaped cross-encoder to $model ..." >&2
  OMP_WAIT_POLICY=PASSIVE "$py" "$root/benches/compare/make_ce_model.py" "$model" >"$work/model.log" 2>&1 \
    || { tail -n 20 "$work/model.log" >&2; die "make_ce_model.py failed (log above)"; }
fi

pairs=$work/pairs.jsonl
"$py" "$root/benches/compare/score_st.py" --dataset "$dataset" --queries "$queries" \
  --per-query "$per_query" --pairs-out "$pairs" --pairs-only >/dev/null \
  || die "score_st.py could not build the pairs"

if [ "$st_only" -eq 0 ]; then
  if [ -z "$bin" ]; then
    target=${CARGO_TARGET_DIR:-$root/target}
    echo "building distillery (release, target $target) ..." >&2
    (cd "$root" && cargo build --release -p distillery --bin distillery) >"$work/build.log" 2>&1 \
      || { tail -n 30 "$work/build.log" >&2; die "cargo build failed (log above)"; }
    bin=$target/release/distillery
  fi
  [ -x "$bin" ] || die "no executable distillery binary at $bin"
  "$bin" score --help >/dev/null 2>&1 \
    || die "$bin has no working 'score' subcommand ('$bin score --help' failed); try --st-only"
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
  # RAYON_NUM_THREADS caps the CPU kernels too, whatever --threads does inside.
  RAYON_NUM_THREADS=$threads "$bin" score --model "$model" --input "$pairs" \
    --output "$dir/scores.parquet" --max-length "$max_length" --json "$dir/d.json" \
    --threads "$threads" --quiet \
    >"$dir/log" 2>&1 || { tail -n 20 "$dir/log" >&2; die "distillery score failed (round $1)"; }
  [ -s "$dir/d.json" ] || die "distillery score wrote no $dir/d.json (round $1)"
  cp "$dir/d.json" "$work/distillery-$1.json"
  # Only the last round's scores are kept, for the agreement check.
  mv "$dir/scores.parquet" "$work/distillery-scores.parquet"
  rm -rf "$dir/scores.run"
}

run_st() {  # $1 = round
  OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads OMP_WAIT_POLICY=PASSIVE \
    "$py" "$root/benches/compare/score_st.py" --model "$model" --dataset "$dataset" \
    --queries "$queries" --per-query "$per_query" --threads "$threads" \
    --json "$work/st-$1.json" --scores-out "$work/st-scores.jsonl" >"$work/st-$1.log" 2>&1 \
    || { tail -n 20 "$work/st-$1.log" >&2; die "score_st.py failed (round $1)"; }
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
"$py" - "$work" "$rounds" "$threads" "$cpu" "$git_rev" "$load_before" "$load_after" "$dataset" "$model" <<'EOF'
import json, os, platform, statistics, sys, time

work, rounds, threads, cpu, git_rev, load_before, load_after, dataset, model = sys.argv[1:]
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
    "dataset": dataset,
    "model": model,
    "threads": int(threads),
    "rounds": rounds,
}
for side in ("distillery", "st"):
    runs = load(side)
    if not runs:
        continue
    for run in runs:
        for key in ("pairs", "seconds", "pairs_per_second"):
            if key not in run:
                sys.exit(f"{side} JSON lacks '{key}': {run}")
        if run.get("reused"):
            sys.exit(f"{side} reused stored scores instead of computing them: {run}")
    summary[side] = {
        "pairs": runs[0]["pairs"],
        "pairs_per_second": [r["pairs_per_second"] for r in runs],
        "seconds": [r["seconds"] for r in runs],
        "median_pairs_per_second": statistics.median(r["pairs_per_second"] for r in runs),
    }
if "distillery" in summary and "st" in summary:
    if summary["distillery"]["pairs"] != summary["st"]["pairs"]:
        sys.exit(f"pair counts differ: distillery {summary['distillery']['pairs']}, "
                 f"sentence-transformers {summary['st']['pairs']}")
    # One way to report a ratio: the median of the per-round ratios (the two sides of a
    # round ran back to back, under the same machine load).
    per_round = [a / b for a, b in zip(summary["distillery"]["pairs_per_second"],
                                       summary["st"]["pairs_per_second"])]
    if len(summary["distillery"]["pairs_per_second"]) != len(summary["st"]["pairs_per_second"]):
        sys.exit("the two sides finished different numbers of rounds")
    summary["ratio_per_round"] = per_round
    summary["ratio_distillery_over_st"] = statistics.median(per_round)

    # Agreement of the last round's scores, pair by pair.
    try:
        import pyarrow.parquet as pq
    except ImportError:
        summary["agreement"] = "not checked: pyarrow is not importable"
    else:
        table = pq.read_table(os.path.join(work, "distillery-scores.parquet"))
        ours = list(zip(table.column("id").to_pylist(), table.column("score").to_pylist()))
        with open(os.path.join(work, "st-scores.jsonl")) as f:
            theirs = [json.loads(line) for line in f]
        if [i for i, _ in ours] != [t["id"] for t in theirs]:
            sys.exit("the two sides' pair ids differ (or are in another order)")
        diffs = [abs(s - t["score"]) for (_, s), t in zip(ours, theirs)]
        st_scores = [t["score"] for t in theirs]
        summary["agreement"] = {
            "max_abs_diff": max(diffs),
            "mean_abs_diff": statistics.fmean(diffs),
            "st_score_stdev": statistics.pstdev(st_scores),
        }

with open(os.path.join(work, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
    f.write("\n")

print(f"{summary['date_utc']}  nproc {summary['nproc']}  {cpu}  git {git_rev}")
print(f"pairs from {dataset}, {threads} threads, {rounds} rounds, load {load_before} -> {load_after}")
for side, name in (("distillery", "distillery"), ("st", "sentence-transformers (torch)")):
    if side in summary:
        s = summary[side]
        each = ", ".join(f"{v:.1f}" for v in s["pairs_per_second"])
        print(f"{name:32s} median {s['median_pairs_per_second']:8.1f} pairs/s"
              f"  ({s['pairs']} pairs; runs: {each})")
if "ratio_distillery_over_st" in summary:
    print(f"ratio distillery / sentence-transformers (median of per-round ratios): {summary['ratio_distillery_over_st']:.2f}"
          f" (rounds: {', '.join(f'{r:.2f}' for r in summary['ratio_per_round'])})")
a = summary.get("agreement")
if isinstance(a, dict):
    print(f"scores agree: max |diff| {a['max_abs_diff']:.2e}, mean {a['mean_abs_diff']:.2e} "
          f"(score stdev {a['st_score_stdev']:.3f})")
elif a:
    print(f"scores {a}")
EOF
[ -n "$out" ] && echo "results kept in $work" >&2
exit 0
