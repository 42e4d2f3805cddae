"""Checks that a model directory exported by `distillery train` loads with
sentence-transformers and gives the embeddings distillery gives, to 1e-5.

usage:
  PEERS_EXTRA=pyarrow py=$(../shared/tools/peers-venv.sh)
  "$py" tests/reference/check_st_export.py MODEL_DIR [--bin target/release/distillery]

It embeds a fixed set of texts as passages with `distillery embed` (the model's passage
prompt applied) and with `SentenceTransformer(MODEL_DIR).encode(..., prompt_name=...)`,
and prints the largest absolute difference. Exit status 1 when it exceeds 1e-5.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402

TEXTS = [
    "Microstructural development of human newborn cerebral white matter.",
    "Alterations of the architecture of cerebral white matter in the developing brain.",
    "A man is eating food.",
    "0-dimensional biomaterials lack inductive properties.",
    "Vitamin D deficiency is associated with increased risk of fractures in older adults.",
]
TOLERANCE = 1e-5


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    default_bin = os.path.join(
        os.environ.get("CARGO_TARGET_DIR", "target"), "release", "distillery"
    )
    ap.add_argument("--bin", default=default_bin)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "texts.jsonl")
        with open(corpus, "w") as f:
            for i, t in enumerate(TEXTS):
                f.write(json.dumps({"_id": str(i), "title": "", "text": t}) + "\n")
        out = os.path.join(tmp, "emb.parquet")
        subprocess.run(
            [args.bin, "embed", "--model", args.model_dir, "--input", corpus,
             "--output", out, "--quiet"],
            check=True,
        )
        table = pq.read_table(out)
        ours = np.array(table.column("embedding").to_pylist(), dtype=np.float32)

    model = SentenceTransformer(args.model_dir, device="cpu")
    prompt = "passage" if "passage" in (model.prompts or {}) else None
    theirs = model.encode(TEXTS, prompt_name=prompt, convert_to_numpy=True)
    diff = float(np.abs(ours - theirs).max())
    print(json.dumps({
        "model_dir": args.model_dir,
        "prompt_name": prompt,
        "texts": len(TEXTS),
        "dim": int(theirs.shape[1]),
        "max_abs_diff": diff,
        "tolerance": TOLERANCE,
        "ok": diff <= TOLERANCE,
    }))
    sys.exit(0 if diff <= TOLERANCE else 1)


if __name__ == "__main__":
    main()
