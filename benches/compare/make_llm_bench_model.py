#!/usr/bin/env python3
"""Writes the model of the LLM generation throughput comparison (llm_throughput.sh): a
decoder with Qwen2.5-0.5B's exact shape and random weights, as GGUF in f16, Q8_0 and
Q4_K_M, with a tokenizer both sides load, and the prompts both sides generate from.

The shape is Qwen2.5-0.5B's config.json: hidden 896, 24 layers, 14 attention heads over
2 key/value heads (head dimension 64), intermediate 4864, vocabulary 151936, tied input
and output embeddings, q/k/v biases, RoPE theta 1e6, RMS norm eps 1e-6. Every matrix
and bias is drawn from N(0, WEIGHT_STD^2) with a fixed seed; norm weights are 1. The
weights mean nothing: generation speed does not depend on their values, only on the
shapes and the stored quantization, which are the real model's.

Quantization is llama.cpp's own (`llama_model_quantize` through llama-cpp-python), from
the f16 file:
  model-q8_0.gguf     LLAMA_FTYPE_MOSTLY_Q8_0: every matrix in Q8_0.
  model-q4_k_m.gguf   LLAMA_FTYPE_MOSTLY_Q4_K_M: llama.cpp's mix. Rows of 896 values are
                      not a whole number of 256-value k-quant blocks, so llama.cpp falls
                      back for them (as it does for the real Qwen2.5-0.5B): the matrices
                      that read the hidden state (q, k, v, o, gate, up) become Q5_0 / Q8_0
                      and the tied embedding Q8_0; ffn_down (rows of 4,864) gets Q4_K /
                      Q6_K. The script prints the resulting mix.

Tokenizer: a byte-level BPE trained here (the `tokenizers` trainer) on
datasets/scifact-mini to TOKENIZER_VOCAB tokens, with Qwen2's pre-tokenizer regex, NFC
and ChatML's special tokens, written as tokenizer.json (+ tokenizer_config.json with a
ChatML template). The GGUF token list is the same tokens with the same ids, padded to
the model's 151,936 embeddings with unused `[PADn]` tokens (llama.cpp needs one entry
per embedding row; the real Qwen2.5 files pad the same way). The tokenizer only has to
be accepted by both loaders: the runners feed token ids, not text.

prompts.json: PROMPTS prompts of PROMPT_TOKENS token ids each, the first PROMPT_TOKENS
tokens of the first SciFact-mini passages (title + " " + text) that are long enough.

Model files are large (f16 ~1 GB): they go to a cache directory outside the repository,
never into it. Run from the repository root:
    py=/root/.cache/distillery-peers/bin/python
    OMP_NUM_THREADS=2 "$py" benches/compare/make_llm_bench_model.py [OUT_DIR]
OUT_DIR defaults to $DISTILLERY_BENCH_CACHE/qwen2.5-0.5b-random, else
~/.cache/distillery-bench/qwen2.5-0.5b-random. Existing files are kept unless --force.
"""

import argparse
import ctypes
import json
import os
import sys

import gguf
import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

# Qwen2.5-0.5B's config.json.
HIDDEN = 896
LAYERS = 24
HEADS = 14
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS
INTERMEDIATE = 4864
VOCAB = 151936
ROPE_THETA = 1_000_000.0
RMS_EPS = 1e-6
CONTEXT = 32768

# Standard deviation of the random weights (transformers' initializer_range for Qwen2).
WEIGHT_STD = 0.02
SEED = 20250501
# The trained tokenizer's size before the specials: big enough for word-sized tokens on
# SciFact, small enough to train in seconds.
TOKENIZER_VOCAB = 8000
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PROMPTS = 8
PROMPT_TOKENS = 128

CORPUS = os.path.join("datasets", "scifact-mini", "corpus.jsonl")

# Qwen2's pre-tokenizer split (digits one by one), as in its tokenizer.json; llama.cpp
# applies the same regex for tokenizer.ggml.pre = "qwen2".
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# ChatML, as Qwen2.5's template (shortened: no tools).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def corpus_texts():
    with open(CORPUS, encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)
            title, text = doc.get("title", ""), doc["text"]
            yield f"{title} {text}" if title else text


def train_tokenizer():
    tok = tokenizers.Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(tokenizers.Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus_texts()), trainer)
    tok.add_special_tokens(
        [tokenizers.AddedToken(s, special=True, normalized=False) for s in SPECIALS]
    )
    return tok


def prompt_ids(tok):
    prompts = []
    for text in corpus_texts():
        ids = tok.encode(text, add_special_tokens=False).ids
        if len(ids) >= PROMPT_TOKENS:
            prompts.append(ids[:PROMPT_TOKENS])
            if len(prompts) == PROMPTS:
                return prompts
    sys.exit(f"{CORPUS} has fewer than {PROMPTS} passages of {PROMPT_TOKENS} tokens")


