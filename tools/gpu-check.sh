#!/usr/bin/env bash
# Runs on a GPU machine (no Rust toolchain needed) what tools/build-cuda.sh --carry
# packed into gpu-carry/: doctor, the GPU-against-CPU tests, and bench on the demo on the
# GPU and on the CPU, side by side. Prints everything; writes the bench JSON to $OUT (or
# gpu-out/) when set.
#   usage: tools/gpu-check.sh [device, default cuda:0]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
device=${1:-cuda:0}
out=${OUT:-$root/gpu-out}
mkdir -p "$out" /tmp/distillery-gpu
cd /tmp/distillery-gpu
xz -dc "$root/gpu-carry/distillery.xz" > distillery && chmod +x distillery
xz -dc "$root/gpu-carry/gpu-test.xz" > gpu-test && chmod +x gpu-test
# The CUDA 13 libraries of the machine's Python packages (PyTorch ships them).
libs=$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' 2>/dev/null || true)
[ -d "$libs" ] && export LD_LIBRARY_PATH=$libs:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
./distillery doctor --device "$device"
# The tests find the fixtures of this checkout through DISTILLERY_REPO (the binary was
# built in another).
(cd "$root/operators" && DISTILLERY_REPO=$root DISTILLERY_MINILM_DIR=${DISTILLERY_MINILM_DIR:-$root/models/all-MiniLM-L6-v2} \
  /tmp/distillery-gpu/gpu-test --nocapture --test-threads 1)
for d in "$device" cpu; do
  ./distillery bench --sample 100 --device "$d" --quiet --json "$out/bench-${d/:/}.json" --run-dir "bench-$d"
done
