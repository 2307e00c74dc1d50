"""Reference script for the zoo's golden numbers (``golden_zoo.json`` next to this file).

Each registered model is built at ``torch.manual_seed(0)`` with small settings, moved to float64,
put in eval mode and run on a fixed input drawn from ``torch.Generator().manual_seed(1)``. The
recorded numbers (parameter count, Σ params, Σ |params|, Σ logits, Σ logits², the first three
logits) pin down architecture *and* init: a change to either shows up as a test failure, and a
deliberate change is re-recorded with::

    python tests/models/make_golden_zoo.py
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ntkit.models import build_model

GOLDEN = Path(__file__).with_name("golden_zoo.json")

# name -> (builder kwargs, input shape, vocab size for token inputs or None for images)
SPECS: dict[str, tuple[dict, tuple[int, ...], int | None]] = {
    "bert_mlm": ({"vocab_size": 50, "max_len": 16}, (2, 12), 50),
    "switch_mlm": ({"vocab_size": 50, "max_len": 16}, (2, 12), 50),
    "vgg16": ({"width": 0.125}, (2, 3, 32, 32), None),
    "resnet56": ({"width": 0.25}, (2, 3, 32, 32), None),
    "lenet300_100": ({}, (2, 1, 28, 28), None),
    "lenet5_caffe": ({}, (2, 1, 28, 28), None),
    "conv4": ({}, (2, 3, 32, 32), None),
    "vit_tiny": ({}, (2, 1, 8, 8), None),
}


def compute(name: str) -> dict[str, float | int | list[float]]:
    """The golden record of model ``name`` (see the module docstring)."""
    kw, shape, vocab = SPECS[name]
    torch.manual_seed(0)
    model = build_model(name, **kw).double().eval()
    gen = torch.Generator().manual_seed(1)
    if vocab is None:
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
    else:
        x = torch.randint(0, vocab, shape, generator=gen)
    with torch.no_grad():
        out = model(x)
        params = list(model.parameters())
        return {
            "num_params": sum(p.numel() for p in params),
            "param_sum": float(sum(p.sum() for p in params)),
            "param_abs_sum": float(sum(p.abs().sum() for p in params)),
            "logit_sum": float(out.sum()),
            "logit_sq_sum": float(out.square().sum()),
            "first_logits": [float(v) for v in out.reshape(-1)[:3]],
        }

def main() -> None:
    data = {name: compute(name) for name in sorted(SPECS)}
    GOLDEN.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {GOLDEN}")


if __name__ == "__main__":
    main()