def write_f16(path, tok):
    rng = np.random.default_rng(SEED)

    def matrix(rows, cols):
        return (rng.standard_normal((rows, cols), dtype=np.float32) * WEIGHT_STD).astype(
            np.float16
        )

    def bias(n):
        return rng.standard_normal(n, dtype=np.float32) * WEIGHT_STD

    w = gguf.GGUFWriter(path, "qwen2")
    w.add_name("qwen2.5-0.5b-shaped-random")
    w.add_context_length(CONTEXT)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(INTERMEDIATE)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(RMS_EPS)
    w.add_rope_freq_base(ROPE_THETA)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)

    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert len(tokens) == max(vocab.values()) + 1, "token ids are not dense"
    types = [
        gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens
    ]
    pad = VOCAB - len(tokens)
    tokens += [f"[PAD{i}]" for i in range(len(tokens), VOCAB)]
    types += [gguf.TokenType.UNUSED] * pad
    w.add_vocab_size(VOCAB)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    merges = json.loads(tok.to_str())["model"]["merges"]
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_eos_token_id(vocab["<|im_end|>"])
    w.add_eot_token_id(vocab["<|im_end|>"])
    w.add_pad_token_id(vocab["<|endoftext|>"])
    w.add_bos_token_id(vocab["<|endoftext|>"])
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    w.add_tensor("token_embd.weight", matrix(VOCAB, HIDDEN))
    for i in range(LAYERS):
        b = f"blk.{i}"
        w.add_tensor(f"{b}.attn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
        for name, rows in (("attn_q", HEADS * HEAD_DIM), ("attn_k", KV_HEADS * HEAD_DIM),
                           ("attn_v", KV_HEADS * HEAD_DIM)):
            w.add_tensor(f"{b}.{name}.weight", matrix(rows, HIDDEN))
            w.add_tensor(f"{b}.{name}.bias", bias(rows))
        w.add_tensor(f"{b}.attn_output.weight", matrix(HIDDEN, HEADS * HEAD_DIM))
        w.add_tensor(f"{b}.ffn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
        w.add_tensor(f"{b}.ffn_gate.weight", matrix(INTERMEDIATE, HIDDEN))
        w.add_tensor(f"{b}.ffn_up.weight", matrix(INTERMEDIATE, HIDDEN))
        w.add_tensor(f"{b}.ffn_down.weight", matrix(HIDDEN, INTERMEDIATE))
    w.add_tensor("output_norm.weight", np.ones(HIDDEN, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def quantize(src, dst, ftype):
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if rc != 0:
        sys.exit(f"llama_model_quantize({src} -> {dst}) failed with {rc}")


def tensor_types(path):
    counts = {}
    for t in gguf.GGUFReader(path).tensors:
        if len(t.shape) > 1:
            key = t.tensor_type.name
            counts[key] = counts.get(key, 0) + 1
    return counts


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = os.path.join(
        os.environ.get("DISTILLERY_BENCH_CACHE")
        or os.path.join(os.path.expanduser("~"), ".cache", "distillery-bench"),
        "qwen2.5-0.5b-random",
    )
    ap.add_argument("out", nargs="?", default=default)
    ap.add_argument("--force", action="store_true", help="rewrite files that exist")
    args = ap.parse_args()
    if not os.path.isfile(CORPUS):
        sys.exit(f"{CORPUS} not found: run from the repository root")
    os.makedirs(args.out, exist_ok=True)
    out = lambda name: os.path.join(args.out, name)  # noqa: E731

    import llama_cpp

    # The GGUF token list is the tokenizer's: both are rewritten together, or both kept.
    f16 = out("model-f16.gguf")
    fresh = args.force or not (os.path.isfile(f16) and os.path.isfile(out("tokenizer.json")))
    if fresh:
        tok = train_tokenizer()
        tok.save(out("tokenizer.json"))
    else:
        tok = tokenizers.Tokenizer.from_file(out("tokenizer.json"))
    with open(out("tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(
            dict(
                tokenizer_class="PreTrainedTokenizerFast",
                bos_token=None,
                eos_token="<|im_end|>",
                pad_token="<|endoftext|>",
                chat_template=CHAT_TEMPLATE,
            ),
            f,
            indent=2,
        )
        f.write("\n")
    prompts = prompt_ids(tok)
    with open(out("prompts.json"), "w", encoding="utf-8") as f:
        json.dump(dict(source=f"{CORPUS}: first {PROMPT_TOKENS} tokens", prompts=prompts), f)
        f.write("\n")
    print(f"tokenizer: {tok.get_vocab_size()} tokens; {len(prompts)} prompts x {PROMPT_TOKENS}")

    if fresh:
        print(f"writing {f16} ...", flush=True)
        write_f16(f16 + ".tmp", tok)
        os.replace(f16 + ".tmp", f16)
    for name, ftype in (
        ("model-q8_0.gguf", llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0),
        ("model-q4_k_m.gguf", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M),
    ):
        path = out(name)
        if fresh or not os.path.isfile(path):
            print(f"quantizing {path} ...", flush=True)
            quantize(f16, path + ".tmp", ftype)
            os.replace(path + ".tmp", path)
    for name in ("model-f16.gguf", "model-q8_0.gguf", "model-q4_k_m.gguf"):
        size = os.path.getsize(out(name)) / 2**20
        print(f"{name}: {size:.0f} MiB, matrices {tensor_types(out(name))}")


if __name__ == "__main__":
    main()
