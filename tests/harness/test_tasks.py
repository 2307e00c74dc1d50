"""Recipe tasks: the MLM task's mNTK samples run the head at the masked positions only."""

from __future__ import annotations

import torch

from ntkit import partition as P
from ntkit.harness import MLMTask
from ntkit.methods.scores import ntk_lambda_max
from ntkit.models import build_model


def _task(collate) -> MLMTask:
    blocks = torch.randint(5, 40, (12, 8), generator=torch.Generator().manual_seed(0))

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return build_model("bert_mlm", size="tiny", vocab_size=40, max_len=8).double()

    return MLMTask(
        name="t", train=blocks, val=blocks[:4], test=blocks[:4], build=build,
        partition_fn=P.attention_heads, collate=collate,
    )


def _collate(blocks: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.full_like(blocks, -100)
    sel = torch.rand(blocks.shape, generator=g) < 0.4
    sel[:, 1] = True
    labels[sel] = blocks[sel]
    return blocks.masked_fill(sel, 1), labels


def test_ntk_batch_packed_inputs_give_the_same_lambda_max() -> None:
    task = _task(_collate)
    model = task.build_model()
    inputs, mask = task.ntk_batch(4, torch.Generator().manual_seed(1))
    assert isinstance(inputs, dict) and torch.equal(inputs["positions"], mask)
    part = task.partition(model)
    packed = ntk_lambda_max(model, inputs, part, mask)
    full = ntk_lambda_max(model, inputs["input_ids"], part, mask)
    assert torch.allclose(packed, full, rtol=1e-10, atol=0)


def test_ntk_batch_stays_unpacked_when_rows_would_be_ambiguous() -> None:
    def uneven(blocks: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.full_like(blocks, -100)  # n = S = 4 positions: 2, 1, 1, 0 per sample
        for i, j in ((0, 1), (0, 2), (1, 3), (2, 4)):
            labels[i, j] = blocks[i, j]
        return blocks, labels

    task = _task(uneven)
    task.build_model()
    inputs, mask = task.ntk_batch(4, torch.Generator().manual_seed(1))
    assert isinstance(inputs, torch.Tensor) and int(mask.sum()) == 4
