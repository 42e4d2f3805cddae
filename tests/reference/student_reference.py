#!/usr/bin/env python3
"""Writes tests/fixtures/student/: a tiny random BERT encoder and the gradient that
PyTorch (transformers' BertModel) computes for a fixed loss with respect to every
parameter, so the student's candle backward pass can be checked against it.

Files:
  - config.json, model.safetensors: a seeded random BertModel (no pooler), saved by
    transformers' config and safetensors exactly as a real checkpoint is, in float32.
  - grads.safetensors: d loss / d parameter for every parameter, under the same names,
    computed in float64 from the float32 weights (so the reference has no rounding of
    its own worth speaking of).
  - expected.json: the inputs (`input_ids` rows of different lengths, padded with 0 and
    masked), the fixed `direction`, the `embeddings` and the `loss`.

The loss: each row's hidden states are mean-pooled over its real tokens (as
sentence-transformers' Pooling does), L2-normalised, and projected on `direction`; the
loss is the mean of the projections over rows. Parameters are drawn wider than BERT's
initialiser (linear weights with standard deviation 0.2, layer norms around 1 and 0 with
0.1) so that attention is far from uniform and every nonlinearity matters: a transposed
weight, a missing mask or a wrong layer-norm gradient moves some gradient by far more
than the test's tolerance.

Run from the repository root:
    py=$(/work/shared/tools/peers-venv.sh)
    "$py" tests/reference/student_reference.py
"""

import json
import os

import torch
from safetensors.torch import save_file
from transformers import BertConfig, BertModel

SEED = 1234
OUT = os.path.join("tests", "fixtures", "student")
VOCAB = 60
HIDDEN = 32
# Rows of token ids: [CLS] = 2 ... [SEP] = 3, three lengths so that padding and its
# mask matter; the one-token row is all [CLS].
ROWS = [
    [2, 17, 5, 41, 8, 29, 3],
    [2, 33, 12, 3],
    [2],
]


def main():
    torch.manual_seed(SEED)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=16,
        type_vocab_size=2,
        layer_norm_eps=1e-12,
        pad_token_id=0,
    )
    config._attn_implementation = "eager"
    model = BertModel(config, add_pooling_layer=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm.weight" in name:
                p.normal_(1.0, 0.1)
            elif "LayerNorm.bias" in name:
                p.normal_(0.0, 0.1)
            else:
                p.normal_(0.0, 0.2)
    os.makedirs(OUT, exist_ok=True)
    config.to_json_file(os.path.join(OUT, "config.json"))
    weights = {n: p.detach().clone().contiguous() for n, p in model.named_parameters()}
    save_file(weights, os.path.join(OUT, "model.safetensors"))

    model = model.double().eval()
    length = max(len(r) for r in ROWS)
    ids = torch.tensor([r + [0] * (length - len(r)) for r in ROWS])
    mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in ROWS])
    direction = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(SEED + 1))
    direction = direction.float().double()

    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).double()
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    embeddings = torch.nn.functional.normalize(pooled, p=2, dim=1)
    loss = (embeddings @ direction).mean()
    loss.backward()
    grads = {n: p.grad.detach().clone().contiguous() for n, p in model.named_parameters()}
    save_file(grads, os.path.join(OUT, "grads.safetensors"))
    expected = {
        "input_ids": ROWS,
        "direction": direction.tolist(),
        "embeddings": embeddings.detach().tolist(),
        "loss": loss.item(),
    }
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
