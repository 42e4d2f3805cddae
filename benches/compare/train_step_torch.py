#!/usr/bin/env python3
"""Training throughput of one optimizer step in PyTorch (CPU): the peer that
benches/train_step.rs is timed against in train_throughput.sh.

    py=$(/work/shared/tools/peers-venv.sh)
    "$py" benches/compare/train_step_torch.py [--model DIR] [--corpus FILE] [--steps 3]
        [--threads 2] [--json OUT]

The step is the one benches/train_step.rs times, built the same way:
  - 16 queries and 16 x 20 = 320 passages, every one exactly 128 tokens: the first 336
    SciFact passages (title + " " + text; 16 as queries, the rest as the lists in order),
    tokenised once before timing, truncated to 128 and filled by repeating each text's own
    tokens between [CLS] and [SEP] (no padding; both sides print the same checksum of the
    ids, which train_throughput.sh compares);
  - transformers' BertModel in train mode with dropout set to 0 (the recipe's), mean pooling
    over the attention mask and L2 normalisation (all-MiniLM-L6-v2's sentence embedding);
  - the recipe's loss: listwise KL (student T 0.05, teacher T 0.3, batchmean) + 0.1 x
    InfoNCE (T 0.01) over all 320 passages of the step, false negatives (teacher score >
    0.6 x the positive's) and the query's own positive left out of its negatives. This is a
    vectorised form of tests/reference/loss_reference.py's definitions (an additive -inf
    mask instead of per-query column selection); every passage id of the batch is distinct,
    so that script's de-duplication has nothing to do and the value is the same;
  - backward, torch.nn.utils.clip_grad_norm_(1.0), torch.optim.AdamW (lr 2e-4, weight
    decay 0.01, PyTorch's default betas and eps: the recipe's and distillery's).
Teacher scores are 1.0, 0.95, ..., 0.05 down every list, as on distillery's side.

One warm-up step, then --steps timed steps. Prints one JSON line:
{side, queries_per_step, steps, seconds, step_seconds, queries_per_second, losses,
token_checksum, threads, ...}. Model loading and tokenising are not timed.
"""

import os

# Before torch is imported: spinning OpenMP threads slow PyTorch badly on shared cores.
os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

DEFAULT_MODEL = os.environ.get("DISTILLERY_MINILM_DIR", "/work/shared/models/all-MiniLM-L6-v2")
DEFAULT_CORPUS = "/work/shared/datasets/scifact/corpus.jsonl"
# The micro-batch: queries per step, passages per query's list, tokens per text.
QUERIES = 16
LIST_LEN = 20
TOKENS = 128
# The recipe's loss constants (tests/reference/loss_reference.py holds the same).
STUDENT_TEMPERATURE = 0.05
TEACHER_TEMPERATURE = 0.3
INFONCE_TEMPERATURE = 0.01
INFONCE_WEIGHT = 0.1
FALSE_NEGATIVE_RATIO = 0.6
# The recipe's optimiser settings.
LR = 2e-4
WEIGHT_DECAY = 0.01
CLIP = 1.0
# Teacher scores fall by this much per list position from 1.0 at the positive.
SCORE_STEP = 0.05


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="BERT / sentence-transformers dir")
    parser.add_argument("--corpus", default=DEFAULT_CORPUS, help="BEIR corpus.jsonl")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--json", dest="json_out", help="also write the JSON here")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    return args


def read_texts(path, n):
    texts = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as err:
                sys.exit(f"{path}:{line_no}: bad JSON: {err}")
            title, text = doc.get("title") or "", doc.get("text") or ""
            joined = f"{title} {text}" if title else text
            if joined.strip():
                texts.append(joined)
            if len(texts) == n:
                return texts
    sys.exit(f"{path} holds {len(texts)} passages; the bench needs {n}")


