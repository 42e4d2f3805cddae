#!/usr/bin/env bash
# The engine at scale with a tiny model: generation (extractive), embedding and exact
# retrieval (`distillery mine`) over a synthetic corpus of N passages; prints the
# passages/s of the passage embedding stage, the wall time and the peak RSS.
#   usage: benches/scale/run.sh N [WORK_DIR]
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
n=$1
work=${2:-/tmp/distillery-scale-$n}
bin=${CARGO_TARGET_DIR:-$root/target}/release/distillery
mkdir -p "$work"
cd "$work"
[ -f corpus.jsonl ] || python3 "$root/benches/scale/make_corpus.py" "$n" corpus.jsonl
# A tiny random model, its tokenizer trained on the first passages (as `embed` builds it
# when no real model is found).
if [ ! -f model/model.safetensors ]; then
  head -2000 corpus.jsonl > sample.jsonl
  env -u DISTILLERY_MODEL HF_HUB_CACHE="$work/no-hub" "$bin" embed --input sample.jsonl \
    --output sample.parquet --run-dir tiny-run --quiet >/dev/null 2>&1
  cp -r tiny-run/tiny-model model
fi
cat > pipeline.toml <<TOML
run_dir = "run"
corpus = "corpus.jsonl"
[generate]
generator = "extractive"
[[retrievers]]
model = "model"
TOML
rm -rf run
/usr/bin/time -v "$bin" mine --config pipeline.toml --quiet > mine.out 2> time.txt
grep -E "Elapsed|Maximum resident" time.txt
python3 - <<'PY'
import json
for line in open("run/device-stages.jsonl"):
    r = json.loads(line)
    if not r["seconds"]:
        print(f'{r["label"]}: all {r.get("memoised", 0)} items from the memo table')
        continue
    busy = r["busy_seconds"] / r["seconds"]
    print(f'{r["label"]}: {r["rows"]} items in {r["seconds"]:.1f} s = '
          f'{r["rows"] / r["seconds"]:.0f}/s, device busy {100 * busy:.0f}%')
PY
cat mine.out
