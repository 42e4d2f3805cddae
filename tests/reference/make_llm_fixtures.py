#!/usr/bin/env python3
"""Writes tests/fixtures/llm/: two tiny random decoder LLMs, saved by transformers exactly
as a real checkpoint is, their GGUF conversions, and `expected.json` with what
transformers computes for a fixed set of chat prompts.

  - tiny-llama: LlamaForCausalLM with Llama 3.1's RoPE scaling (`rope_type: llama3`),
    untied embeddings, a Llama-3-style chat template (`bos_token`, header tokens,
    `| trim`), end of turn `<|eot_id|>`.
  - tiny-qwen2: Qwen2ForCausalLM: q/k/v biases, tied embeddings, rope_theta 1e6, a
    ChatML template with a default system message and Python string methods
    (`.strip()`), end of turn `<|im_end|>`.

Both are hidden 64, 2 layers, 4 heads over 2 key/value heads (grouped-query attention),
head dimension 16, weights stored in bfloat16 as real checkpoints are. The models are
random (seeded) and mean nothing; what they pin down is the arithmetic. Every parameter
(norm weights and biases included) is drawn wide enough that a transposed weight, a
missing bias or a RoPE off by one changes the generated tokens; the script checks that
the top two logits are at least MIN_MARGIN apart at every greedy step, so float rounding
differences between implementations cannot flip a token.

The tokenizer is a byte-level BPE whose merges are learned here, not by the `tokenizers`
trainer, so that a rerun reproduces it exactly: repeatedly merge the most frequent
adjacent pair over the GPT-2 pre-tokenized words of the first CORPUS_LINES passages of
datasets/scifact-mini, ties broken by the pair's text. Each model's tokenizer.json then
uses its family's real pre-tokenizer (Llama 3's or Qwen2's split regex, NFC for Qwen2).

Each model directory gets:
  config.json, generation_config.json, model.safetensors   (transformers' save_pretrained)
  tokenizer.json, tokenizer_config.json                     (chat template inside)
  model-f16.gguf    every weight in float16 (bfloat16 values fit float16 here), norms f32
  model-q8_0.gguf   every matrix in Q8_0 (blocks of 32), norms and biases f32
The GGUF files carry llama.cpp's metadata (architecture keys, the gpt2 tokenizer with its
merges and token types, the chat template); for `llama` the q/k projection rows are
permuted to the interleaved RoPE layout llama.cpp expects, as its converter does, and
Llama 3.1's RoPE scaling is written as the `rope_freqs.weight` factors.

`expected.json` holds, per model and prompt: the messages, `rendered` =
apply_chat_template(messages, tokenize=False, add_generation_prompt=True), `prompt_ids` =
the rendered string tokenized without adding special tokens (as apply_chat_template does),
and `greedy_ids` = the new tokens of generate(max_new_tokens=MAX_NEW_TOKENS,
do_sample=False) up to and including the first end-of-turn token (and, for a reply that
ends with one, `greedy_ids_min_new_tokens`: the same with min_new_tokens=MAX_NEW_TOKENS);
plus `batches`: some prompts generated together with left padding, ids per row; and
`llama_cpp_next_token_logits`: what llama.cpp (llama-cpp-python, required) computes from
each GGUF file for the token after a few of the prompts.

Run from the repository root:
    py=/root/.cache/distillery-peers/bin/python
    OMP_NUM_THREADS=2 "$py" tests/reference/make_llm_fixtures.py
"""

import json
import os
import shutil

import gguf
import numpy as np
import tokenizers
import torch
import transformers
from tokenizers import decoders, models, normalizers, pre_tokenizers

CORPUS = os.path.join("datasets", "scifact-mini", "corpus.jsonl")
OUT = os.path.join("tests", "fixtures", "llm")
# Enough text for the merges below; small enough to learn them in seconds.
CORPUS_LINES = 200
# Learned merges: 256 bytes + 300 merges + the special tokens is a ~560-token vocabulary,
# which keeps the embedding tables (and the fixtures) small.
NUM_MERGES = 300
# Standard deviation of every random weight; norm weights are 1 plus this much noise.
# Wide enough that the logits of a step differ by tenths, narrow enough that nothing
# saturates in bfloat16.
PARAM_STD = 0.15
# The smallest gap between the best and second-best logit allowed at any greedy step.
# f32 implementations differ by ~1e-5 here; a gap this wide cannot be closed by rounding.
MIN_MARGIN = 2e-3
MAX_NEW_TOKENS = 20
# One seed per model, chosen so that every greedy step clears MIN_MARGIN and one tiny-llama
# reply ends with an end-of-turn token before MAX_NEW_TOKENS (the stop is compared too).
SEEDS = {"llama": 17, "qwen2": 20250119}

SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
)

LLAMA_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
QWEN2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# A Llama-3-style template (Meta's, shortened): BOS, a header per message, content
# trimmed, <|eot_id|> after each; unknown roles raise.
LLAMA_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- for message in messages %}\n"
    "    {%- if message['role'] not in ['system', 'user', 'assistant'] %}\n"
    "        {{- raise_exception('Unknown role: ' + message['role']) }}\n"
    "    {%- endif %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}\n"
    "    {{- message['content'] | trim + '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)

# A ChatML template as Qwen2.5's (shortened): a default system message when the chat has
# none, block tags on their own lines (trim_blocks / lstrip_blocks matter), `.strip()`.
QWEN2_TEMPLATE = """{% for message in messages %}
    {% if loop.first and message.role != 'system' %}
<|im_start|>system
You are a helpful assistant.<|im_end|>
    {% endif %}
<|im_start|>{{ message.role }}
{{ message.content.strip() }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""

PASSAGE = (
    "DNA methylation plays an important role in biological processes in human health and "
    "disease. Recent technological advances allow unbiased whole-genome DNA methylation "
    "analysis to be carried out on human cells."
)

PROMPTS = [
    [{"role": "user", "content": "Hello"}],
    [
        {"role": "system", "content": "You write search queries."},
        {"role": "user", "content": "Write a question about vaccines."},
    ],
    [
        {"role": "system", "content": "  Answer with the query only.  "},
        {"role": "user", "content": "Passage: " + PASSAGE + "\nQuery:"},
    ],
    [
        {"role": "user", "content": "What is a tumor suppressor?"},
        {"role": "assistant", "content": "A gene that slows cell division."},
        {"role": "user", "content": "Name one.\n"},
    ],
    [{"role": "user", "content": "Café — naïve façade, 37 °C, and “quotes”."}],
]

# Prompts generated together, left-padded: all of them, and a pair of very different
# lengths.
BATCHES = [[0, 1, 2, 3, 4], [2, 0]]


def bytes_to_unicode():
    """GPT-2's byte alphabet: printable bytes map to themselves, the others to code points
    from 256 on, in byte order."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {}
    extra = 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def corpus_texts():
    texts = []
    with open(CORPUS, encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)
            texts.append(doc["title"] + " " + doc["text"])
            if len(texts) == CORPUS_LINES:
                break
    return texts


def learn_bpe(texts):
    """(vocab {token: id}, merges [(a, b)]): the byte alphabet in byte order, then one
    token per merge, most frequent pair first, ties broken by the pair's text."""
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    counts = {}
    for text in texts:
        for word, _ in pre.pre_tokenize_str(text):
            counts[word] = counts.get(word, 0) + 1
    words = [(list(w), n) for w, n in sorted(counts.items())]
    alphabet = bytes_to_unicode()
    vocab = {alphabet[b]: b for b in range(256)}
    merges = []
    for _ in range(NUM_MERGES):
        pairs = {}
        for symbols, n in words:
            for a, b in zip(symbols, symbols[1:]):
                pairs[(a, b)] = pairs.get((a, b), 0) + n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        joined = best[0] + best[1]
        vocab[joined] = len(vocab)
        for i, (symbols, n) in enumerate(words):
            out, j = [], 0
            while j < len(symbols):
                if j + 1 < len(symbols) and (symbols[j], symbols[j + 1]) == best:
                    out.append(joined)
                    j += 2
                else:
                    out.append(symbols[j])
                    j += 1
            words[i] = (out, n)
    return vocab, merges


