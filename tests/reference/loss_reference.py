"""Reference values for src/train/loss.rs, computed with PyTorch in float64.

Builds one fixed batch (4 queries, lists of 5, 8 dimensions; query 2's list holds 3
entries; passages shared between lists exercise de-duplication, copies of a positive and
false negatives found through another list), computes the three loss modes and their
gradients with respect to the L2-normalised query and passage embeddings, and writes
tests/fixtures/loss_reference.json.

The formulation is written independently of the Rust one: the KL term is one
`F.kl_div(..., reduction="sum")` per query over its valid entries only (divided by the
number of queries: PyTorch's "batchmean"), and InfoNCE selects each query's candidate
columns by index and applies `F.cross_entropy`, with no additive mask.

Run: py=$(/work/shared/tools/peers-venv.sh); $py tests/reference/loss_reference.py
"""

import json
import os

import torch
import torch.nn.functional as F

SEED = 20240611
DIM = 8
LIST_LEN = 5
STUDENT_TEMPERATURE = 0.05
TEACHER_TEMPERATURE = 0.3
INFONCE_TEMPERATURE = 0.01
INFONCE_WEIGHT = 0.1
FALSE_NEGATIVE_RATIO = 0.6
# How far passages scatter around a common direction, and queries around their positive:
# cosines within a few hundredths of each other, logits within a few nats at T = 0.01.
SPREAD = 0.1
QUERY_NOISE = 0.05

# Per query: (passage ids, teacher scores), teacher order, the first the positive. A
# passage occurring in several lists enters InfoNCE once, at its first occurrence.
# - query 0: passage 11 scores 0.8 > 0.6: a false negative of query 0 (also in query 3's list).
# - query 1: 0.55 is below 0.6 x 1.0: no false negative; its positive 20 recurs in query 3.
# - query 2: a short list (3 of 5); its positive 22 occurs earlier, as a hard negative of
#   query 1, and that copy is dropped for query 2; 31 scores 0.7 > 0.6 x 0.9; 12 also in
#   query 0's list.
# - query 3: passage 20 (query 1's positive) scores 0.65 > 0.6: a false negative of query 3
#   whose first occurrence in the batch is query 1's positive; 11 is a copy of query 0's.
LISTS = [
    ([10, 11, 12, 13, 14], [1.0, 0.8, 0.5, 0.3, 0.1]),
    ([20, 21, 22, 23, 24], [1.0, 0.55, 0.4, 0.2, 0.0]),
    ([22, 31, 12], [0.9, 0.7, 0.2]),
    ([40, 20, 41, 11, 43], [1.0, 0.65, 0.3, 0.25, 0.05]),
]


def build_batch():
    """Embeddings clustered around one direction, each query near its positive, so that at
    InfoNCE's temperature every candidate (and every masking decision) moves the loss."""
    gen = torch.Generator().manual_seed(SEED)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q_count = len(LISTS)
    base = randn(DIM)
    passages = torch.zeros(q_count, LIST_LEN, DIM, dtype=torch.float64)
    by_id = {}
    for i, (ids, _) in enumerate(LISTS):
        for j, pid in enumerate(ids):
            if pid not in by_id:
                by_id[pid] = F.normalize(base + SPREAD * randn(DIM), dim=-1)
            # One passage, one embedding, wherever it occurs.
            passages[i, j] = by_id[pid]
    queries = F.normalize(passages[:, 0] + QUERY_NOISE * randn(q_count, DIM), dim=-1)
    # Round through float32 so the float32 Rust run starts from exactly these values.
    queries = queries.float().double()
    passages = passages.float().double()
    scores = [[float(torch.tensor(s, dtype=torch.float32)) for s in ss] for _, ss in LISTS]
    return queries, passages, scores


def listwise_kl(queries, passages, scores):
    total = 0.0
    for i, (ids, _) in enumerate(LISTS):
        n = len(ids)
        student = passages[i, :n] @ queries[i] / STUDENT_TEMPERATURE
        teacher = torch.tensor(scores[i], dtype=torch.float64) / TEACHER_TEMPERATURE
        total = total + F.kl_div(
            F.log_softmax(student, dim=-1), F.softmax(teacher, dim=-1), reduction="sum"
        )
    return total / len(LISTS)


def infonce_candidates(scores):
    """Per query, the flat indices (i * LIST_LEN + j) of its candidates and its target."""
    first = {}
    for i, (ids, _) in enumerate(LISTS):
        for j, pid in enumerate(ids):
            first.setdefault(pid, i * LIST_LEN + j)
    out = []
    for i, (ids, _) in enumerate(LISTS):
        top = scores[i][0]
        dropped = {ids[0]} | {
            pid for pid, s in zip(ids[1:], scores[i][1:]) if s > FALSE_NEGATIVE_RATIO * top
        }
        target = i * LIST_LEN
        columns = [target] + sorted(k for pid, k in first.items() if pid not in dropped)
        out.append(columns)
    return out


def infonce(queries, passages, scores):
    flat = passages.reshape(-1, DIM)
    losses = []
    for i, columns in enumerate(infonce_candidates(scores)):
        logits = flat[columns] @ queries[i] / INFONCE_TEMPERATURE
        # The target is always column 0 of the selection.
        losses.append(F.cross_entropy(logits.unsqueeze(0), torch.tensor([0])))
    return torch.stack(losses).mean()


def run_mode(mode, queries0, passages0, scores):
    queries = queries0.clone().requires_grad_(True)
    passages = passages0.clone().requires_grad_(True)
    kl = listwise_kl(queries, passages, scores) if mode != "infonce" else None
    nce = infonce(queries, passages, scores) if mode != "listwise" else None
    if mode == "listwise_infonce":
        total = kl + INFONCE_WEIGHT * nce
    else:
        total = kl if kl is not None else nce
    total.backward()
    return {
        "total": total.item(),
        "kl": None if kl is None else kl.item(),
        "infonce": None if nce is None else nce.item(),
        "grad_queries": queries.grad.tolist(),
        "grad_passages": passages.grad.tolist(),
    }


def main():
    queries, passages, scores = build_batch()
    fixture = {
        "generated_by": "tests/reference/loss_reference.py (PyTorch %s, float64)" % torch.__version__,
        "list_len": LIST_LEN,
        "passage_ids": [ids for ids, _ in LISTS],
        "scores": scores,
        "queries": queries.tolist(),
        "passages": passages.tolist(),
        "infonce_candidates": infonce_candidates(scores),
        "modes": {
            mode: run_mode(mode, queries, passages, scores)
            for mode in ["listwise_infonce", "listwise", "infonce"]
        },
    }
    out = os.path.join(os.path.dirname(__file__), "..", "fixtures", "loss_reference.json")
    with open(out, "w") as f:
        json.dump(fixture, f, indent=1)
        f.write("\n")
    for mode, values in fixture["modes"].items():
        print(mode, values["total"], values["kl"], values["infonce"])
    print("candidates", fixture["infonce_candidates"])


if __name__ == "__main__":
    main()
