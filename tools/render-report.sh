#!/usr/bin/env bash
# Renders a run's report.html to a PNG with headless Chromium (Debian's `chromium`).
#   usage: tools/render-report.sh RUN_DIR/report.html OUT.png [WIDTHxHEIGHT]
set -euo pipefail
report=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
out=$2
size=${3:-1100x2500}
command -v chromium >/dev/null || { echo "render-report: no chromium (apt-get install chromium)" >&2; exit 1; }
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars \
  --user-data-dir="$profile" --window-size="${size/x/,}" \
  --screenshot="$out" "file://$report" 2>/dev/null
echo "$out"