def fill(ids):
    """[CLS] body... [SEP] -> exactly TOKENS ids, the body repeated to fill."""
    cls, body, sep = ids[0], ids[1:-1], ids[-1]
    if not body:
        sys.exit("a text tokenised to no content tokens")
    reps = (TOKENS - 2 + len(body) - 1) // len(body)
    return [cls] + (body * reps)[: TOKENS - 2] + [sep]


def checksum(rows):
    """benches/train_step.rs's checksum: sum of id * (flat position % 1000 + 1)."""
    flat = [i for row in rows for i in row]
    return sum(i * (k % 1000 + 1) for k, i in enumerate(flat))


def main():
    args = parse_args()
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        sys.exit(f"model directory not found: {args.model}")
    import torch
    import torch.nn.functional as F
    from transformers import AutoTokenizer, BertModel

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    texts = read_texts(args.corpus, QUERIES * (LIST_LEN + 1))
    ids = tokenizer(texts, truncation=True, max_length=TOKENS)["input_ids"]
    rows = [fill(r) for r in ids]
    token_sum = checksum(rows[:QUERIES]) + checksum(rows[QUERIES:])
    q_ids = torch.tensor(rows[:QUERIES])
    p_ids = torch.tensor(rows[QUERIES:])
    q_mask = torch.ones_like(q_ids)
    p_mask = torch.ones_like(p_ids)

    model = BertModel.from_pretrained(
        args.model, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        add_pooling_layer=False,
    )
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)

    scores = torch.tensor([1.0 - SCORE_STEP * j for j in range(LIST_LEN)]).repeat(QUERIES, 1)
    # InfoNCE columns: the flat passage index q * LIST_LEN + j. A query's own list entries
    # 1.. scored above the ratio are false negatives; its positive is the target.
    masked = torch.zeros(QUERIES, QUERIES * LIST_LEN, dtype=torch.bool)
    for q in range(QUERIES):
        for j in range(1, LIST_LEN):
            if scores[q, j] > FALSE_NEGATIVE_RATIO * scores[q, 0]:
                masked[q, q * LIST_LEN + j] = True
    targets = torch.arange(QUERIES) * LIST_LEN

    def embed(input_ids, mask):
        hidden = model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1)

    def step():
        optim.zero_grad(set_to_none=True)
        q = embed(q_ids, q_mask)
        p = embed(p_ids, p_mask)
        lists = p.reshape(QUERIES, LIST_LEN, -1)
        student = torch.einsum("qd,qld->ql", q, lists) / STUDENT_TEMPERATURE
        teacher = scores / TEACHER_TEMPERATURE
        kl = F.kl_div(F.log_softmax(student, -1), F.softmax(teacher, -1), reduction="batchmean")
        logits = (q @ p.T / INFONCE_TEMPERATURE).masked_fill(masked, float("-inf"))
        nce = F.cross_entropy(logits, targets)
        loss = kl + INFONCE_WEIGHT * nce
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        optim.step()
        return loss.item()

    start = time.perf_counter()
    losses = [step()]
    warmup = time.perf_counter() - start
    step_seconds = []
    for _ in range(args.steps):
        t = time.perf_counter()
        losses.append(step())
        step_seconds.append(time.perf_counter() - t)
    seconds = sum(step_seconds)
    if not all(map(lambda v: v == v and abs(v) != float("inf"), losses)):
        sys.exit(f"non-finite loss: {losses}")

    import transformers

    report = {
        "side": "torch",
        "queries_per_step": QUERIES,
        "passages_per_step": QUERIES * LIST_LEN,
        "tokens": TOKENS,
        "steps": args.steps,
        "seconds": seconds,
        "step_seconds": step_seconds,
        "warmup_seconds": warmup,
        "queries_per_second": QUERIES * args.steps / seconds,
        "losses": losses,
        "token_checksum": token_sum,
        "threads": args.threads,
        "parameters": sum(p.numel() for p in params),
        "attention": getattr(model.config, "_attn_implementation", None),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    line = json.dumps(report)
    print(line)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
