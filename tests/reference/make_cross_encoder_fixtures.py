#!/usr/bin/env python3
"""Writes tests/fixtures/cross_encoders/<family>/: a tiny random sequence-classification
model of each family distillery's cross-encoder reads (bert, electra, xlm-roberta), saved
by transformers exactly as a real checkpoint is, plus `expected.json` with what
transformers computes for a fixed list of (query, passage) pairs.

The models are random (seeded) and far too small to mean anything; what they pin down is
the arithmetic: every parameter, layer norms and biases included, is drawn from a normal
distribution wide enough that a transposed weight, a swapped bias, a missing token-type
embedding or a position table off by one moves the logits by far more than the test's
tolerance.
  - bert: BertForSequenceClassification, num_labels 1, WordPiece vocabulary.
  - electra: ElectraForSequenceClassification, num_labels 2, embedding_size 16 against
    hidden_size 32, so `embeddings_project` is exercised.
  - xlm-roberta: XLMRobertaForSequenceClassification, num_labels 1, a Unigram
    (SentencePiece-style) vocabulary with <s> <pad> </s> <unk> ... <mask>.
Vocabularies come from word counts over the first CORPUS_LINES lines of
datasets/scifact-mini/corpus.jsonl: every character seen, then the most frequent words.
They are built here rather than by the `tokenizers` trainers because those do not give
the same vocabulary twice (hash-map order, parallel float sums); built this way, a rerun
reproduces every fixture file byte for byte.

`expected.json` holds, per pair: the query and passage, `input_ids` and `token_type_ids`
as the model receives them from `tokenizer(query, passage, truncation=True,
max_length=MAX_LENGTH)`, the raw `logits`, and `score` (the only logit for one label,
label 1's otherwise). Two pairs are long enough to be truncated at MAX_LENGTH. Floats are
float32 values written as float64 decimals (exact when parsed back as f32).

Run from the repository root:
    py=$(/work/shared/tools/peers-venv.sh)
    "$py" tests/reference/make_cross_encoder_fixtures.py
"""

import collections
import json
import math
import os
import re
import shutil

import torch
import transformers

CORPUS = os.path.join("datasets", "scifact-mini", "corpus.jsonl")
OUT = os.path.join("tests", "fixtures", "cross_encoders")
# Enough text for VOCAB_SIZE distinct words; small enough to count instantly.
CORPUS_LINES = 300
# Small vocabularies keep each model directory well under 1 MB; rarer words fall apart
# into characters, so the two long pairs below exceed MAX_LENGTH and the rest do not.
VOCAB_SIZE = 1500
# The truncation length the fixture and the Rust test both use.
MAX_LENGTH = 64
# Standard deviation of every random parameter (layer norm weights are 1 plus this much
# noise): large enough that the logits differ between pairs by a tenth or more.
PARAM_STD = 0.3
SEED = 20240611

SHAPE = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)

LONG_PASSAGE = (
    "Streaming dataflow systems process records as they arrive instead of waiting for a "
    "whole batch, which keeps memory bounded and lets slow stages push back on fast ones. "
    "A retrieval pipeline built this way reads passages, splits them into tokens, runs an "
    "encoder over groups of similar length and writes the resulting scores to a columnar "
    "file while the next group is already being read from disk."
)
LONG_QUERY = (
    "which genes regulate the methylation of cytosine residues in peripheral blood cells "
    "of adults and children across several independent cohorts and sequencing protocols"
)

PAIRS = [
    ("what is dna methylation", "DNA methylation plays an important role in biological processes."),
    ("tumor suppressor", "The p53 protein is a tumor suppressor that responds to cellular stress."),
    ("vaccine efficacy", "Vaccination reduced hospital admissions among older adults."),
    ("a", "b"),
    ("Does Aspirin prevent stroke?", "Low-dose aspirin lowers the risk of a first stroke in women."),
    ("protein folding", "Chaperones assist the folding of newly synthesised polypeptides."),
    # Needs truncation: the passage alone exceeds MAX_LENGTH.
    ("streaming retrieval", LONG_PASSAGE),
    # Needs truncation on both sides (longest first).
    (LONG_QUERY, LONG_PASSAGE),
]


def corpus_lines():
    lines = []
    with open(CORPUS, encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)
            lines.append(doc["title"] + " " + doc["text"])
            if len(lines) == CORPUS_LINES:
                break
    return lines


def word_counts(lines, lower):
    """Words and punctuation marks, as BERT's pre-tokenizer splits them."""
    counts = collections.Counter()
    for line in lines:
        counts.update(re.findall(r"\w+|[^\w\s]", line.lower() if lower else line))
    return counts


def frequent(counts, n):
    """The n most frequent keys, ties broken alphabetically."""
    return [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]


