"""A deterministic, resumable mini-batch order.

The permutation of epoch ``e`` depends only on ``(seed, e)`` (numpy ``default_rng([seed, e])``),
never on global RNG state, so the data order is reproducible and the position inside it is two
integers — exactly what a checkpoint must hold to resume mid-epoch.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from ntkit.errors import check

__all__ = ["SeededBatchSampler"]


class SeededBatchSampler:
    """Yields index batches (LongTensor [B]) over ``range(num_samples)``, one epoch per ``iter``.

    Args:
        num_samples: dataset size N.
        batch_size: B.
        seed: seed of the per-epoch permutations.
        shuffle: False = sequential order every epoch.
        drop_last: drop the last incomplete batch.

    State: ``epoch`` (0-based) and ``position`` (batches of the current epoch already *yielded*).
    ``for idx in sampler`` yields the remaining batches of the current epoch; when the epoch is
    exhausted the state moves to ``(epoch + 1, 0)``. Save :meth:`state_dict` after processing a
    batch; after :meth:`load_state_dict` iteration continues with the next batch.

    With a ``torch.utils.data.DataLoader`` (``batch_sampler=sampler``) keep ``num_workers=0``:
    worker prefetching advances ``position`` ahead of what the loop consumed. For in-memory tensors
    index directly: ``x[idx]``.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> None:
        check(isinstance(num_samples, int) and num_samples >= 1, "num_samples", num_samples, "an int >= 1")
        check(isinstance(batch_size, int) and batch_size >= 1, "batch_size", batch_size, "an int >= 1")
        check(
            not drop_last or batch_size <= num_samples,
            "batch_size",
            batch_size,
            f"<= num_samples={num_samples} with drop_last",
        )
        check(isinstance(seed, int) and seed >= 0, "seed", seed, "an int >= 0")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.position = 0

    def __len__(self) -> int:
        """Batches per epoch."""
        if self.drop_last:
            return self.num_samples // self.batch_size
        return (self.num_samples + self.batch_size - 1) // self.batch_size

    def order(self, epoch: int) -> torch.Tensor:
        """The sample order of ``epoch``: LongTensor [N]."""
        if not self.shuffle:
            return torch.arange(self.num_samples)
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        return torch.from_numpy(perm)

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.position >= len(self):
            self.epoch, self.position = self.epoch + 1, 0
        order = self.order(self.epoch)
        while self.position < len(self):
            i = self.position
            self.position += 1
            yield order[i * self.batch_size : (i + 1) * self.batch_size]
        self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        for k in ("seed", "num_samples", "batch_size"):
            check(
                state[k] == getattr(self, k), k, state[k], f"{getattr(self, k)} (the sampler being restored)"
            )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
