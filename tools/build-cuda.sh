#!/usr/bin/env bash
# Builds distillery with --features cuda on a machine with no CUDA toolkit and no GPU.
#
# NVIDIA publishes its compiler, headers and libraries as Python wheels on PyPI; this
# script installs the ones candle's CUDA backend needs into a cache directory, arranges
# them the way a toolkit install is laid out, and builds the release binary against them.
# Nothing is installed outside the cache directory; rerunning reuses it.
#
#   usage: tools/build-cuda.sh [--carry] [extra cargo build arguments]
#          --carry also builds the GPU test binary (operators/tests/gpu.rs) and packs both
#          binaries, xz-compressed, into gpu-carry/ (ignored by git): what
#          tools/gpu-check.sh runs on a GPU machine that has no Rust toolchain.
#   env:   DISTILLERY_CUDA_CACHE   where the toolkit goes (default ~/.cache/distillery-cuda)
#          CUDA_COMPUTE_CAP        the GPU generation the kernels are compiled for
#                                  (default 90: H100/H200; 80 for A100, 89 for L4/L40)
#          CARGO_TARGET_DIR        default target-cuda/ in the repository, apart from the
#                                  CPU build's target/ so neither rebuilds the other
#
# The binary links the CUDA libraries by soname (libcudart.so.13, libcublas.so.13,
# libcublasLt.so.13, libcurand.so.10, libnvrtc.so.13) and the driver (libcuda.so.1). A GPU
# machine with CUDA 13 has them: PyTorch's wheels ship the same nvidia-* packages, so
# LD_LIBRARY_PATH=<its site-packages>/nvidia/cu13/lib finds them there.
#
# Why each piece:
#  - CUDA 13.0: the version the GPU machines' driver (580) and PyTorch wheels carry; a
#    binary built against a newer runtime than the driver supports would not start.
#  - libcuda.so: the driver library exists only where a GPU driver is installed; the
#    toolkit ships a link-time stub for it, which no wheel carries, so the script makes
#    one from the driver functions cudarc (candle's CUDA binding) declares. The stub is
#    used at link time only; at run time the loader finds the real libcuda.so.1.
#  - CUDA_COMPUTE_CAP: candle's kernel build asks nvidia-smi for the GPU, and there is none.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
carry=0
if [ "${1:-}" = "--carry" ]; then carry=1; shift; fi
cache=${DISTILLERY_CUDA_CACHE:-$HOME/.cache/distillery-cuda}
cuda_series=13.0
packages=(
  "nvidia-cuda-nvcc==$cuda_series.*"     # nvcc, ptxas, fatbinary
  "nvidia-cuda-crt==$cuda_series.*"      # nvcc's device runtime headers
  "nvidia-nvvm==$cuda_series.*"          # cicc, libnvvm: nvcc's device compiler
  "nvidia-cuda-runtime==$cuda_series.*"  # cuda.h, cuda_runtime.h, libcudart
  "nvidia-cuda-cccl==$cuda_series.*"     # libcu++ headers (nv/target) cuda_fp16.h includes
  "nvidia-cuda-nvrtc==$cuda_series.*"    # libnvrtc: candle compiles some kernels at run time
  "nvidia-cublas==$cuda_series.*"        # libcublas, libcublasLt: matrix products
  "nvidia-curand==10.4.0.*"              # libcurand (CUDA 13.0's release of it)
)

say() { echo "build-cuda: $*" >&2; }

venv=$cache/venv
if [ ! -x "$venv/bin/python" ]; then
  say "creating $venv"
  python3 -m venv "$venv"
fi
# The stamp holds the package list it was installed from: a changed list reinstalls.
stamp=$cache/installed
if [ "$(cat "$stamp" 2>/dev/null)" != "${packages[*]}" ]; then
  say "installing CUDA $cuda_series from PyPI (about 1.2 GB, once)"
  "$venv/bin/pip" install -q --disable-pip-version-check "${packages[@]}"
  echo "${packages[*]}" > "$stamp"
fi
wheel_root=$(ls -d "$venv"/lib/python3*/site-packages/nvidia/cu13 | head -n 1)
[ -x "$wheel_root/bin/nvcc" ] || { say "no nvcc under $wheel_root"; exit 1; }

# A toolkit-shaped folder: bin/, include/, nvvm/ from the wheels; lib/ with the unversioned
# names the linker looks for, and lib/stubs/libcuda.so.
toolkit=$cache/toolkit
mkdir -p "$toolkit/lib/stubs"
for dir in bin include nvvm; do ln -sfn "$wheel_root/$dir" "$toolkit/$dir"; done
for lib in "$wheel_root"/lib/*; do
  name=$(basename "$lib")
  ln -sfn "$lib" "$toolkit/lib/$name"
  case $name in
    *.so.*) ln -sfn "$lib" "$toolkit/lib/${name%%.so.*}.so" ;;
  esac
done

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target-cuda}
stub=$toolkit/lib/stubs/libcuda.so
if [ ! -f "$stub" ]; then
  cudarc_src=$(cd "$root" && cargo metadata --format-version 1 --features cuda |
    python3 -c 'import json,sys,os; m=json.load(sys.stdin); print(next(os.path.dirname(p["manifest_path"]) for p in m["packages"] if p["name"]=="cudarc"))')
  say "making the link-time libcuda.so stub from $cudarc_src"
  # Every driver function cudarc links against: `fn cuName(` inside its extern blocks.
  grep -ohE '^[[:space:]]+fn cu[A-Za-z0-9_]+\(' "$cudarc_src/src/driver/sys/mod.rs" |
    sed -E 's/^[[:space:]]+fn (cu[A-Za-z0-9_]+)\(/void \1(void) {}/' | sort -u > "$toolkit/lib/stubs/libcuda.c"
  [ -s "$toolkit/lib/stubs/libcuda.c" ] || { say "found no driver functions in cudarc"; exit 1; }
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub" "$toolkit/lib/stubs/libcuda.c"
fi

export CUDA_HOME=$toolkit
export PATH=$toolkit/bin:$PATH
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
say "cargo build --release --features cuda (kernels for sm_$CUDA_COMPUTE_CAP, target $CARGO_TARGET_DIR)"
start=$(date +%s)
(cd "$root" && cargo build --release --features cuda --bin distillery "$@")
say "built $CARGO_TARGET_DIR/release/distillery in $(( $(date +%s) - start )) s"
say "at run time: LD_LIBRARY_PATH=$wheel_root/lib (or the nvidia/cu13/lib of the GPU machine's PyTorch)"

if [ "$carry" = 1 ]; then
  say "building the GPU test binary"
  test_bin=$(cd "$root" && cargo test --release --features cuda -p distillery-operators --test gpu \
    --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "gpu":
        print(m["executable"])' | tail -n 1)
  [ -n "$test_bin" ] || { say "no GPU test binary was built"; exit 1; }
  mkdir -p "$root/gpu-carry"
  xz -T2 -c "$CARGO_TARGET_DIR/release/distillery" > "$root/gpu-carry/distillery.xz"
  xz -T2 -c "$test_bin" > "$root/gpu-carry/gpu-test.xz"
  say "packed: $(du -sh "$root/gpu-carry" | cut -f1) in gpu-carry/ (carry it with tools/gpu-check.sh)"
fi
