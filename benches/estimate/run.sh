#!/usr/bin/env bash
# How close `distillery bench` comes to a measured run: the recipe (extractive queries,
# all-MiniLM-L6-v2 as retriever, bi-encoder and BM25 teachers, one epoch) on the first
# PASSAGES passages of SciFact, run whole, then estimated by `bench` from samples of
# SAMPLES passages. Run alone on the machine: it times things.
#   usage: benches/estimate/run.sh WORKDIR [PASSAGES=1000] [SAMPLES="200 100"]
#   env:   SCIFACT (default ../shared/datasets/scifact), MINILM (default: tools/fetch-minilm.sh)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
work=$1
passages=${2:-1000}
samples=${3:-"200 100"}
scifact=${SCIFACT:-$root/../shared/datasets/scifact}
minilm=${MINILM:-$("$root/tools/fetch-minilm.sh")}
bin=${CARGO_TARGET_DIR:-$root/target}/release/distillery
[ -x "$bin" ] || (cd "$root" && cargo build --release --bin distillery)
mkdir -p "$work" && cd "$work"
head -n "$passages" "$scifact/corpus.jsonl" > corpus.jsonl
cat > recipe.toml <<TOML
run_dir = "run"
corpus = "corpus.jsonl"
[held_out]
count = 100
[generate]
generator = "extractive"
[[retrievers]]
model = "$minilm"
[[teachers]]
kind = "bi-encoder"
model = "$minilm"
[[teachers]]
kind = "bm25"
[student]
model = "$minilm"
query_max_length = 64
passage_max_length = 128
[train]
micro_batch = 16
accumulation = 4
max_epochs = 1
list_len = 8
[train.optimizer]
lr = 1e-5
[train.loss]
teacher_temperature = 0.05
TOML
grep -m1 'model name' /proc/cpuinfo
rm -rf run
"$bin" run --config recipe.toml --quiet > run.out 2>&1
for s in $samples; do
  "$bin" bench --config recipe.toml --sample "$s" --quiet --json "bench-$s.json" > "bench-$s.out"
done
python3 - "$samples" <<'PY'
import json, sys
run = json.load(open("run/run-summary.json"))
measured = {p["part"]: p["seconds"] for p in run["parts"]}
print(f"measured run: {run['seconds']:.1f} s")
for s in sys.argv[1].split():
    b = json.load(open(f"bench-{s}.json"))
    print(f"sample {s}: sample run {b['sample_seconds']:.1f} s, estimate {b['estimated_seconds']:.1f} s "
          f"({100 * (b['estimated_seconds'] / run['seconds'] - 1):+.1f}%)")
    for p in b["parts"]:
        print(f"  {p['part']:<15} estimate {p['estimated_seconds']:8.1f} s   measured {measured[p['part']]:8.1f} s")
PY
