#!/usr/bin/env python3
"""The llama.cpp half of llm_throughput.sh and llm_recipe_shape.sh: generation from fixed
token-id prompts with llama-cpp-python's low-level bindings (llama.cpp's C API), timed.

Work, the same as benches/llm_generate.rs does with distillery's candle generator: every
prompt of prompts.json (token ids, written by make_llm_bench_model.py) is continued by
exactly --new-tokens tokens, greedily (argmax, llama.cpp's greedy sampler), end-of-turn
tokens included like any other (nothing stops early).

Modes:
  single   one prompt at a time: clear the KV cache, decode the prompt in one llama_batch
           (prefill), sample, then one token per llama_decode.
  batched  all prompts together: one llama_batch holding every prompt, each its own
           sequence id (prefill), then one llama_batch per step with one token of every
           sequence (decode), as a server's continuous batching does. With --rows R, the
           prompts sorted by length (ties in file order) run in groups of R, one after
           another, as distillery's generator groups them.
Sampling: greedy (argmax) by default; --temperature T samples at T (llama.cpp's temp
then dist samplers, seed 0). Either way every prompt gets exactly --new-tokens tokens.
Prefill is timed from the first llama_decode to the first sampled token of every
sequence; decode is the remaining new tokens. Model loading, context creation and one
warm-up generation are not timed.

Threads: n_threads and n_threads_batch both --threads.

Weight layouts (--bufts): llama.cpp by default (`auto`) moves the matrices it can into
its "extra" CPU buffer types, AMX first, then CPU_REPACK (interleaved layouts with their
own kernels). These machines report AMX, but ggml's AMX path segfaults in
ggml_backend_amx_mul_mat on the first llama_decode, so `auto` crashes here. The default,
`noamx`, refuses this process the AMX permission (a seccomp filter on the one
arch_prctl request ggml makes, as a kernel without AMX support would): llama.cpp then
makes its own choice among the remaining layouts (here: Q4_K matrices repacked to
q4_K_8x8, Q8_0 / Q5_0 / Q6_K left in the plain layout). `cpu` turns the extra buffer
types off altogether.

Prints one JSON object per mode (also written to --json OUT as a list).
"""

import argparse
import ctypes
import json
import os
import sys
import time

# llama_cpp, imported by main() once the AMX filter (if any) is in place.
L = None



# arch_prctl(2) and its ARCH_REQ_XCOMP_PERM request (asm/prctl.h), with which a process
# asks the kernel for the AMX tile state; ggml asks once, when it sets up its AMX buffer
# type, and leaves AMX alone ("AMX is not ready to be used!") when refused.
SYS_ARCH_PRCTL = 158
ARCH_REQ_XCOMP_PERM = 0x1023
# libseccomp's constants (seccomp.h).
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_ACT_ERRNO_EPERM = 0x00050000 | 1
SCMP_CMP_EQ = 4


class ScmpArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


def deny_amx():
    """Makes the kernel refuse this process AMX (a seccomp filter failing the one
    arch_prctl request with EPERM), as a kernel without AMX support would. Must run
    before llama.cpp sets up its CPU backend."""
    try:
        lib = ctypes.CDLL("libseccomp.so.2")
    except OSError:
        sys.exit("--bufts noamx needs libseccomp.so.2 (apt install libseccomp2); "
                 "or pass --bufts cpu")
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(ScmpArgCmp)]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    only = (ScmpArgCmp * 1)(ScmpArgCmp(0, SCMP_CMP_EQ, ARCH_REQ_XCOMP_PERM, 0))
    if not ctx or lib.seccomp_rule_add_array(ctx, SCMP_ACT_ERRNO_EPERM, SYS_ARCH_PRCTL, 1,
                                             only) != 0 or lib.seccomp_load(ctx) != 0:
        sys.exit("could not install the seccomp filter that refuses AMX")


def load_model(path, bufts):
    params = L.llama_model_default_params()
    params.n_gpu_layers = 0
    params.use_extra_bufts = bufts != "cpu"
    model = L.llama_model_load_from_file(path.encode(), params)
    if not model:
        sys.exit(f"llama.cpp could not load {path}")
    return model


def new_context(model, rows, capacity, batch_tokens, threads):
    params = L.llama_context_default_params()
    # Every row's cells: llama.cpp splits n_ctx evenly between n_seq_max sequences.
    params.n_ctx = rows * capacity
    params.n_batch = max(batch_tokens, 512)
    params.n_seq_max = rows
    params.n_threads = threads
    params.n_threads_batch = threads
    params.no_perf = True
    ctx = L.llama_init_from_model(model, params)
    if not ctx:
        sys.exit("llama.cpp could not create a context")
    return ctx


class Batch:
    """A llama_batch of up to `capacity` tokens, one sequence id per token."""

    def __init__(self, capacity):
        self.raw = L.llama_batch_init(capacity, 0, 1)
        self.capacity = capacity

    def fill(self, entries):
        """entries: (token, position, sequence, wants_logits)."""
        b = self.raw
        assert len(entries) <= self.capacity
        for i, (token, pos, seq, logits) in enumerate(entries):
            b.token[i] = token
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = 1 if logits else 0
        b.n_tokens = len(entries)

    def free(self):
        L.llama_batch_free(self.raw)


