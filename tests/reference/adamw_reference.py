"""Reference values for src/train/optim.rs's AdamW, computed with torch.optim.AdamW.

Two float32 parameters (3x4 and 5) take six steps with seeded gradients at a learning
rate that changes every step, with betas (0.8, 0.95), eps 1e-6 and weight decay 0.05: values
far enough apart that a swapped beta, a bias correction of the wrong step or a decay
applied after the update each move the result by far more than float32 rounding. The
second parameter has no gradient at step 3 (PyTorch skips it: its moments and its own step
count stay as they were). Writes tests/fixtures/adamw_reference.json: the initial values,
every step's learning rate and gradients, and both parameters after every step.

Run: py=$(/work/shared/tools/peers-venv.sh); $py tests/reference/adamw_reference.py
"""

import json
import os

import torch

SEED = 20261207
LRS = [1e-2, 3e-2, 2e-2, 5e-2, 1e-2, 4e-3]
SKIP = {(3, 1)}  # (step, parameter) without a gradient; steps count from 1
BETAS = (0.8, 0.95)
EPS = 1e-6
WEIGHT_DECAY = 0.05


def main():
    g = torch.Generator().manual_seed(SEED)
    shapes = [(3, 4), (5,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float32)) for s in shapes]
    initial = [p.detach().flatten().tolist() for p in params]
    opt = torch.optim.AdamW(params, lr=LRS[0], betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    steps = []
    for step, lr in enumerate(LRS, start=1):
        for group in opt.param_groups:
            group["lr"] = lr
        grads = []
        for i, p in enumerate(params):
            grad = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if (step, i) in SKIP:
                p.grad = None
                grads.append(None)
            else:
                p.grad = grad
                grads.append(grad.flatten().tolist())
        opt.step()
        steps.append({
            "lr": lr,
            "grads": grads,
            "after": [p.detach().flatten().tolist() for p in params],
        })
    out = {
        "shapes": [list(s) for s in shapes],
        "beta1": BETAS[0],
        "beta2": BETAS[1],
        "eps": EPS,
        "weight_decay": WEIGHT_DECAY,
        "initial": initial,
        "steps": steps,
        "torch": torch.__version__,
    }
    path = os.path.join(os.path.dirname(__file__), "..", "fixtures", "adamw_reference.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
