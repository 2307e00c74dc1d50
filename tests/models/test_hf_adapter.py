"""The Hugging Face adapter (optional: needs ``transformers``)."""

from __future__ import annotations

import sys

import pytest
import torch

from ntkit.errors import ConfigError, UnsupportedModelError
from ntkit.partition import attention_heads


def test_missing_transformers_gives_a_one_line_hint(monkeypatch):
    from ntkit.models import hf

    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(UnsupportedModelError, match=r"pip install 'ntkit\[hf\]'"):
        hf.hf_bert_mlm()


def test_hf_bert_mlm_forward_backward_and_heads():
    pytest.importorskip("transformers")
    from ntkit.models.hf import hf_bert_mlm

    model = hf_bert_mlm(size="tiny", vocab_size=30, max_len=16)
    ids = torch.randint(0, 30, (2, 10))
    pad = torch.zeros(2, 10, dtype=torch.bool)
    pad[:, 7:] = True
    model.eval()
    with torch.no_grad():
        a = model(ids, key_padding_mask=pad)
        other = ids.clone()
        other[:, 7:] = (other[:, 7:] + 3) % 30
        b = model(other, key_padding_mask=pad)
    assert a.shape == (2, 10, 30)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    model.train()
    (model(ids).square().mean() + model.aux_loss()).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert len(attention_heads(model)) == 2 * 2
    with pytest.raises(ConfigError, match="size='xl'"):
        hf_bert_mlm(size="xl")
