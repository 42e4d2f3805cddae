#!/usr/bin/env bash
# An incremental rerun against a run from scratch, side by side: in WORK_DIR (which holds
# corpus-orig.jsonl and a pipeline.toml reading corpus.jsonl into run_dir "run"), runs
# COMMAND (default `mine`) on the original corpus, changes FRACTION of it with
# edit_corpus.py, runs COMMAND again in the same run directory (the rerun), then from
# scratch on the changed corpus in run-scratch/, and compares every stage both wrote.
# Prints wall time and peak RSS of each run, and what retrieval repaired.
#   usage: benches/incremental/rerun.sh WORK_DIR FRACTION [COMMAND]
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
work=$1
fraction=$2
command=${3:-mine}
bin=${CARGO_TARGET_DIR:-$root/target}/release/distillery
cd "$work"
"$bin" cpu | sed -n '1,5p'
python3 "$root/benches/incremental/edit_corpus.py" corpus-orig.jsonl corpus-edited.jsonl "$fraction"
timed() { # label, config
  /usr/bin/time -f "%e %M" -o "$1.time" "$bin" "$command" --config "$2" --quiet > "$1.out" 2> "$1.err" \
    || { cat "$1.err"; exit 1; }
  read -r wall kb < "$1.time"
  printf '%-8s %8.1f s  peak RSS %.2f GB\n' "$1" "$wall" "$(echo "$kb / 1048576" | bc -l)"
}
rm -rf run run-scratch
cp corpus-orig.jsonl corpus.jsonl
timed full pipeline.toml
journal=$(wc -l < run/device-stages.jsonl)
cp corpus-edited.jsonl corpus.jsonl
timed rerun pipeline.toml
# What the rerun ran on the device and took from the memo tables, and what retrieval did.
python3 - "$journal" <<'PY'
import json, sys
for line in open("run/device-stages.jsonl").readlines()[int(sys.argv[1]):]:
    r = json.loads(line)
    print(f"  {r['label']}: {r['rows']} run, {r.get('memoised', 0)} from the memo")
PY
grep -E "^r[0-9]+-retrieved" rerun.out | sed 's/^/  /' || true
sed 's/^run_dir = "run"/run_dir = "run-scratch"/' pipeline.toml > pipeline-scratch.toml
timed scratch pipeline-scratch.toml
# Every stage the scratch run wrote must hold the same bytes in the rerun's directory
# (memo tables, teacher score caches and the generated-query cache aside: they keep
# every text, pair and query ever computed, by design).
status=0
for stage in run-scratch/stages/*/; do
  name=$(basename "$stage")
  case $name in memo-* | teacher-*-cache | queries-*-cache) continue ;; esac
  if ! diff -rq "$stage" "run/stages/$name" > /dev/null; then
    echo "DIFFERS: $name"; status=1
  fi
done
[ $status = 0 ] && echo "every stage of the rerun equals the run from scratch"
exit $status