# The pre-tokenizer regexes of the real tokenizer.json files (Llama 3's and Qwen2's):
# digits in runs of at most three (Llama 3) or one by one (Qwen2). transformers 5 applies
# Qwen2's to any `qwen2` model whatever its tokenizer.json says, so the fixture must carry it.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def build_tokenizer(vocab, merges, specials, family):
    """The learned BPE with the pre-tokenization, normalization and decoder of the
    family's real tokenizer.json."""
    bpe = models.BPE(vocab=dict(vocab), merges=list(merges))
    tok = tokenizers.Tokenizer(bpe)
    split = pre_tokenizers.Split(
        tokenizers.Regex(LLAMA3_SPLIT if family == "llama" else QWEN2_SPLIT),
        behavior="isolated",
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    if family == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [tokenizers.AddedToken(s, special=True, normalized=False) for s in specials]
    )
    return tok


def randomize(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn_like(p) * PARAM_STD
            if name.endswith("norm.weight"):
                p.copy_(1.0 + noise)
            else:
                p.copy_(noise)
            # What the bfloat16 checkpoint will hold, so the f32 reference sees the same.
            p.copy_(p.to(torch.bfloat16).to(torch.float32))


def make_model(family, vocab, merges):
    if family == "llama":
        specials = LLAMA_SPECIALS
    else:
        specials = QWEN2_SPECIALS
    tok = build_tokenizer(vocab, merges, specials, family)
    ids = {s: tok.token_to_id(s) for s in specials}
    if family == "llama":
        config = transformers.LlamaConfig(
            vocab_size=tok.get_vocab_size(),
            bos_token_id=ids["<|begin_of_text|>"],
            eos_token_id=[ids["<|end_of_text|>"], ids["<|eot_id|>"]],
            tie_word_embeddings=False,
            # Llama 3.1's context; its RoPE scaling assumes more than the 8,192 below.
            max_position_embeddings=131072,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=8192,
            ),
            **SHAPE,
        )
        model = transformers.LlamaForCausalLM(config)
        tok_config = dict(
            bos_token="<|begin_of_text|>",
            eos_token="<|eot_id|>",
            pad_token="<|end_of_text|>",
            chat_template=LLAMA_TEMPLATE,
        )
        gen_eos = [ids["<|end_of_text|>"], ids["<|eot_id|>"]]
        pad_id = ids["<|end_of_text|>"]
    else:
        config = transformers.Qwen2Config(
            vocab_size=tok.get_vocab_size(),
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            tie_word_embeddings=True,
            max_position_embeddings=32768,
            rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
            use_sliding_window=False,
            **SHAPE,
        )
        model = transformers.Qwen2ForCausalLM(config)
        tok_config = dict(
            bos_token=None,
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            chat_template=QWEN2_TEMPLATE,
        )
        gen_eos = [ids["<|im_end|>"], ids["<|endoftext|>"]]
        pad_id = ids["<|endoftext|>"]
    torch.manual_seed(SEEDS[family])
    randomize(model)
    model.eval()
    model.generation_config.eos_token_id = gen_eos
    model.generation_config.pad_token_id = pad_id
    model.generation_config.bos_token_id = config.bos_token_id
    model.generation_config.do_sample = False
    return tok, tok_config, model, gen_eos, pad_id


def save_model(directory, tok, tok_config, model):
    if os.path.isdir(directory):
        shutil.rmtree(directory)
    os.makedirs(directory)
    model.to(torch.bfloat16).save_pretrained(directory)
    model.to(torch.float32)
    tok.save(os.path.join(directory, "tokenizer.json"))
    cfg = dict(
        tokenizer_class="PreTrainedTokenizerFast",
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
        **tok_config,
    )
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
        f.write("\n")


def greedy_references(directory, model, gen_eos, pad_id):
    """Rendered prompts, prompt ids, and greedy continuations alone and batched."""
    hf_tok = transformers.AutoTokenizer.from_pretrained(directory)
    prompts = []
    for messages in PROMPTS:
        rendered = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = hf_tok(rendered, add_special_tokens=False)["input_ids"]
        via_template = hf_tok.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=True, return_dict=True
        )["input_ids"]
        assert list(via_template) == ids, "apply_chat_template(tokenize=True) disagrees"
        greedy, margin = generate(model, [ids], gen_eos, pad_id)
        entry = dict(
            messages=messages,
            rendered=rendered,
            prompt_ids=ids,
            greedy_ids=greedy[0],
            min_margin=margin,
        )
        if greedy[0][-1] in gen_eos:
            # The same prompt with end-of-turn barred until MAX_NEW_TOKENS.
            barred, _ = generate(model, [ids], gen_eos, pad_id, min_new_tokens=MAX_NEW_TOKENS)
            entry["greedy_ids_min_new_tokens"] = barred[0]
        prompts.append(entry)
    batches = []
    for rows in BATCHES:
        greedy, margin = generate(model, [prompts[i]["prompt_ids"] for i in rows], gen_eos, pad_id)
        batches.append(dict(prompts=rows, greedy_ids=greedy, min_margin=margin))
    return prompts, batches


