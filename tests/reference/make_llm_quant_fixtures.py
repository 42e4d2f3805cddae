#!/usr/bin/env python3
"""Writes tests/fixtures/llm/tiny-qwen2-256/: a tiny random Qwen2 model wide enough for
llama.cpp's k-quants, quantized by llama.cpp's own quantizer, and the logits llama.cpp
computes from each file, for operators/tests/llm.rs to check distillery against.

The tiny models of make_llm_fixtures.py are 64 wide, and a k-quant block is 256 values:
llama.cpp cannot store their matrices as Q4_K. This model is tiny-qwen2 (the same
tokenizer, template, special tokens and random-weight recipe, from make_llm_fixtures.py)
with hidden and intermediate size 256 and one layer (4 heads of 64 over 2 key/value
heads), written as f16 GGUF and quantized by `llama_model_quantize`:
  model-q4_k_s.gguf   LLAMA_FTYPE_MOSTLY_Q4_K_S (Q4_K matrices; llama.cpp picks its
                      own types for a few, as it does for real models: the script prints
                      the mix)
  model-q5_0.gguf     LLAMA_FTYPE_MOSTLY_Q5_0
`expected.json`: per file, llama.cpp's logits of the token after prompts 0, 2 and 4 of
tiny-qwen2 (their `prompt_ids` in tests/fixtures/llm/expected.json: the tokenizer is the
same, checked), and the tensor types of the file.

Run from the repository root after make_llm_fixtures.py (it reads that script's
expected.json):
    py=/root/.cache/distillery-peers/bin/python
    OMP_NUM_THREADS=2 "$py" tests/reference/make_llm_quant_fixtures.py
"""

import json
import os
import sys
import tempfile

import gguf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_llm_fixtures as base  # noqa: E402

OUT = os.path.join(base.OUT, "tiny-qwen2-256")
SHAPE = dict(base.SHAPE, hidden_size=256, intermediate_size=256, num_hidden_layers=1)
FILES = {
    "model-q4_k_s.gguf": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "model-q5_0.gguf": "LLAMA_FTYPE_MOSTLY_Q5_0",
}


def quantize(src, dst, ftype_name):
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype_name)
    params.nthread = 2
    if llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params) != 0:
        sys.exit(f"llama_model_quantize failed for {dst}")


def tensor_types(path):
    reader = gguf.GGUFReader(path)
    types = {}
    for t in reader.tensors:
        if len(t.shape) > 1 or t.n_elements > 256:
            name = t.tensor_type.name
            types[name] = types.get(name, 0) + 1
    return types


def main():
    with open(os.path.join(base.OUT, "expected.json"), encoding="utf-8") as f:
        reference = json.load(f)["tiny-qwen2"]
    prompts = reference["prompts"]

    base.SHAPE.clear()
    base.SHAPE.update(SHAPE)
    texts = base.corpus_texts()
    vocab, merges = base.learn_bpe(texts)
    tok, tok_config, model, gen_eos, pad_id = base.make_model("qwen2", vocab, merges)
    # The same tokenizer as tiny-qwen2's: the prompts' ids carry over.
    with open(os.path.join(base.OUT, "tiny-qwen2", "tokenizer.json"), encoding="utf-8") as f:
        theirs = json.load(f)["model"]["vocab"]
    if json.loads(tok.to_str())["model"]["vocab"] != theirs:
        sys.exit("the tokenizer differs from tiny-qwen2's: run make_llm_fixtures.py first")

    os.makedirs(OUT, exist_ok=True)
    expected = dict(prompts=base.LLAMA_CPP_PROMPTS, shape=SHAPE)
    with tempfile.TemporaryDirectory() as tmp:
        f16 = os.path.join(tmp, "model-f16.gguf")
        base.write_gguf(f16, "qwen2", model, tok, tok_config, gen_eos, pad_id,
                        gguf.GGMLQuantizationType.F16)
        for file, ftype in FILES.items():
            path = os.path.join(OUT, file)
            quantize(f16, path, ftype)
            expected[file] = dict(
                tensor_types=tensor_types(path),
                logits=base.llama_cpp_logits(path, prompts),
            )
            print(file, os.path.getsize(path), "bytes", expected[file]["tensor_types"])
    with open(os.path.join(OUT, "expected.json"), "w", encoding="utf-8") as f:
        json.dump(expected, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
