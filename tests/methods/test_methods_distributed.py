"""Under torch.distributed (gloo, 2 processes) every rank takes rank 0's decision even when the
ranks' own measurements differ (DESIGN.md §7)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    sys.path.insert(0, os.path.dirname(__file__))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from method_fakes import VOCAB, mlm_batch, tiny_bert

        from ntkit.methods import LoopContext, build_method, ntk_lambda_max
        from ntkit.partition import attention_heads
        from ntkit.sparse import attach

        model = tiny_bert()
        part = attention_heads(model)
        ctl = attach(model, part)
        model.eval()

        def ntk_batch(s, g):  # each rank sees different samples
            ids, mask = mlm_batch(s, g)
            return (ids + rank) % VOCAB, mask

        mat = build_method("mat", alpha=0.3, start_epoch=1, interval=1, num_samples=4)
        mat.bind(model, part, ctl)
        ctx = LoopContext(model=model, ntk_batch=ntk_batch)
        mat.on_epoch_end(ctx)
        g = torch.Generator().manual_seed(0)  # the generator state MAT used for its first draw
        ids, mask = ntk_batch(4, g)
        local = ntk_lambda_max(model, ids, part, mask, controller=ctl).tolist()

        def loss_fn(m):
            ids, mask = mlm_batch(4, torch.Generator().manual_seed(10 + rank))
            labels = torch.where(mask, ids, torch.full_like(ids, -100))
            return torch.nn.functional.cross_entropy(m(ids).reshape(-1, VOCAB), labels.reshape(-1))

        model2 = tiny_bert()
        part2 = attention_heads(model2)
        ctl2 = attach(model2, part2)
        snip = build_method("snip_struct", fraction=0.5)
        snip.bind(model2, part2, ctl2)
        snip.at_init(LoopContext(model=model2, loss_fn=lambda m, b: loss_fn(m), sample_batch=lambda n, g: None))
        out = {
            "active": ctl.active.tolist(),
            "lambda_max": mat.history[0]["lambda_max"],
            "local": local,
            "snip_scores": snip.history[0]["scores"],
            "pruned": ctl2.pruned.tolist(),
        }
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_decisions_are_rank0s_on_every_rank(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    names = list(r0["lambda_max"])
    assert r0["local"] != r1["local"]  # the ranks measured different things …
    assert [r0["lambda_max"][n] for n in names] == pytest.approx(r0["local"], rel=1e-6)
    assert r1["lambda_max"] == r0["lambda_max"]  # … and both decided from rank 0's
    assert r1["active"] == r0["active"]
    assert r1["snip_scores"] == r0["snip_scores"] and r1["pruned"] == r0["pruned"]
