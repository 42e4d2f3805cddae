#!/usr/bin/env python3
"""Reference for tests/train_step_reference.rs: the gradient of one whole training step
(student forward, recipe loss, backward) with respect to every student parameter,
computed with PyTorch and transformers' BertModel in float64.

The student is the committed tiny BERT of tests/fixtures/student/ (config.json,
model.safetensors; written by student_reference.py). The batch is fixed here as token
ids, so no tokenizer is involved on either side:

  - 4 queries, lists of at most LIST_LEN = 4 passages in teacher order (the first the
    positive, its score the largest); query 2's list holds 3, so padding is exercised;
  - passage 12 is in the lists of queries 0 and 1 (one passage, one token sequence: it
    enters InfoNCE once, at its first occurrence);
  - passage 11 scores 0.8 > 0.6 x 1.0 for query 0: a false negative, out of query 0's
    InfoNCE candidates;
  - passage 20, query 1's positive, is a (kept, 0.5 < 0.6) hard negative of query 3.

Embeddings are the student's: the last hidden states mean-pooled over the attention mask,
then L2-normalised. The three loss modes are the definitions of loss_reference.py (its
constants are imported; its functions hard-code that script's batch, so the same
formulation is written here over this batch: one `F.kl_div(..., reduction="sum")` per
query over its valid entries divided by the number of queries, and InfoNCE as
`F.cross_entropy` over each query's selected candidate columns).

The same step with the passage encoder frozen (query-tower training) is computed for the
recipe's mode: the passages are embedded by the same weights but detached, so the
gradient flows through the queries alone.

Writes tests/fixtures/train_step/:
  - batch.json: token ids, passage ids, scores (rounded through float32, as the Rust side
    holds them), the InfoNCE candidate columns, and per mode the loss values;
  - grads.safetensors: `<mode>/<parameter>` for every mode and every parameter under its
    Hugging Face name, and `frozen_<mode>/<parameter>` for the frozen step, float32 (rounded once from the float64 result; the test's 1e-4
    tolerance is far above that rounding).

Run from the repository root:
    py=$(/work/shared/tools/peers-venv.sh)
    "$py" tests/reference/train_step_reference.py
"""

import json
import os
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertModel

sys.path.insert(0, os.path.dirname(__file__))
from loss_reference import (  # noqa: E402
    FALSE_NEGATIVE_RATIO,
    INFONCE_TEMPERATURE,
    INFONCE_WEIGHT,
    STUDENT_TEMPERATURE,
    TEACHER_TEMPERATURE,
)

STUDENT = os.path.join("tests", "fixtures", "student")
OUT = os.path.join("tests", "fixtures", "train_step")
SEED = 7
LIST_LEN = 4
# The fixture's vocabulary is 60 ids with [PAD] = 0, [CLS] = 2, [SEP] = 3; content tokens
# are drawn from 5..60. Its position embeddings hold 16, the longest sequence.
CLS, SEP, FIRST_CONTENT, VOCAB, MAX_LEN = 2, 3, 5, 60, 16
MODES = ["listwise_infonce", "listwise", "infonce"]
# The frozen passage encoder is checked in the recipe's mode.
FROZEN_MODES = ["listwise_infonce"]

# Per query: (passage ids, teacher scores), teacher order.
LISTS = [
    ([10, 11, 12, 13], [1.0, 0.8, 0.5, 0.3]),
    ([20, 21, 12, 23], [0.9, 0.5, 0.4, 0.1]),
    ([30, 31, 32], [1.0, 0.4, 0.2]),
    ([40, 20, 41, 42], [1.0, 0.5, 0.3, 0.0]),
]


def random_tokens(gen, lo, hi):
    """[CLS] + between lo and hi content tokens + [SEP]."""
    n = int(torch.randint(lo, hi + 1, (1,), generator=gen))
    body = torch.randint(FIRST_CONTENT, VOCAB, (n,), generator=gen).tolist()
    return [CLS] + body + [SEP]


def build_tokens():
    gen = torch.Generator().manual_seed(SEED)
    queries = [random_tokens(gen, 1, 6) for _ in LISTS]
    by_id = {}
    for ids, _ in LISTS:
        for pid in ids:
            if pid not in by_id:
                by_id[pid] = random_tokens(gen, 2, MAX_LEN - 2)
    passages = [[by_id[pid] for pid in ids] for ids, _ in LISTS]
    return queries, passages


