"""SeededBatchSampler: deterministic epochs, full coverage, exact mid-epoch resume."""

from __future__ import annotations

import pytest
import torch

from ntkit.errors import ConfigError
from ntkit.train.sampler import SeededBatchSampler


def _take(s: SeededBatchSampler, k: int) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    while len(out) < k:
        for idx in s:
            out.append(idx)
            if len(out) == k:
                break
    return out


def test_each_epoch_is_a_permutation_and_depends_only_on_seed() -> None:
    s = SeededBatchSampler(23, 5, seed=4)
    assert len(s) == 5
    e0 = list(s)
    assert [len(b) for b in e0] == [5, 5, 5, 5, 3]
    assert sorted(torch.cat(e0).tolist()) == list(range(23))
    assert (s.epoch, s.position) == (1, 0)
    e1 = list(s)
    assert not torch.equal(torch.cat(e0), torch.cat(e1))
    torch.manual_seed(123)  # global RNG does not matter
    again = SeededBatchSampler(23, 5, seed=4)
    assert all(torch.equal(a, b) for a, b in zip(e0 + e1, list(again) + list(again)))
    assert not torch.equal(torch.cat(list(SeededBatchSampler(23, 5, seed=5))), torch.cat(e0))


def test_resume_mid_epoch_and_at_epoch_boundary() -> None:
    ref = _take(SeededBatchSampler(17, 4, seed=1), 14)  # 5 batches / epoch
    for k in (3, 5, 7, 10):
        a = SeededBatchSampler(17, 4, seed=1)
        first = _take(a, k)
        b = SeededBatchSampler(17, 4, seed=1)
        b.load_state_dict(a.state_dict())
        rest = _take(b, 14 - k)
        assert all(torch.equal(x, y) for x, y in zip(first + rest, ref))


def test_drop_last_and_sequential() -> None:
    s = SeededBatchSampler(10, 4, shuffle=False, drop_last=True)
    assert [b.tolist() for b in s] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="batch_size=0"):
        SeededBatchSampler(10, 0)
    with pytest.raises(ConfigError, match="num_samples=0"):
        SeededBatchSampler(0, 2)
    with pytest.raises(ConfigError, match="batch_size=20"):
        SeededBatchSampler(10, 20, drop_last=True)
    s = SeededBatchSampler(10, 2, seed=1)
    with pytest.raises(ConfigError, match="seed=2"):
        s.load_state_dict({**SeededBatchSampler(10, 2, seed=2).state_dict()})
