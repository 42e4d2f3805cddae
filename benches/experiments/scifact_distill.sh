#!/usr/bin/env bash
# The issue's real-data experiment: all-MiniLM-L6-v2 fine-tuned on SciFact's human train
# queries, base vs `infonce` vs `listwise+infonce`, SciFact test nDCG@10.
#
# Teacher: no cross-encoder can be downloaded on this machine (no internet; no PyPI
# package carries one), so the teacher is what can run here: a hybrid of the base
# model's own cosine (`bi-encoder` teacher, all-MiniLM-L6-v2) and BM25 (`bm25` teacher,
# Anserini's k1 0.9 / b 0.4), each calibrated by percentiles and averaged with weight 1
# (the recipe's multi-teacher combination). On SciFact BM25 and MiniLM are about equally
# good and their hybrid better than either, so the teacher knows something the student
# does not; but it is much weaker than the recipe's cross-encoders.
#
# Cost cuts against the recipe (2 CPU cores): passages of at most 256 tokens (MiniLM's
# own max_seq_length), lists of 8 passages, 16 queries a step (no accumulation: the
# teacher funnel keeps about 330 training queries, 21 steps an epoch), two epochs
# (warm-up 10 steps, then linear decay to 10%). Everything else is the recipe's.
#
# usage: benches/experiments/scifact_distill.sh [--out DIR] [--epochs N]
# Environment: DISTILLERY (the binary; default: cargo build --release), DISTILLERY_MINILM_DIR
# (default /work/shared/models/all-MiniLM-L6-v2), SCIFACT_DIR (default
# /work/shared/datasets/scifact).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
out=$root/runs/scifact-distill
epochs=2
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out=${2:?--out needs a directory}; shift 2 ;;
    --epochs) epochs=${2:?--epochs needs a number}; shift 2 ;;
    -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "scifact_distill: unknown argument $1" >&2; exit 1 ;;
  esac
done
model=${DISTILLERY_MINILM_DIR:-/work/shared/models/all-MiniLM-L6-v2}
data=${SCIFACT_DIR:-/work/shared/datasets/scifact}
[ -f "$model/config.json" ] || { echo "scifact_distill: no model at $model" >&2; exit 1; }
[ -f "$data/corpus.jsonl" ] || { echo "scifact_distill: no SciFact at $data" >&2; exit 1; }
if [ -z "${DISTILLERY:-}" ]; then
  (cd "$root" && cargo build --release --bin distillery >&2)
  DISTILLERY=${CARGO_TARGET_DIR:-$root/target}/release/distillery
fi
mkdir -p "$out"

config() {  # $1 = run dir, $2 = loss mode
  cat <<TOML
run_dir = "$1"
corpus = "$data/corpus.jsonl"

[queries]
path = "$data/queries.jsonl"
qrels = "$data/qrels/train.tsv"

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
accumulation = 1
max_epochs = $epochs
list_len = 8

[train.loss]
mode = "$2"
TOML
}

# Mine and label once; each mode trains in its own copy of the labelled run.
config "$out/listwise_infonce" listwise_infonce >"$out/listwise_infonce.toml"
config "$out/infonce" infonce >"$out/infonce.toml"
echo "== label (mine, bi-encoder + bm25 teachers)" >&2
"$DISTILLERY" label --config "$out/listwise_infonce.toml"
if [ ! -d "$out/infonce" ]; then
  mkdir -p "$out/infonce"
  (cd "$out/listwise_infonce" && tar --exclude=./train -cf - .) | (cd "$out/infonce" && tar -xf -)
fi
for mode in listwise_infonce infonce; do
  echo "== train $mode" >&2
  /usr/bin/time -v "$DISTILLERY" train --config "$out/$mode.toml" 2>"$out/$mode.time" || {
    tail -n 40 "$out/$mode.time" >&2; exit 1; }
done
for name in base listwise_infonce infonce; do
  case "$name" in
    base) m=$model ;;
    *) m=$out/$name/train/best-model ;;
  esac
  echo "== eval $name" >&2
  "$DISTILLERY" eval --model "$m" --dataset "$data" --split test --run-dir "$out/eval-$name" \
    --json "$out/eval-$name.json"
done
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
for name in ["base", "listwise_infonce", "infonce"]:
    with open(f"{out}/eval-{name}.json") as f:
        r = json.load(f)
    print(name, json.dumps(r.get("metrics", r)))
PY
