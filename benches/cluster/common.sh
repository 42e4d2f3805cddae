# Sourced by the benches/cluster scripts after `set -euo pipefail`, with the script's
# arguments: CORPUS.jsonl MODEL_DIR [WORK_DIR]. Sets root, corpus, model, work (the
# default named by $default_work) and bin, and prints the CPU and the kernel path.
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
corpus=$(realpath "$1")
model=$(realpath "$2")
work=${3:-$default_work}
bin=${CARGO_TARGET_DIR:-$root/target}/release/distillery
"$bin" cpu | head -3

# one_and_two COMMAND: `distillery COMMAND --config pipeline.toml` in ./one as 1 process
# with 2 workers, then in ./two as 2 processes x 1 worker over localhost (the follower's
# output in two/follower.out and .err); the times before, between and after in t0 t1 t2.
one_and_two() {
  local command=$1 follower
  printf '127.0.0.1:2101\n127.0.0.1:2102\n' > two/hosts
  t0=$(date +%s.%N)
  (cd one && "$bin" "$command" --config pipeline.toml -w 2 --quiet > "$command.out")
  t1=$(date +%s.%N)
  (cd two && "$bin" "$command" --config pipeline.toml -w 1 -n 2 -p 1 --hostfile hosts \
    --quiet > follower.out 2> follower.err) &
  follower=$!
  (cd two && "$bin" "$command" --config pipeline.toml -w 1 -n 2 -p 0 --hostfile hosts \
    --quiet > "$command.out")
  wait $follower
  t2=$(date +%s.%N)
}