def wordpiece_vocab(lines):
    """{token: id}: BERT's special tokens, every character alone and as a continuation
    (`##c`), then whole words by frequency."""
    counts = word_counts(lines, lower=True)
    chars = sorted({c for w in counts for c in w})
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars]
    words = [w for w in frequent(counts, VOCAB_SIZE) if len(w) > 1]
    tokens += words[: VOCAB_SIZE - len(tokens)]
    return {t: i for i, t in enumerate(tokens)}


def unigram_vocab(lines):
    """[(piece, log-probability)] with XLM-R's layout: <s> <pad> </s> <unk>, pieces, <mask>
    last. Pieces are the word-start marker, every character, and frequent words with the
    marker; scores are log relative frequencies, rounded so they print the same always."""
    counts = word_counts(lines, lower=False)
    chars = collections.Counter()
    for w, n in counts.items():
        for c in w:
            chars[c] += n
    total = sum(counts.values()) + sum(chars.values())
    pieces = {"\u2581": sum(counts.values())}
    pieces.update(chars)
    for w in frequent(counts, VOCAB_SIZE):
        if len(w) > 1 and len(pieces) < VOCAB_SIZE:
            pieces["\u2581" + w] = counts[w]
    scored = [(p, round(math.log(n / total), 4)) for p, n in pieces.items()]
    scored.sort(key=lambda ps: (-ps[1], ps[0]))
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    return [(s, 0.0) for s in specials] + scored + [("<mask>", 0.0)]


def randomize(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn_like(p) * PARAM_STD
            if "LayerNorm.weight" in name:
                p.copy_(1.0 + noise)
            else:
                p.copy_(noise)


def build(family, lines):
    if family == "bert":
        tok = transformers.BertTokenizer(vocab=wordpiece_vocab(lines), model_max_length=100)
        config = transformers.BertConfig(
            vocab_size=len(tok), max_position_embeddings=128, num_labels=1, **SHAPE
        )
        model = transformers.BertForSequenceClassification(config)
    elif family == "electra":
        tok = transformers.ElectraTokenizer(vocab=wordpiece_vocab(lines))
        config = transformers.ElectraConfig(
            vocab_size=len(tok),
            embedding_size=16,
            max_position_embeddings=128,
            num_labels=2,
            id2label={0: "irrelevant", 1: "relevant"},
            label2id={"irrelevant": 0, "relevant": 1},
            **SHAPE,
        )
        model = transformers.ElectraForSequenceClassification(config)
    else:
        tok = transformers.XLMRobertaTokenizer(vocab=unigram_vocab(lines), model_max_length=512)
        config = transformers.XLMRobertaConfig(
            vocab_size=len(tok),
            # 128 positions after padding_idx + 1 = 2 reserved rows.
            max_position_embeddings=130,
            type_vocab_size=1,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            num_labels=1,
            **SHAPE,
        )
        model = transformers.XLMRobertaForSequenceClassification(config)
    randomize(model)
    model.eval()
    return tok, model


def f32_list(t):
    return [float(v) for v in t.to(torch.float32).tolist()]


def main():
    torch.manual_seed(SEED)
    lines = corpus_lines()
    for family in ["bert", "electra", "xlm-roberta"]:
        tok, model = build(family, lines)
        out = os.path.join(OUT, family)
        shutil.rmtree(out, ignore_errors=True)
        model.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
        rows = []
        for query, passage in PAIRS:
            enc = tok(query, passage, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
            with torch.no_grad():
                logits = model(**enc).logits[0]
            types = enc.get("token_type_ids")
            ids = enc["input_ids"][0].tolist()
            rows.append(
                dict(
                    query=query,
                    passage=passage,
                    input_ids=ids,
                    token_type_ids=types[0].tolist() if types is not None else [0] * len(ids),
                    logits=f32_list(logits),
                    score=float(logits[0] if logits.numel() == 1 else logits[1]),
                )
            )
        truncated = sum(len(r["input_ids"]) == MAX_LENGTH for r in rows)
        assert truncated == 2, f"{family}: {truncated} pairs reach MAX_LENGTH, expected 2"
        with open(os.path.join(out, "expected.json"), "w", encoding="utf-8") as f:
            json.dump(
                dict(
                    family=family,
                    max_length=MAX_LENGTH,
                    transformers=transformers.__version__,
                    pairs=rows,
                ),
                f,
                indent=1,
            )
            f.write("\n")
        size = sum(os.path.getsize(os.path.join(out, n)) for n in os.listdir(out))
        print(f"{out}: {len(rows)} pairs, {size} bytes, files {sorted(os.listdir(out))}")


if __name__ == "__main__":
    main()
