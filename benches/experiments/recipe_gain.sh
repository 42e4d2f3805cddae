#!/usr/bin/env bash
# Issue 16's experiment on one BEIR dataset (its corpus's own text only, no human train
# queries): extractive synthetic queries for every passage; the teacher check of BM25,
# the all-MiniLM-L6-v2 bi-encoder and their combination on the test split; then
# all-MiniLM-L6-v2 base vs `infonce`, `listwise` and `listwise_infonce`, each trained
# with the passage encoder frozen (query-tower training, on every query) and with both
# encoders (full fine-tuning, on the queries of a subsample of passages that fits two
# cores). Prints one markdown table of nDCG@10, Recall@100 and MRR@10 per cell, and the
# wall time of each part of each run.
#
# Settings (each variant differs from the others only where the table says): lists of 8,
# 64 queries a step (16 x 4 accumulated), lr 1e-5, teacher temperature 0.05 (these
# teachers' lists are flat at the recipe's 0.3: BENCHMARKS.md, the demo), MiniLM's own 256
# tokens for passages, 64 for queries; frozen: every passage's queries, EPOCHS epochs;
# shared: the queries of SHARED_PASSAGES sampled passages, EPOCHS epochs.
#
# usage: benches/experiments/recipe_gain.sh DATASET_DIR [--out DIR]
# Environment: DISTILLERY (the binary; default: cargo build --release),
# DISTILLERY_MINILM_DIR (default /work/shared/models/all-MiniLM-L6-v2), EPOCHS (2),
# SHARED_PASSAGES (400).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
data=${1:?usage: recipe_gain.sh DATASET_DIR [--out DIR]}
data=$(cd "$data" && pwd)
shift
name=$(basename "$data")
out=$root/runs/recipe-gain-$name
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out=${2:?--out needs a directory}; shift 2 ;;
    -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "recipe_gain: unknown argument $1" >&2; exit 1 ;;
  esac
done
model=${DISTILLERY_MINILM_DIR:-/work/shared/models/all-MiniLM-L6-v2}
epochs=${EPOCHS:-2}
shared_passages=${SHARED_PASSAGES:-400}
[ -f "$model/config.json" ] || { echo "recipe_gain: no model at $model" >&2; exit 1; }
[ -f "$data/corpus.jsonl" ] || { echo "recipe_gain: no corpus.jsonl in $data" >&2; exit 1; }
if [ -z "${DISTILLERY:-}" ]; then
  (cd "$root" && cargo build --release --bin distillery >&2)
  DISTILLERY=${CARGO_TARGET_DIR:-$root/target}/release/distillery
fi
mkdir -p "$out"

teachers() {  # $1 = bm25 | bi-encoder | both
  case "$1" in
    bm25) printf '[[teachers]]\nkind = "bm25"\n' ;;
    bi-encoder) printf '[[teachers]]\nkind = "bi-encoder"\nmodel = "%s"\n' "$model" ;;
    both) teachers bi-encoder; teachers bm25 ;;
  esac
}

config() {  # $1 = run dir, $2 = encoder, $3 = loss mode, $4 = max passages (0: all)
  cat <<TOML
run_dir = "$1"
corpus = "$data/corpus.jsonl"

[held_out]
count = 100

[generate]
generator = "extractive"
$([ "$4" -gt 0 ] && echo "max_passages = $4")

[[retrievers]]
model = "$model"

$(teachers both)

[student]
model = "$model"
query_max_length = 64
passage_max_length = 256

[train]
micro_batch = 16
accumulation = 4
max_epochs = $epochs
list_len = 8
passage_encoder = "$2"
[train.optimizer]
lr = 1e-5
[train.loss]
mode = "$3"
teacher_temperature = 0.05

[eval]
dataset = "$data"
split = "test"
TOML
}