def generate(model, id_lists, gen_eos, pad_id, min_new_tokens=0):
    """generate() over left-padded rows; per row the new ids up to and including the
    first end-of-turn token, and the smallest top-1/top-2 logit gap seen on any row
    before it stopped."""
    width = max(len(ids) for ids in id_lists)
    input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in id_lists])
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in id_lists])
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=MAX_NEW_TOKENS,
            min_new_tokens=min_new_tokens,
            do_sample=False,
            eos_token_id=gen_eos,
            pad_token_id=pad_id,
            output_scores=True,
            return_dict_in_generate=True,
        )
    rows = []
    margin = float("inf")
    for r in range(len(id_lists)):
        new = out.sequences[r, width:].tolist()
        kept = []
        for step, t in enumerate(new):
            top2 = torch.topk(out.scores[step][r].float(), 2).values
            margin = min(margin, float(top2[0] - top2[1]))
            kept.append(t)
            if t in gen_eos:
                break
        rows.append(kept)
    assert margin >= MIN_MARGIN, f"top-2 logit gap {margin} below {MIN_MARGIN}: change its seed"
    return rows, margin


def permute_for_interleaved_rope(w, n_head):
    """HF keeps each head's rotary pairs as (i, i + d/2); llama.cpp's `llama` graph rotates
    (2i, 2i + 1). Reordering each head's output rows so that row 2i is HF's row i and row
    2i + 1 is HF's row i + d/2 makes the two agree (llama.cpp's converter does the same)."""
    rows, cols = w.shape
    d = rows // n_head
    return w.reshape(n_head, 2, d // 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def llama3_rope_factors(config):
    """Per-frequency divisors that turn the plain RoPE frequencies into Llama 3.1's scaled
    ones (the `rope_freqs.weight` tensor of llama.cpp)."""
    rp = config.rope_parameters
    d = config.hidden_size // config.num_attention_heads
    base = rp["rope_theta"]
    inv_freq = 1.0 / (base ** (np.arange(0, d, 2, dtype=np.float64) / d))
    factor = rp["factor"]
    low, high = rp["low_freq_factor"], rp["high_freq_factor"]
    old_len = rp["original_max_position_embeddings"]
    wavelen = 2 * np.pi / inv_freq
    factors = []
    for wl in wavelen:
        if wl < old_len / high:
            factors.append(1.0)
        elif wl > old_len / low:
            factors.append(factor)
        else:
            smooth = (old_len / wl - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
GGUF_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf):
    if hf in GGUF_NAMES:
        return GGUF_NAMES[hf]
    _, _, layer, rest = hf.split(".", 3)
    return f"blk.{layer}.{GGUF_LAYER_NAMES[rest]}"


def write_gguf(path, family, model, tok, tok_config, gen_eos, pad_id, qtype):
    config = model.config
    arch = family
    w = gguf.GGUFWriter(path, arch)
    w.add_name(f"tiny-{family}")
    n_head = config.num_attention_heads
    n_kv = config.num_key_value_heads
    head_dim = config.hidden_size // n_head
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_freq_base(config.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(config.vocab_size)
    if qtype == gguf.GGMLQuantizationType.Q8_0:
        w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    else:
        w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)

    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    specials = set(LLAMA_SPECIALS if family == "llama" else QWEN2_SPECIALS)
    w.add_tokenizer_model("gpt2")
    # llama.cpp's names for the two pre-tokenizer regexes above.
    w.add_tokenizer_pre("llama-bpe" if family == "llama" else "qwen2")
    w.add_token_list(tokens)
    w.add_token_types(
        [
            gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL
            for t in tokens
        ]
    )
    merges = json.loads(tok.to_str())["model"]["merges"]
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    if tok_config["bos_token"] is not None:
        w.add_bos_token_id(vocab[tok_config["bos_token"]])
    w.add_eos_token_id(vocab[tok_config["eos_token"]])
    w.add_eot_token_id(vocab[tok_config["eos_token"]])
    w.add_pad_token_id(pad_id)
    w.add_add_bos_token(False)
    w.add_chat_template(tok_config["chat_template"])

    if config.rope_parameters.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(config))
    state = model.state_dict()
    for name, tensor in state.items():
        data = tensor.to(torch.float32).numpy()
        if family == "llama" and name.endswith("q_proj.weight"):
            data = permute_for_interleaved_rope(data, n_head)
        if family == "llama" and name.endswith("k_proj.weight"):
            data = permute_for_interleaved_rope(data, n_kv)
        if data.ndim == 1:
            w.add_tensor(gguf_name(name), data.astype(np.float32))
        elif qtype == gguf.GGMLQuantizationType.Q8_0:
            q = gguf.quants.quantize(data, qtype)
            w.add_tensor(gguf_name(name), q, raw_dtype=qtype)
        else:
            w.add_tensor(gguf_name(name), data.astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# Prompts whose next-token logits llama.cpp computes for the reference: a short one, the
# longest, and the one with non-ASCII text.
LLAMA_CPP_PROMPTS = [0, 2, 4]


def llama_cpp_logits(path, prompts):
    """llama.cpp's (llama-cpp-python's) logits of the token after each prompt of
    LLAMA_CPP_PROMPTS, reading the GGUF just written: an independent implementation of
    the same file, quantized matrices and interleaved RoPE included.

    llama.cpp's extra CPU buffer types are turned off: on these machines (the CPU reports
    AMX) its AMX repacking of Q8_0 matrices segfaults on the first evaluation, for tiny
    and for Qwen2.5-0.5B-sized matrices alike, while the plain CPU path works."""
    import llama_cpp
    import llama_cpp.llama

    default_params = llama_cpp.llama_model_default_params

    def without_extra_buffer_types():
        params = default_params()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama.llama_cpp.llama_model_default_params = without_extra_buffer_types
    try:
        llm = llama_cpp.Llama(
            model_path=path, n_ctx=512, n_threads=2, logits_all=True, verbose=False, seed=0
        )
        logits = []
        for i in LLAMA_CPP_PROMPTS:
            llm.reset()
            llm.eval(prompts[i]["prompt_ids"])
            # Seven significant digits: what an f32 holds, in a third of the characters.
            logits.append([float(f"{x:.7g}") for x in llm.scores[llm.n_tokens - 1]])
    finally:
        llama_cpp.llama.llama_cpp.llama_model_default_params = default_params
    return logits


def main():
    texts = corpus_texts()
    vocab, merges = learn_bpe(texts)
    expected = {}
    for family in ["llama", "qwen2"]:
        directory = os.path.join(OUT, f"tiny-{family}")
        tok, tok_config, model, gen_eos, pad_id = make_model(family, vocab, merges)
        save_model(directory, tok, tok_config, model)
        prompts, batches = greedy_references(directory, model, gen_eos, pad_id)
        llama_cpp = dict(prompts=LLAMA_CPP_PROMPTS)
        for qtype, file in [
            (gguf.GGMLQuantizationType.F16, "model-f16.gguf"),
            (gguf.GGMLQuantizationType.Q8_0, "model-q8_0.gguf"),
        ]:
            path = os.path.join(directory, file)
            write_gguf(path, family, model, tok, tok_config, gen_eos, pad_id, qtype)
            llama_cpp[file] = llama_cpp_logits(path, prompts)
        expected[f"tiny-{family}"] = dict(
            eos_token_ids=gen_eos,
            max_new_tokens=MAX_NEW_TOKENS,
            prompts=prompts,
            batches=batches,
            llama_cpp_next_token_logits=llama_cpp,
        )
        print(
            f"tiny-{family}: vocab {tok.get_vocab_size()}, prompt lengths",
            [len(p["prompt_ids"]) for p in prompts],
            "new tokens",
            [len(p["greedy_ids"]) for p in prompts],
            "min margin",
            min(p["min_margin"] for p in prompts),
        )
    with open(os.path.join(OUT, "expected.json"), "w", encoding="utf-8") as f:
        json.dump(expected, f, indent=1, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main()
