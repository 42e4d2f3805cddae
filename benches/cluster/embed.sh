#!/usr/bin/env bash
# `distillery embed` on one process with 2 worker threads against 2 processes x 1 worker
# over localhost (timely's cluster), each process with as many compute threads as its
# share of the cores; checks that the outputs are byte-equal and prints the wall times
# and the bytes a follower exchanges per passage.
#   usage: benches/cluster/embed.sh CORPUS.jsonl MODEL_DIR [WORK_DIR]
set -euo pipefail
default_work=/tmp/distillery-cluster-bench
source "$(dirname "$0")/common.sh"
rm -rf "$work" && mkdir -p "$work" && cd "$work"
embed() { "$bin" embed --model "$model" --input "$corpus" --quiet "$@"; }
t0=$(date +%s.%N)
embed --output one.parquet -w 2 --threads 2 > one.out
t1=$(date +%s.%N)
printf '127.0.0.1:2101\n127.0.0.1:2102\n' > hosts
embed --output two.parquet -w 1 --threads 1 -n 2 -p 1 --hostfile hosts > follower.out &
follower=$!
embed --output two.parquet -w 1 --threads 1 -n 2 -p 0 --hostfile hosts > leader.out
wait $follower
t2=$(date +%s.%N)
cmp one.parquet two.parquet && echo "outputs byte-equal"
cat one.out follower.out
python3 - "$corpus" "$t0" "$t1" "$t2" "$(python3 -c 'import json,sys;print(json.load(open(sys.argv[1]))["hidden_size"])' "$model/config.json")" <<'PY'
import json, sys
corpus, t0, t1, t2, dim = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
n = text = ids = 0
for line in open(corpus):
    r = json.loads(line)
    n += 1
    ids += len(r["_id"].encode())
    text += len((r.get("title", "") + " " + r["text"]).encode())
# What travels per passage sent to another process: (position u64, id, text) out,
# (position u64, id, dim f32) back, each string and vector with an 8-byte length.
out = 8 + 8 + ids / n + 8 + text / n
back = 8 + 8 + ids / n + 8 + 4 * dim
print(f"1 process x 2 workers: {t1 - t0:.1f} s; 2 processes x 1 worker: {t2 - t1:.1f} s")
print(f"{n} passages; per passage sent to a follower: {out:.0f} B out, {back:.0f} B back")
PY
