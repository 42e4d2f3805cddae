"""Checks that a model directory exported by `distillery train` loads with
sentence-transformers and gives the embeddings distillery gives, to 1e-5.

usage:
  PEERS_EXTRA=pyarrow py=$(../shared/tools/peers-venv.sh)
  "$py" tests/reference/check_st_export.py MODEL_DIR [--bin target/release/distillery]

It embeds a fixed set of texts as passages and as queries with `distillery embed --kind`
(the model's prompts applied) and with `SentenceTransformer(MODEL_DIR)`: `encode(...,
prompt_name=...)` for a model of one encoder; for a query/document Router (the export of
query-tower training) `encode_query` and `encode_document`, its routes, which must differ
from each other. It prints the largest absolute difference per kind. Exit status 1 when
one exceeds 1e-5 (or a Router's routes embed alike). Checked with sentence-transformers
6.3 and 5.7 (`PYTHONPATH` to an unpacked 5.x wheel).
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
# A Router's query and document routes must embed the same text differently by more than
# float noise (one was fine-tuned).
ROUTES_APART = 1e-4


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    default_bin = os.path.join(
        os.environ.get("CARGO_TARGET_DIR", "target"), "release", "distillery"
    )
    ap.add_argument("--bin", default=default_bin)
    args = ap.parse_args()

    model = SentenceTransformer(args.model_dir, device="cpu")
    with open(os.path.join(args.model_dir, "modules.json")) as f:
        router = any(m["type"].endswith("Router") for m in json.load(f))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("passage", "query"):
            ours = embed_with_distillery(args.bin, args.model_dir, kind, tmp)
            if router:
                # The Router's own routes: encode_query and encode_document.
                encode = model.encode_query if kind == "query" else model.encode_document
                theirs = encode(TEXTS, convert_to_numpy=True)
                prompt = "route " + ("query" if kind == "query" else "document")
            else:
                prompt = kind if kind in (model.prompts or {}) else None
                theirs = model.encode(TEXTS, prompt_name=prompt, convert_to_numpy=True)
            diff = float(np.abs(ours - theirs).max())
            results.append({"kind": kind, "prompt_name": prompt, "max_abs_diff": diff})
    worst = max(r["max_abs_diff"] for r in results)
    routes_apart = None
    if router:
        # The routes must be two encoders: were both the base model (or both the
        # fine-tuned one), the comparison above could pass with the wrong one.
        q = model.encode_query(TEXTS, convert_to_numpy=True)
        d = model.encode_document(TEXTS, convert_to_numpy=True)
        routes_apart = float(np.abs(q - d).max())
    ok = worst <= TOLERANCE and (routes_apart is None or routes_apart > ROUTES_APART)
    print(json.dumps({
        "model_dir": args.model_dir,
        "router": router,
        "routes_apart": routes_apart,
        "texts": len(TEXTS),
        "results": results,
        "tolerance": TOLERANCE,
        "ok": ok,
    }))
    sys.exit(0 if ok else 1)


def embed_with_distillery(binary, model_dir, kind, tmp):
    """TEXTS embedded as `kind` (passage or query) by `distillery embed`."""
    path = os.path.join(tmp, kind + ".jsonl")
    with open(path, "w") as f:
        for i, t in enumerate(TEXTS):
            if kind == "passage":
                f.write(json.dumps({"_id": str(i), "title": "", "text": t}) + "\n")
            else:
                f.write(json.dumps({"_id": str(i), "text": t}) + "\n")
    out = os.path.join(tmp, kind + ".parquet")
    subprocess.run(
        [binary, "embed", "--model", model_dir, "--input", path, "--kind", kind,
         "--output", out, "--quiet"],
        check=True,
    )
    table = pq.read_table(out)
    return np.array(table.column("embedding").to_pylist(), dtype=np.float32)


if __name__ == "__main__":
    main()
