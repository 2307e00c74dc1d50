"""Distributed helpers: identity without a process group; broadcast / mean across 2 gloo ranks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ntkit.train import dist as nd


def test_single_process_is_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not nd.is_distributed() and nd.rank() == 0 and nd.world_size() == 1 and nd.is_main()
    assert not nd.init_from_env()
    obj = {"active": [True, False]}
    assert nd.broadcast_object(obj) is obj
    assert nd.broadcast_tensor(t0 := torch.tensor([2.0])) is t0
    t = torch.tensor([1.0, 3.0])
    assert torch.equal(nd.all_reduce_mean_(t), torch.tensor([1.0, 3.0]))
    with nd.main_process_first():
        nd.barrier()


def _worker(r: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=r, world_size=2)
    try:
        decision = nd.broadcast_object({"mask": [r, 7]} if r == 0 else None)
        # rank 0's values, on each rank's own (non-contiguous) tensor's device
        scores = nd.broadcast_tensor(torch.tensor([[float(r), 1.0], [2.0, 3.0 + r]], dtype=torch.float64).T)
        mean = nd.all_reduce_mean_(torch.tensor([float(r), 10.0 * r]))
        torch.save(
            {"decision": decision, "scores": scores, "mean": mean, "rank": nd.rank(), "ws": nd.world_size()},
            f"{out}.{r}",
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_agree(tmp_path: Path) -> None:
    out = str(tmp_path / "res")
    mp.spawn(_worker, args=(str(tmp_path / "store"), out), nprocs=2, join=True)
    for r in range(2):
        res = torch.load(f"{out}.{r}", weights_only=False)
        assert res["decision"] == {"mask": [0, 7]} and res["rank"] == r and res["ws"] == 2
        assert torch.equal(res["mean"], torch.tensor([0.5, 5.0]))
        assert torch.equal(res["scores"], torch.tensor([[0.0, 2.0], [1.0, 3.0]], dtype=torch.float64))
