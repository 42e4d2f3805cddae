#!/usr/bin/env python3
"""Writes the cross-encoder that score_throughput.sh times: a BertForSequenceClassification
of all-MiniLM-L6-v2's shape with random (seeded) weights, saved as a Hugging Face
checkpoint that both distillery and sentence-transformers load.

    py=$(/work/shared/tools/peers-venv.sh)
    "$py" benches/compare/make_ce_model.py OUT_DIR [--tokenizer-from DIR]

Shape: hidden 384, 6 layers, 12 heads, intermediate 1536, 512 positions, 2 token types,
GELU, layer norm eps 1e-12, num_labels 1 (one relevance logit per pair), the vocabulary
of all-MiniLM-L6-v2's WordPiece tokenizer, whose files (tokenizer.json,
tokenizer_config.json, vocab.txt, special_tokens_map.json) are copied unchanged. The
weights are transformers' own initialisation under a fixed torch seed, written with
save_pretrained(safe_serialization=True): OUT_DIR/model.safetensors (about 90 MB) and
config.json. A trained cross-encoder of this shape (ms-marco-MiniLM-L6) runs the same
arithmetic per token; random weights only make the scores meaningless, not cheaper.

The directory is not committed (its size); rerunning this script with the same torch
and transformers versions writes the same weights.
"""

import argparse
import os
import shutil
import sys

DEFAULT_TOKENIZER = "/work/shared/models/all-MiniLM-L6-v2"
# Copied byte for byte, so both sides tokenise with exactly the same vocabulary and rules.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
SEED = 20261122
# all-MiniLM-L6-v2's encoder shape (its config.json).
SHAPE = dict(
    hidden_size=384,
    num_hidden_layers=6,
    num_attention_heads=12,
    intermediate_size=1536,
    max_position_embeddings=512,
    type_vocab_size=2,
    hidden_act="gelu",
    layer_norm_eps=1e-12,
    pad_token_id=0,
)
# A larger spread than BERT's default 0.02, so that the logits of different pairs differ
# by far more than the 1e-4 the two implementations are compared at.
INITIALIZER_RANGE = 0.05


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="directory to write (created; files overwritten)")
    parser.add_argument(
        "--tokenizer-from",
        default=DEFAULT_TOKENIZER,
        help="all-MiniLM-L6-v2 directory whose tokenizer files are copied",
    )
    args = parser.parse_args()
    for name in ("tokenizer.json", "vocab.txt"):
        if not os.path.isfile(os.path.join(args.tokenizer_from, name)):
            sys.exit(f"{args.tokenizer_from}: no {name}; pass --tokenizer-from DIR")

    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(args.tokenizer_from)
    config = transformers.BertConfig(
        vocab_size=len(tokenizer),
        num_labels=1,
        initializer_range=INITIALIZER_RANGE,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        **SHAPE,
    )
    torch.manual_seed(SEED)
    model = transformers.BertForSequenceClassification(config).eval()

    os.makedirs(args.out_dir, exist_ok=True)
    model.save_pretrained(args.out_dir, safe_serialization=True)
    for name in TOKENIZER_FILES:
        src = os.path.join(args.tokenizer_from, name)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(args.out_dir, name))
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out_dir}: {params / 1e6:.1f}M parameters, vocab {config.vocab_size}, "
          f"seed {SEED}, transformers {transformers.__version__}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
