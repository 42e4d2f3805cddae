#!/usr/bin/env python3
"""Cross-encoder scoring throughput of sentence-transformers on PyTorch (CPU): the peer
that `distillery score` is timed against in score_throughput.sh.

    py=$(/work/shared/tools/peers-venv.sh)
    "$py" benches/compare/score_st.py --model DIR [--dataset DIR] [--queries 200]
        [--per-query 10] [--threads 2] [--json OUT] [--pairs-out PAIRS.jsonl]
        [--scores-out SCORES.jsonl] [--pairs-only]

The pairs (the same list every run, so both sides score identical inputs):
  - queries: the first QUERIES queries of queries.jsonl, in file order, that have a
    judgement in qrels/test.tsv;
  - passages per query: its judged passages with grade > 0 (qrels file order), then
    passages taken from corpus.jsonl in file order by one cursor shared by all queries
    (each query continues where the previous one stopped, skipping its own judged
    passages), up to PER_QUERY; passage text is title + " " + text (text alone when
    the title is empty), BEIR's convention;
  - id "<query id>:<passage id>".
--pairs-out writes them as distillery's pairs JSONL ({"id", "query", "passage"});
--pairs-only stops there (no torch import).

Scoring: sentence_transformers.CrossEncoder(model, device="cpu", max_length=512),
predict(pairs, batch_size=32) with the identity as activation, so the scores are the raw
logits distillery writes (the default for one label would be a sigmoid; its cost is
nothing next to the encoder). predict() sorts pairs by length internally, as distillery
does. A warm-up predict on the first 32 pairs runs first; only the full predict call is
timed (no model load, no file reading). Prints one JSON line: {pairs, seconds,
pairs_per_second, threads, ...}. --scores-out writes {"id", "score"} per pair, in pair
order, for the agreement check.
"""

import os

# Before torch is imported: spinning OpenMP threads slow PyTorch badly on shared cores.
os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

DEFAULT_DATASET = "/work/shared/datasets/scifact"
# 200 queries x 10 passages: 2,000 pairs, about a minute per run on two cores for a
# MiniLM-L6-shaped model, long enough that timer and warm-up effects are negligible.
DEFAULT_QUERIES = 200
DEFAULT_PER_QUERY = 10
# sentence-transformers' default predict batch size.
BATCH_SIZE = 32
# The model's position limit: SciFact abstracts are mostly shorter, a few are cut.
MAX_LENGTH = 512
# Pairs scored once before timing: one batch, enough for PyTorch's first-call
# allocations and kernel selection.
WARMUP_PAIRS = 32


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="cross-encoder directory (make_ce_model.py OUT_DIR)")
    parser.add_argument("--dataset", default=DEFAULT_DATASET, help="BEIR dataset directory")
    parser.add_argument("--queries", type=int, default=DEFAULT_QUERIES)
    parser.add_argument("--per-query", type=int, default=DEFAULT_PER_QUERY)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--json", dest="json_out", help="also write the JSON here")
    parser.add_argument("--pairs-out", help="write the pairs as distillery pairs JSONL")
    parser.add_argument("--scores-out", help="write {id, score} JSON lines, in pair order")
    parser.add_argument("--pairs-only", action="store_true", help="write --pairs-out and stop")
    args = parser.parse_args()
    if args.queries <= 0 or args.per_query <= 0:
        sys.exit("--queries and --per-query must be positive")
    if args.pairs_only and not args.pairs_out:
        sys.exit("--pairs-only needs --pairs-out")
    if not args.pairs_only and not args.model:
        sys.exit("--model is required (make one with make_ce_model.py)")
    return args


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as err:
                sys.exit(f"{path}:{line_no}: bad JSON: {err}")


def read_positives(path):
    """query id -> judged passage ids with grade > 0, in file order."""
    positives = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            cols = line.rstrip("\n").split("\t")
            if line_no == 1 and cols[0] in ("query-id", "query_id"):
                continue
            if len(cols) != 3:
                sys.exit(f"{path}:{line_no}: expected 3 tab-separated columns")
            try:
                grade = int(cols[2])
            except ValueError:
                sys.exit(f"{path}:{line_no}: grade {cols[2]!r} is not an integer")
            ids = positives.setdefault(cols[0], [])
            if grade > 0:
                ids.append(cols[1])
    return positives


def build_pairs(dataset, n_queries, per_query):
    """[(id, query, passage)], as the module docstring describes."""
    positives = read_positives(os.path.join(dataset, "qrels", "test.tsv"))
    corpus = {}
    order = []
    for doc in read_jsonl(os.path.join(dataset, "corpus.jsonl")):
        pid = str(doc["_id"])
        title = doc.get("title") or ""
        text = doc.get("text") or ""
        corpus[pid] = f"{title} {text}" if title else text
        order.append(pid)
    if not order:
        sys.exit(f"{dataset}: empty corpus")
    pairs = []
    cursor = 0
    queries = 0
    for q in read_jsonl(os.path.join(dataset, "queries.jsonl")):
        qid = str(q["_id"])
        if qid not in positives:
            continue
        chosen = [p for p in positives[qid] if p in corpus][:per_query]
        judged = set(positives[qid])
        while len(chosen) < per_query:
            pid = order[cursor % len(order)]
            cursor += 1
            if pid not in judged and pid not in chosen:
                chosen.append(pid)
        pairs.extend((f"{qid}:{pid}", q["text"], corpus[pid]) for pid in chosen)
        queries += 1
        if queries == n_queries:
            break
    return pairs


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main():
    args = parse_args()
    pairs = build_pairs(args.dataset, args.queries, args.per_query)
    if args.pairs_out:
        write_jsonl(args.pairs_out, ({"id": i, "query": q, "passage": p} for i, q, p in pairs))
    if args.pairs_only:
        print(json.dumps({"pairs": len(pairs), "pairs_out": args.pairs_out}))
        return
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        sys.exit(f"model directory not found: {args.model} (make it with make_ce_model.py)")

    import torch
    from sentence_transformers import CrossEncoder

    torch.set_num_threads(args.threads)
    model = CrossEncoder(args.model, device="cpu", max_length=MAX_LENGTH)
    inputs = [[q, p] for _, q, p in pairs]
    identity = torch.nn.Identity()

    model.predict(inputs[:WARMUP_PAIRS], batch_size=BATCH_SIZE, activation_fn=identity,
                  show_progress_bar=False)
    start = time.perf_counter()
    scores = model.predict(inputs, batch_size=BATCH_SIZE, activation_fn=identity,
                           show_progress_bar=False, convert_to_numpy=True)
    seconds = time.perf_counter() - start
    if len(scores) != len(pairs):
        sys.exit(f"predict returned {len(scores)} scores for {len(pairs)} pairs")
    if args.scores_out:
        write_jsonl(args.scores_out, ({"id": i, "score": float(s)} for (i, _, _), s in zip(pairs, scores)))

    result = {
        "pairs": len(pairs),
        "seconds": seconds,
        "pairs_per_second": len(pairs) / seconds,
        "threads": torch.get_num_threads(),
        "batch_size": BATCH_SIZE,
        "max_length": MAX_LENGTH,
        "torch": torch.__version__,
    }
    line = json.dumps(result)
    print(line)
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