def generate(ctx, sampler, batch, prompts, new_tokens):
    """Generates `new_tokens` for every prompt together (each its own sequence). Returns
    (new ids per prompt, prefill seconds, decode seconds)."""
    L.llama_memory_clear(L.llama_get_memory(ctx), True)
    entries = []
    for s, ids in enumerate(prompts):
        for p, t in enumerate(ids):
            entries.append((t, p, s, p == len(ids) - 1))
    start = time.perf_counter()
    batch.fill(entries)
    if L.llama_decode(ctx, batch.raw) != 0:
        sys.exit("llama_decode failed on the prefill batch")
    # Logits are asked for by the token's index in the batch: each prompt's last token.
    last, end = [], 0
    for ids in prompts:
        end += len(ids)
        last.append(end - 1)
    out = [[L.llama_sampler_sample(sampler, ctx, i)] for i in last]
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for step in range(1, new_tokens):
        batch.fill(
            [(out[s][-1], len(ids) + step - 1, s, True) for s, ids in enumerate(prompts)]
        )
        if L.llama_decode(ctx, batch.raw) != 0:
            sys.exit(f"llama_decode failed at decode step {step}")
        for s in range(len(prompts)):
            out[s].append(L.llama_sampler_sample(sampler, ctx, s))
    decode = time.perf_counter() - start
    return out, prefill, decode


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a .gguf file")
    ap.add_argument("--prompts", required=True, help="prompts.json (token ids)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mode", choices=["single", "batched", "both"], default="both")
    ap.add_argument("--rows", type=int, default=0,
                    help="batched: groups of this many prompts (default: all at once)")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="sample at this temperature (default 0: greedy)")
    ap.add_argument("--bufts", choices=["noamx", "cpu", "auto"], default="noamx",
                    help="weight layouts (see the module docs); default noamx")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.bufts == "noamx":
        deny_amx()
    global L
    import llama_cpp as L  # noqa: E402 (after the filter: ggml sets up AMX on import)
    if args.new_tokens < 1 or args.threads < 1:
        sys.exit("--new-tokens and --threads must be positive")
    with open(args.prompts, encoding="utf-8") as f:
        prompts = json.load(f)["prompts"]
    if not prompts or any(not p for p in prompts):
        sys.exit(f"{args.prompts}: no prompts, or an empty one")

    if args.rows < 0 or args.temperature < 0:
        sys.exit("--rows and --temperature must not be negative")
    L.llama_backend_init()
    model = load_model(args.model, args.bufts)
    if args.temperature > 0:
        sampler = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        L.llama_sampler_chain_add(sampler, L.llama_sampler_init_temp(args.temperature))
        L.llama_sampler_chain_add(sampler, L.llama_sampler_init_dist(0))
    else:
        sampler = L.llama_sampler_init_greedy()
    longest = max(len(p) for p in prompts)
    capacity = -(-(longest + args.new_tokens) // 256) * 256
    modes = ["single", "batched"] if args.mode == "both" else [args.mode]
    results = []
    # The batched groups: prompts by length, ties in file order, `rows` at a time.
    by_length = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    group_rows = args.rows or len(prompts)
    groups = [by_length[i:i + group_rows] for i in range(0, len(prompts), group_rows)]
    for mode in modes:
        rows = 1 if mode == "single" else min(group_rows, len(prompts))
        batch_tokens = longest if mode == "single" else max(
            sum(len(prompts[i]) for i in g) for g in groups)
        ctx = new_context(model, rows, capacity, batch_tokens, args.threads)
        batch = Batch(max(batch_tokens, rows))
        # Warm-up: one prompt, a few tokens (page faults, thread start, repacking).
        generate(ctx, sampler, batch, prompts[:1], min(4, args.new_tokens))
        prefill = decode = 0.0
        new_ids = []
        if mode == "single":
            for p in prompts:
                out, pf, dc = generate(ctx, sampler, batch, [p], args.new_tokens)
                new_ids += out
                prefill += pf
                decode += dc
        else:
            new_ids = [None] * len(prompts)
            for g in groups:
                out, pf, dc = generate(ctx, sampler, batch, [prompts[i] for i in g],
                                       args.new_tokens)
                for i, ids in zip(g, out):
                    new_ids[i] = ids
                prefill += pf
                decode += dc
        batch.free()
        L.llama_free(ctx)
        counts = [len(ids) for ids in new_ids]
        generated = sum(counts)
        prompt_tokens = sum(len(p) for p in prompts)
        result = dict(
            side="llama.cpp",
            version=L.__version__,
            model=os.path.basename(args.model),
            mode=mode,
            rows=rows,
            temperature=args.temperature,
            threads=args.threads,
            bufts=args.bufts,
            prompts=len(prompts),
            prompt_tokens=prompt_tokens,
            new_tokens=args.new_tokens,
            generated_per_prompt=counts,
            prefill_seconds=prefill,
            decode_seconds=decode,
            seconds=prefill + decode,
            prefill_tokens_per_second=prompt_tokens / prefill,
            # Decode steps make all but the first new token of each prompt.
            decode_tokens_per_second=(generated - len(prompts)) / decode if decode else None,
            generated_tokens_per_second=generated / (prefill + decode),
            token_ids=new_ids,
        )
        print(json.dumps({k: v for k, v in result.items() if k != "token_ids"}), flush=True)
        results.append(result)
    L.llama_sampler_free(sampler)
    L.llama_model_free(model)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f)
            f.write("\n")


if __name__ == "__main__":
    main()
