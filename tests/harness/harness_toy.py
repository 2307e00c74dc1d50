"""A seconds-fast classification task for the harness tests (vit_tiny on random 8×8 images)."""

from __future__ import annotations

import torch

from ntkit.harness import ImageTask


def toy_task(n: int = 120, dim: int = 32, depth: int = 2, heads: int = 4) -> ImageTask:
    """``n`` samples split 2/3 train, 1/6 val, 1/6 test; labels a fixed linear function of x."""
    from ntkit.models import build_model
    from ntkit.partition import attention_heads

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x.flatten(1) @ torch.randn(64, 10, generator=g)).argmax(1)
    a, b = 2 * n // 3, 5 * n // 6
    return ImageTask(
        name="toy", train_x=x[:a], train_y=y[:a], val_x=x[a:b], val_y=y[a:b], test_x=x[b:], test_y=y[b:],
        partition_fn=attention_heads, build=lambda: build_model("vit_tiny", dim=dim, depth=depth, heads=heads),
    )
