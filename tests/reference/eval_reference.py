#!/usr/bin/env python3
"""Writes tests/fixtures/eval_reference.json: what pytrec_eval (BEIR's evaluator)
computes for a few runs, so distillery's src/eval/metrics.rs can be checked against it
without Python (the fixture is committed; CI never runs this script).

Each case holds the run (query -> list of [passage, score], in a shuffled order: input
order must not matter), the qrels, the EvalOptions to use, and pytrec_eval's values:
`expected` (query -> measure key -> value, only for the queries pytrec_eval evaluates)
and `expected_mean` (the plain mean over those queries, as BEIR averages).

Measures and their pytrec_eval names:
  ndcg_at_k      <- ndcg_cut_k
  recall_at_k    <- recall_k
  precision_at_k <- P_k
  mrr_at_k       <- recip_rank when its rank 1/recip_rank is <= k, else 0
                    (trec_eval's recip_rank restricted to the top k; derived from
                    pytrec_eval's value, not from a re-implemented ranking)

With ignore_identical_ids, passages whose id equals the query id are removed from the
run before pytrec_eval sees it, as BEIR's EvaluateRetrieval.evaluate does.

Scores are float32 values (what a distillery Run holds) written as the float64 of the
same value, so parsing back as f32 gives identical bits and ties stay ties.

Run from the repository root:
    py=$(/work/shared/tools/peers-venv.sh)
    "$py" tests/reference/eval_reference.py [--out PATH]
"""

import argparse
import importlib.metadata
import json
import os
import random
import struct

import pytrec_eval

DEFAULT_OUT = os.path.join("tests", "fixtures", "eval_reference.json")
NDCG_AT = [1, 3, 5, 10]
RECALL_AT = [1, 3, 5, 10, 100]
PRECISION_AT = [1, 3, 5, 10]
# 1000 exceeds every run's length here, so mrr_at_1000 is recip_rank itself.
MRR_AT = [1, 3, 10, 1000]
# Seed of the random case; any fixed value works, this one gives ties and misses.
SEED = 20240611


