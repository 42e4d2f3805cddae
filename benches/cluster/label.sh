#!/usr/bin/env bash
# `distillery label` (extractive queries, the model as retriever and bi-encoder teacher,
# BM25 teacher) on one process with 2 workers and 2 compute threads against 2 processes
# x 1 worker x 1 compute thread over localhost; checks that the candidates and examples
# stages are byte-equal and prints both wall times and what the follower ran.
#   usage: benches/cluster/label.sh CORPUS.jsonl MODEL_DIR [WORK_DIR]
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
corpus=$(realpath "$1")
model=$(realpath "$2")
work=${3:-/tmp/distillery-cluster-label}
bin=${CARGO_TARGET_DIR:-$root/target}/release/distillery
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
printf '127.0.0.1:2101\n127.0.0.1:2102\n' > two/hosts
t0=$(date +%s.%N)
(cd one && "$bin" label --config pipeline.toml -w 2 --quiet > label.out)
t1=$(date +%s.%N)
(cd two && "$bin" label --config pipeline.toml -w 1 -n 2 -p 1 --hostfile hosts --quiet \
  > follower.out 2> follower.err) &
follower=$!
(cd two && "$bin" label --config pipeline.toml -w 1 -n 2 -p 0 --hostfile hosts --quiet > label.out)
wait $follower
t2=$(date +%s.%N)
for stage in candidates examples; do
  if diff -rq one/run/stages/$stage two/run/stages/$stage > /dev/null; then
    echo "stage $stage: byte-equal"
  else
    echo "stage $stage: DIFFERS"
  fi
done
tail -1 two/follower.out
python3 -c "import sys; t0, t1, t2 = map(float, sys.argv[1:]); print(f'1 process x 2 workers: {t1 - t0:.1f} s; 2 processes x 1 worker: {t2 - t1:.1f} s')" "$t0" "$t1" "$t2"