def load_model():
    config = BertConfig.from_json_file(os.path.join(STUDENT, "config.json"))
    config._attn_implementation = "eager"
    model = BertModel(config, add_pooling_layer=False)
    weights = load_file(os.path.join(STUDENT, "model.safetensors"))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected, unexpected
    # Only buffers (position ids) may be missing; every parameter comes from the file.
    params = {n for n, _ in model.named_parameters()}
    assert not (params & set(missing)), missing
    return model.double().eval()


def embed(model, rows):
    length = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (length - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows])
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).double()
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return F.normalize(pooled, p=2, dim=1)


def listwise_kl(q, p, scores):
    total = 0.0
    for i, (ids, _) in enumerate(LISTS):
        n = len(ids)
        student = p[i, :n] @ q[i] / STUDENT_TEMPERATURE
        teacher = torch.tensor(scores[i], dtype=torch.float64) / TEACHER_TEMPERATURE
        total = total + F.kl_div(
            F.log_softmax(student, dim=-1), F.softmax(teacher, dim=-1), reduction="sum"
        )
    return total / len(LISTS)


def infonce_candidates(scores):
    """Per query, the flat indices (i * LIST_LEN + j) of its candidates, target first."""
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
        columns = [i * LIST_LEN] + sorted(k for pid, k in first.items() if pid not in dropped)
        out.append(columns)
    return out


def infonce(q, p, scores):
    flat = p.reshape(-1, p.shape[-1])
    losses = []
    for i, columns in enumerate(infonce_candidates(scores)):
        logits = flat[columns] @ q[i] / INFONCE_TEMPERATURE
        losses.append(F.cross_entropy(logits.unsqueeze(0), torch.tensor([0])))
    return torch.stack(losses).mean()


def run_mode(mode, model, queries, passages, scores, frozen=False):
    model.zero_grad(set_to_none=True)
    q = embed(model, queries)
    flat = embed(model, [row for rows in passages for row in rows])
    if frozen:
        # A frozen passage encoder: the passages' embeddings are constants.
        flat = flat.detach()
    # [Q, L, d] with zero rows in the padding slots (never read by either loss).
    p = torch.zeros(len(LISTS), LIST_LEN, q.shape[1], dtype=torch.float64)
    at = 0
    for i, rows in enumerate(passages):
        p[i, : len(rows)] = flat[at : at + len(rows)]
        at += len(rows)
    kl = listwise_kl(q, p, scores) if mode != "infonce" else None
    nce = infonce(q, p, scores) if mode != "listwise" else None
    if mode == "listwise_infonce":
        total = kl + INFONCE_WEIGHT * nce
    else:
        total = kl if kl is not None else nce
    total.backward()
    prefix = "frozen_" + mode if frozen else mode
    grads = {
        "%s/%s" % (prefix, n): p_.grad.detach().float().contiguous()
        for n, p_ in model.named_parameters()
    }
    values = {
        "total": total.item(),
        "kl": None if kl is None else kl.item(),
        "infonce": None if nce is None else nce.item(),
    }
    return values, grads


def main():
    torch.manual_seed(SEED)
    model = load_model()
    queries, passages = build_tokens()
    scores = [[float(torch.tensor(s, dtype=torch.float32)) for s in ss] for _, ss in LISTS]
    os.makedirs(OUT, exist_ok=True)
    all_grads = {}
    modes = {}
    for mode in MODES:
        values, grads = run_mode(mode, model, queries, passages, scores)
        modes[mode] = values
        all_grads.update(grads)
        print(mode, values)
    frozen_modes = {}
    for mode in FROZEN_MODES:
        values, grads = run_mode(mode, model, queries, passages, scores, frozen=True)
        frozen_modes[mode] = values
        all_grads.update(grads)
        print("frozen", mode, values)
    save_file(all_grads, os.path.join(OUT, "grads.safetensors"))
    fixture = {
        "generated_by": "tests/reference/train_step_reference.py (PyTorch %s, float64)"
        % torch.__version__,
        "list_len": LIST_LEN,
        "query_tokens": queries,
        "passage_tokens": passages,
        "passage_ids": [ids for ids, _ in LISTS],
        "scores": scores,
        "infonce_candidates": infonce_candidates(scores),
        "modes": modes,
        "frozen_modes": frozen_modes,
    }
    # One key per line, each value compact: the token lists stay readable.
    lines = ["  %s: %s" % (json.dumps(k), json.dumps(v)) for k, v in fixture.items()]
    with open(os.path.join(OUT, "batch.json"), "w") as f:
        f.write("{\n" + ",\n".join(lines) + "\n}\n")
    print("candidates", fixture["infonce_candidates"])


if __name__ == "__main__":
    main()
