#!/usr/bin/env bash
# `distillery train`'s steps on one process with 2 workers and 2 compute threads against
# 2 processes x 1 worker x 1 compute thread over localhost (data-parallel training: each
# step's micro-batches shared, the gradients summed in a fixed tree). Both train on the
# same examples (labelled once, before the clock starts); checks that the two exported
# models are byte-equal and prints both wall times, the seconds per step and the bytes a
# step exchanges.
#   usage: benches/cluster/train.sh CORPUS.jsonl MODEL_DIR [WORK_DIR]
# The training settings (below) are small so the benchmark takes minutes on 2 cores:
# 4 micro-batches of 8 queries a step, lists of 8 passages, one epoch.
set -euo pipefail
default_work=/tmp/distillery-cluster-train
source "$(dirname "$0")/common.sh"
rm -rf "$work" && mkdir -p "$work/base" && cd "$work"
config() {
  cat <<TOML
run_dir = "run"
corpus = "$corpus"
[generate]
generator = "extractive"
[[retrievers]]
model = "$model"
[[teachers]]
kind = "bm25"
[student]
model = "$model"
[train]
micro_batch = 8
accumulation = 4
list_len = 8
max_epochs = 1
[engine]
threads = $1
TOML
}
config 2 > base/pipeline.toml
(cd base && "$bin" label --config pipeline.toml -w 2 --quiet > label.out)
for v in one two; do
  cp -r base $v
  config $([ $v = one ] && echo 2 || echo 1) > $v/pipeline.toml
done
one_and_two train
if diff -r one/run/train/best-model two/run/train/best-model > /dev/null; then
  echo "exported models: byte-equal"
else
  echo "exported models: DIFFER"
fi
tail -1 two/follower.out
python3 - "$t0" "$t1" "$t2" one/run/train/loss-log.csv "$model/model.safetensors" <<'PY'
import os, sys
t0, t1, t2 = map(float, sys.argv[1:4])
steps = sum(1 for _ in open(sys.argv[4])) - 1
weights = os.path.getsize(sys.argv[5])
print(f"{steps} steps of 32 queries (and one dev loss)")
print(f"1 process x 2 workers x 2 threads: {t1 - t0:.1f} s ({(t1 - t0) / steps:.2f} s a step, all included)")
print(f"2 processes x 1 worker x 1 thread: {t2 - t1:.1f} s ({(t2 - t1) / steps:.2f} s a step, all included)")
print(f"exchanged per step with the other process: ~{weights / 1e6:.0f} MB of weights to it, "
      f"~{weights / 1e6:.0f} MB of gradients back (one tree node), plus its rows' token ids, "
      "embeddings and embedding gradients")
PY