# The teacher check of each teacher alone and of both, on the test split, reranking the
# base model's top 100 (one run directory: the corpus is embedded once).
for t in bm25 bi-encoder both; do
  # `--teachers` reads a whole pipeline configuration; only its teachers are used here.
  printf 'run_dir = "%s/eval"\ncorpus = "%s/corpus.jsonl"\n[generate]\ngenerator = "extractive"\n[[retrievers]]\nmodel = "%s"\n' \
    "$out" "$data" "$model" >"$out/teachers-$t.toml"
  teachers "$t" >>"$out/teachers-$t.toml"
  if [ ! -f "$out/teachers-$t.json" ]; then
    echo "== teacher check: $t" >&2
    "$DISTILLERY" eval --model "$model" --dataset "$data" --split test --run-dir "$out/eval" \
      --teachers "$out/teachers-$t.toml" --json "$out/teachers-$t.json" --quiet \
      >"$out/teachers-$t.out"
  fi
done

# One labelled run per sample (every passage; the shared sample), then each variant in a
# copy of it: generation, mining and labelling are read back, training and evaluation run.
for sample in all shared; do
  passages=0; encoder=frozen
  [ "$sample" = shared ] && { passages=$shared_passages; encoder=shared; }
  labelled=$out/labelled-$sample
  config "$labelled" "$encoder" listwise_infonce "$passages" >"$out/labelled-$sample.toml"
  echo "== label: $sample" >&2
  /usr/bin/time -v "$DISTILLERY" label --config "$out/labelled-$sample.toml" \
    >"$out/labelled-$sample.out" 2>"$out/labelled-$sample.err" || {
    tail -n 30 "$out/labelled-$sample.err" >&2; exit 1; }
  for mode in infonce listwise listwise_infonce; do
    run=$out/$encoder-$mode
    if [ ! -f "$run/run-summary.json" ]; then
      rm -rf "$run"; mkdir -p "$run"
      (cd "$labelled" && tar --exclude=./train -cf - .) | (cd "$run" && tar -xf -)
      config "$run" "$encoder" "$mode" "$passages" >"$run.toml"
      echo "== run: $encoder $mode" >&2
      /usr/bin/time -v "$DISTILLERY" run --config "$run.toml" >"$run.out" 2>"$run.err" || {
        tail -n 30 "$run.err" >&2; exit 1; }
    fi
  done
done

python3 - "$out" "$name" <<'PY'
import json, os, sys
out, name = sys.argv[1], sys.argv[2]
f = lambda v: "n/a" if v is None else f"{v:.4f}"
row = lambda m: f"{f(m['ndcg_at_10'])} | {f(m['recall_at_100'])} | {f(m['mrr_at_10'])}"
print(f"### {name}\n")
print("| teacher check (test split) | nDCG@10 | Recall@100 | MRR@10 |\n|---|---|---|---|")
for t in ["bm25", "bi-encoder", "both"]:
    r = json.load(open(f"{out}/teachers-{t}.json"))
    if t == "bm25":
        print(f"| base MiniLM (retrieval) | {row(r)} |")
    print(f"| {t} reranking its top 100 | {row(r['teachers'])} |")
print()
print("| training | train queries | set | base nDCG@10 | fine-tuned nDCG@10 | Recall@100 | MRR@10 | train s | run s |")
print("|---|---|---|---|---|---|---|---|---|")
for enc in ["frozen", "shared"]:
    for mode in ["infonce", "listwise", "listwise_infonce"]:
        p = f"{out}/{enc}-{mode}/run-summary.json"
        if not os.path.exists(p):
            continue
        s = json.load(open(p))
        parts = {x["part"]: x["seconds"] for x in s["parts"]}
        q = s["train"]["report"]["train_queries"]
        for e in s["evaluations"]:
            print(f"| {enc} {mode} | {q} | {e['label']} ({e['queries']}) | "
                  f"{f(e['base']['ndcg_at_10'])} | {row(e['fine_tuned'])} | "
                  f"{parts.get('train', 0):.0f} | {sum(parts.values()):.0f} |")
PY
