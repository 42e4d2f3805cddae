#!/usr/bin/env python3
"""Build datasets/scifact-mini, the small BEIR-layout dataset shipped for the demo and tests.

Selection rule (deterministic, no randomness beyond a fixed hash):
  1. Take the first ANCHOR_QUERIES test queries in numeric id order and every passage
     they are judged relevant to.
  2. Add further passages in order of SHA-256 of their id until the corpus holds
     TOTAL_PASSAGES passages.
  3. Keep every test query whose judged passages are all in the corpus (the anchors, plus
     any other query whose passages step 2 happened to pick), with all its judgements.

Lines are copied byte for byte from the source files, in source order. Standard library
only. Usage: tools/make_scifact_mini.py [--source DIR] [--out DIR]
"""

import argparse
import hashlib
import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SOURCE = REPO.parent / "shared" / "datasets" / "scifact"
DEFAULT_OUT = REPO / "datasets" / "scifact-mini"

# ~100 queries give evaluation metrics that move visibly between a base and a fine-tuned
# model while the whole demo still runs in minutes on a laptop CPU.
ANCHOR_QUERIES = 100
# 500 passages (~0.8 MB) make retrieval non-trivial (about four distractors per relevant
# passage) while the shipped files stay under 1 MB.
TOTAL_PASSAGES = 500


def read_jsonl(path):
    """(id, raw line) for each non-blank line, in file order."""
    out = []
    with open(path, "rb") as f:
        for raw in f:
            if raw.strip():
                out.append((str(json.loads(raw)["_id"]), raw if raw.endswith(b"\n") else raw + b"\n"))
    return out


def read_qrels(path):
    """(query id, passage id, raw line) per row, skipping the header."""
    rows = []
    with open(path, "rb") as f:
        header = f.readline()
        for raw in f:
            if raw.strip():
                query, passage, _score = raw.decode("utf-8").rstrip("\r\n").split("\t")
                rows.append((query, passage, raw if raw.endswith(b"\n") else raw + b"\n"))
    return header, rows


def sort_key(query_id):
    return (0, int(query_id), "") if query_id.isdigit() else (1, 0, query_id)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    corpus = read_jsonl(args.source / "corpus.jsonl")
    queries = read_jsonl(args.source / "queries.jsonl")
    header, qrels = read_qrels(args.source / "qrels" / "test.tsv")

    relevant = {}
    for query, passage, _ in qrels:
        relevant.setdefault(query, set()).add(passage)

    anchors = sorted(relevant, key=sort_key)[:ANCHOR_QUERIES]
    chosen = set().union(*(relevant[q] for q in anchors))
    for passage_id in sorted((pid for pid, _ in corpus), key=lambda pid: hashlib.sha256(pid.encode()).hexdigest()):
        if len(chosen) >= TOTAL_PASSAGES:
            break
        chosen.add(passage_id)

    kept = {q for q, passages in relevant.items() if passages <= chosen}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "qrels").mkdir(exist_ok=True)
    with open(args.out / "corpus.jsonl", "wb") as f:
        f.writelines(raw for pid, raw in corpus if pid in chosen)
    with open(args.out / "queries.jsonl", "wb") as f:
        f.writelines(raw for qid, raw in queries if qid in kept)
    with open(args.out / "qrels" / "test.tsv", "wb") as f:
        f.write(header)
        f.writelines(raw for q, _, raw in qrels if q in kept)

    rows = sum(1 for q, _, _ in qrels if q in kept)
    print(f"{len(chosen)} passages, {len(kept)} queries, {rows} judgements -> {args.out}")


if __name__ == "__main__":
    main()
