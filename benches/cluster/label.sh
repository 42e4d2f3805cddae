#!/usr/bin/env bash
# `distillery label` (extractive queries, the model as retriever and bi-encoder teacher,
# BM25 teacher) on one process with 2 workers and 2 compute threads against 2 processes
# x 1 worker x 1 compute thread over localhost; checks that the candidates and examples
# stages are byte-equal and prints both wall times and what the follower ran.
#   usage: benches/cluster/label.sh CORPUS.jsonl MODEL_DIR [WORK_DIR]
set -euo pipefail
default_work=/tmp/distillery-cluster-label
source "$(dirname "$0")/common.sh"
rm -rf "$work" && mkdir -p "$work/one" "$work/two" && cd "$work"
for v in one two; do
  threads=$([ $v = one ] && echo 2 || echo 1)
  cat > $v/pipeline.toml <<TOML
run_dir = "run"
corpus = "$corpus"
[generate]
generator = "extractive"
[[retrievers]]
model = "$model"
[[teachers]]
kind = "bm25"
[[teachers]]
kind = "bi-encoder"
model = "$model"
[engine]
threads = $threads
TOML
done
one_and_two label
for stage in candidates examples; do
  if diff -rq one/run/stages/$stage two/run/stages/$stage > /dev/null; then
    echo "stage $stage: byte-equal"
  else
    echo "stage $stage: DIFFERS"
  fi
done
tail -1 two/follower.out
python3 -c "import sys; t0, t1, t2 = map(float, sys.argv[1:]); print(f'1 process x 2 workers: {t1 - t0:.1f} s; 2 processes x 1 worker: {t2 - t1:.1f} s')" "$t0" "$t1" "$t2"
