#!/usr/bin/env bash
# The recipe end to end on a whole BEIR corpus with query-tower training: synthetic
# queries for every passage, hard negatives from all-MiniLM-L6-v2, the teachers this
# machine can run (MiniLM's own cosine + BM25, calibrated and combined), and MiniLM
# fine-tuned with its passage encoder frozen ([train] passage_encoder = "frozen"), so the
# corpus index is never re-embedded; base, fine-tuned and teachers on the dataset's test
# queries and on the synthetic test set (the 100 held-out passages' queries).
#
# Cost cuts against the recipe (2 CPU cores): extractive queries (no LLM weights here),
# lists of 8, 64 queries a step, teacher temperature 0.05 (these teachers' lists are
# flat at the recipe's 0.3: BENCHMARKS.md, the demo), lr 1e-5.
#
# usage: benches/experiments/query_tower.sh DATASET_DIR [--out DIR] [--epochs N]
#        [--encoder frozen|shared]
# Environment: DISTILLERY (the binary; default: cargo build --release),
# DISTILLERY_MINILM_DIR (default /work/shared/models/all-MiniLM-L6-v2).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
data=${1:?usage: query_tower.sh DATASET_DIR [--out DIR] [--epochs N] [--encoder frozen|shared]}
shift
name=$(basename "$data")
out=$root/runs/query-tower-$name
epochs=3
encoder=frozen
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out=${2:?--out needs a directory}; shift 2 ;;
    --epochs) epochs=${2:?--epochs needs a number}; shift 2 ;;
    --encoder) encoder=${2:?--encoder needs frozen or shared}; shift 2 ;;
    -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "query_tower: unknown argument $1" >&2; exit 1 ;;
  esac
done
model=${DISTILLERY_MINILM_DIR:-/work/shared/models/all-MiniLM-L6-v2}
[ -f "$model/config.json" ] || { echo "query_tower: no model at $model" >&2; exit 1; }
[ -f "$data/corpus.jsonl" ] || { echo "query_tower: no corpus.jsonl in $data" >&2; exit 1; }
if [ -z "${DISTILLERY:-}" ]; then
  (cd "$root" && cargo build --release --bin distillery >&2)
  DISTILLERY=${CARGO_TARGET_DIR:-$root/target}/release/distillery
fi
mkdir -p "$out"
cat >"$out/pipeline.toml" <<TOML
run_dir = "$out/run"
corpus = "$data/corpus.jsonl"

[held_out]
count = 100

[generate]
generator = "extractive"

[[retrievers]]
model = "$model"

[[teachers]]
kind = "bi-encoder"
model = "$model"
[[teachers]]
kind = "bm25"

[student]
model = "$model"
query_max_length = 64
passage_max_length = 256

[train]
micro_batch = 16
accumulation = 4
max_epochs = $epochs
list_len = 8
passage_encoder = "$encoder"
[train.optimizer]
lr = 1e-5
[train.loss]
teacher_temperature = 0.05

[eval]
dataset = "$data"
split = "test"
TOML
/usr/bin/time -v "$DISTILLERY" run --config "$out/pipeline.toml" >"$out/run.out" 2>"$out/run.err" || {
  tail -n 40 "$out/run.err" >&2; exit 1; }
cat "$out/run.out"
grep -E "Elapsed|Maximum resident" "$out/run.err"
python3 - "$out/run/run-summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
print("parts:", ", ".join(f"{p['part']} {p['seconds']:.1f} s" for p in s["parts"]))
print("train:", json.dumps({k: s["train"][k] for k in ("frozen_passages",) if k in s["train"]}),
      "steps", s["train"]["report"]["state"]["global_step"],
      "dev losses", s["train"]["report"]["dev_losses"])
PY