def f32(x):
    """x rounded to the nearest float32, as a Python float."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def options(ignore_identical_ids):
    return {
        "ndcg_at": NDCG_AT,
        "recall_at": RECALL_AT,
        "mrr_at": MRR_AT,
        "precision_at": PRECISION_AT,
        "ignore_identical_ids": ignore_identical_ids,
    }


def evaluate(run, qrels, ignore_identical_ids):
    """pytrec_eval's per-query values under distillery's measure keys."""
    as_dicts = {}
    for qid, results in run.items():
        scores = {pid: score for pid, score in results}
        assert len(scores) == len(results), f"duplicate passage in {qid}"
        if ignore_identical_ids:
            scores.pop(qid, None)
        as_dicts[qid] = scores
    measures = {
        "ndcg_cut." + ",".join(map(str, NDCG_AT)),
        "recall." + ",".join(map(str, RECALL_AT)),
        "P." + ",".join(map(str, PRECISION_AT)),
        "recip_rank",
    }
    raw = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(as_dicts)
    expected = {}
    for qid, values in raw.items():
        out = {}
        for k in NDCG_AT:
            out[f"ndcg_at_{k}"] = values[f"ndcg_cut_{k}"]
        for k in RECALL_AT:
            out[f"recall_at_{k}"] = values[f"recall_{k}"]
        for k in PRECISION_AT:
            out[f"precision_at_{k}"] = values[f"P_{k}"]
        rr = values["recip_rank"]
        first_relevant = round(1.0 / rr) if rr > 0 else None
        for k in MRR_AT:
            hit = first_relevant is not None and first_relevant <= k
            out[f"mrr_at_{k}"] = rr if hit else 0.0
        expected[qid] = out
    keys = sorted(next(iter(expected.values())).keys()) if expected else []
    mean = {key: sum(v[key] for v in expected.values()) / len(expected) for key in keys}
    return expected, mean


def case(name, run, qrels, ignore_identical_ids, rng):
    shuffled = {}
    for qid, results in run.items():
        results = [[pid, f32(score)] for pid, score in results]
        rng.shuffle(results)
        shuffled[qid] = results
    expected, mean = evaluate(shuffled, qrels, ignore_identical_ids)
    return {
        "name": name,
        "options": options(ignore_identical_ids),
        "run": shuffled,
        "qrels": qrels,
        "expected": expected,
        "expected_mean": mean,
    }


def hand_made(rng):
    run = {
        # b and c tie; a (grade 2) is past rank 3; d is unjudged.
        "graded": [("a", 0.5), ("b", 0.9), ("c", 0.9), ("d", 0.7), ("e", 0.1)],
        # All tie: byte order descending gives é, d9, d10, d1, D9.
        "tiebreak": [("d10", 1.0), ("d9", 1.0), ("D9", 1.0), ("é", 1.0), ("d1", 1.0)],
        "all_nonrelevant": [("x", 2.0), ("y", 1.0)],
        "empty": [],
        "negative_grade": [("n", 3.0), ("o", 1.0)],
        "run_only": [("a", 1.0)],
        "no_judgements": [("a", 1.0)],
        # The only relevant passage at rank 40: outside @10, inside @100.
        "deep": [(f"p{i:03d}", 100.0 - i) for i in range(1, 60)],
        # Scores that are equal only after rounding to float32.
        "f32_ties": [("u", 0.1), ("v", 0.10000000001), ("w", 0.3)],
    }
    qrels = {
        "graded": {"a": 2, "b": 1, "c": 0, "e": 1},
        "tiebreak": {"d9": 2, "D9": 1, "d10": 0, "é": 1},
        "all_nonrelevant": {"x": 0, "y": 0},
        "empty": {"r": 1},
        "negative_grade": {"n": -1, "o": 1},
        "qrels_only": {"a": 1},
        "no_judgements": {},
        "deep": {"p040": 1, "p999": 2},
        "f32_ties": {"u": 1, "v": 2},
    }
    return case("hand_made", run, qrels, False, rng)


def identical_ids(rng):
    # As in ArguAna: queries are corpus passages too; the query's own id is retrieved
    # first and must not count, though its judgement (here) stays in the ideal ranking.
    run = {
        "q1": [("q1", 0.99), ("p1", 0.8), ("p2", 0.7)],
        "q2": [("q2", 0.9), ("p3", 0.9), ("q1", 0.5)],
        "q3": [("q3", 1.0)],
    }
    qrels = {"q1": {"p1": 1, "q1": 1}, "q2": {"q1": 2, "p3": 1}, "q3": {"p9": 1}}
    return case("identical_ids", run, qrels, True, rng)


def random_case(rng):
    """Many queries, coarse scores (many ties), sparse graded judgements; some query ids
    are also passage ids so identical-id removal happens."""
    pool = [f"doc{i}" for i in range(300)]
    run, qrels = {}, {}
    for q in range(25):
        qid = f"doc{q * 7}" if q % 3 == 0 else f"q{q}"
        retrieved = rng.sample(pool, 120)
        if q % 3 == 0 and qid not in retrieved:
            retrieved[0] = qid
        # Five judgements among the retrieved, three that may not be retrieved at all.
        judged = rng.sample(retrieved, 5) + rng.sample(pool, 3)
        qrels[qid] = {pid: rng.choice([0, 1, 1, 2]) for pid in judged}
        # One decimal: about six passages share each score. Relevant passages score
        # higher on average so the top ranks hold some of them.
        run[qid] = [
            (pid, round(rng.uniform(0.0 if qrels[qid].get(pid, 0) > 0 else -1.0, 1.0), 1))
            for pid in retrieved
        ]
    return case("random", run, qrels, True, rng)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args()
    rng = random.Random(SEED)
    fixture = {
        "generator": "tests/reference/eval_reference.py",
        "pytrec_eval": importlib.metadata.version("pytrec-eval-terrier"),
        "cases": [hand_made(rng), identical_ids(rng), random_case(rng)],
    }
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(fixture, f, ensure_ascii=False, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
