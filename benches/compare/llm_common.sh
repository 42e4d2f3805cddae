# The preamble llm_throughput.sh and llm_recipe_shape.sh share; sourced, not run. The
# caller sets root, py, threads, quants, model_dir and work, and defines die().

# Makes the model files (make_llm_bench_model.py) when any of them is missing: the
# GGUF file of each quantization in $quants, tokenizer.json and prompts.json.
llm_make_models() {
  local missing=0 f q
  for f in prompts.json tokenizer.json; do [ -f "$model_dir/$f" ] || missing=1; done
  for q in $quants; do [ -f "$model_dir/model-$q.gguf" ] || missing=1; done
  [ "$missing" -eq 1 ] || return 0
  echo "making the model files in $model_dir (a few minutes) ..." >&2
  (cd "$root" && OMP_NUM_THREADS=$threads "$py" benches/compare/make_llm_bench_model.py "$model_dir") \
    >"$work/make_model.log" 2>&1 \
    || { tail -n 20 "$work/make_model.log" >&2; die "make_llm_bench_model.py failed"; }
}

# Builds benches/llm_generate.rs (cargo bench --no-run) and sets $bin to its executable.
llm_build_bench() {
  echo "building benches/llm_generate.rs (cargo bench --no-run) ..." >&2
  (cd "$root" && cargo bench -p distillery --bench llm_generate --no-run --message-format=json) \
    >"$work/build.json" 2>"$work/build.log" \
    || { tail -n 30 "$work/build.log" >&2; die "cargo build of the bench failed (log above)"; }
  bin=$("$py" -c '
import json, sys
for line in open(sys.argv[1]):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == "llm_generate" \
            and m.get("executable"):
        print(m["executable"])
' "$work/build.json" | tail -n 1)
  [ -n "$bin" ] && [ -x "$bin" ] || die "no llm_generate executable in cargo's output ($work/build.json)"
}

# Sets $cpu (model name and the vector extensions both sides' kernels pick from),
# $git_rev and $load_before, prints them, then builds the distillery binary and prints
# `distillery cpu` (the path its hand-written kernels take; DISTILLERY_CPU forces one).
llm_describe_machine() {
  cpu=$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -n 1)
  [ -n "$cpu" ] || cpu=$(uname -m)
  local isa
  isa=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | tr ' ' '\n' \
    | grep -x -E 'avx2|avx512f|avx512_vnni|avx512_bf16|amx_int8' | tr '\n' ' ' | sed 's/ $//' || true)
  [ -n "$isa" ] && cpu="$cpu [$isa]"
  git_rev=$(git -C "$root" describe --always --dirty 2>/dev/null || echo unknown)
  load_before=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo unknown)
  echo "date $(date -u +%Y-%m-%dT%H:%M:%SZ)  nproc $(nproc)  cpu: $cpu  load: $load_before  git $git_rev" >&2
  local target=${CARGO_TARGET_DIR:-$root/target}
  (cd "$root" && cargo build --release -p distillery --bin distillery) >>"$work/build.log" 2>&1 \
    || { tail -n 30 "$work/build.log" >&2; die "cargo build of distillery failed (log above)"; }
  if "$target/release/distillery" cpu --help >/dev/null 2>&1; then
    "$target/release/distillery" cpu >&2 \
      || die "'$target/release/distillery cpu' failed: DISTILLERY_CPU refused (message above)"
  else
    echo "($target/release/distillery has no 'cpu' command: CPU path not reported)" >&2
  fi
}
