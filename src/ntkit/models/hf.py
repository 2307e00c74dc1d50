"""Adapters for Hugging Face ``transformers`` masked-LM models (optional extra ``ntkit[hf]``).

:class:`HFMaskedLM` wraps any HF ``*ForMaskedLM`` so it speaks the zoo's MLM interface —
``forward(input_ids [B, T], key_padding_mask=None) -> logits [B, T, V]`` and ``aux_loss()`` — and
so recipes, the mNTK engine and :func:`ntkit.partition.attention_heads` (which recognises HF
``query``/``key``/``value`` attention) work on it unchanged. Parameter names gain the prefix
``hf.``.

``transformers`` is imported lazily; without it these functions raise
:class:`ntkit.errors.UnsupportedModelError` with the install hint. Models are built from a config
(random init, nothing downloaded) or loaded from a *local* directory.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import Tensor, nn

from ntkit.errors import UnsupportedModelError, check
from ntkit.models.transformer import BERT_SIZES

__all__ = ["HFMaskedLM", "hf_bert_mlm"]


def _transformers() -> Any:
    try:
        return importlib.import_module("transformers")
    except ImportError:
        raise UnsupportedModelError(
            "transformers is not installed: pip install 'ntkit[hf]' to use Hugging Face models"
        ) from None


class HFMaskedLM(nn.Module):
    """Zoo-style wrapper around a HF masked-LM model (attribute ``hf``).

    Shapes: ``input_ids`` [B, T] int64, ``key_padding_mask`` [B, T] bool (True = padding; passed
    to HF as ``attention_mask = ~key_padding_mask``) → logits [B, T, V].
    """

    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__()
        self.hf = hf_model

    def forward(self, input_ids: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        attention_mask = None if key_padding_mask is None else (~key_padding_mask).long()
        return self.hf(input_ids=input_ids, attention_mask=attention_mask).logits

    def aux_loss(self) -> Tensor:
        """0 (dense model); present so loops can add it blindly."""
        ref = next(self.parameters())
        return torch.zeros((), dtype=ref.dtype, device=ref.device)


def hf_bert_mlm(
    size: str = "tiny",
    vocab_size: int = 8000,
    max_len: int = 128,
    dropout: float = 0.1,
    pretrained: str | None = None,
) -> HFMaskedLM:
    """A HF ``BertForMaskedLM`` behind :class:`HFMaskedLM`.

    Args:
        size: one of :data:`ntkit.models.transformer.BERT_SIZES` (same L/H/heads as
            :func:`ntkit.models.bert_mlm`, FFN 4·H, one token type), used when ``pretrained`` is None.
        vocab_size, max_len, dropout: as in ``bert_mlm`` (ignored with ``pretrained``).
        pretrained: a local directory holding a saved HF model (``local_files_only``; nothing is
            downloaded).

    The attention implementation is ``"eager"`` (plain matmuls): it supports the double backward
    and forward-mode AD that fused SDPA kernels lack (DESIGN.md §2).
    """
    tf = _transformers()
    if pretrained is not None:
        model = tf.BertForMaskedLM.from_pretrained(
            pretrained, local_files_only=True, attn_implementation="eager"
        )
        return HFMaskedLM(model)
    check(size in BERT_SIZES, "size", size, f"one of {', '.join(BERT_SIZES)}")
    check(isinstance(vocab_size, int) and vocab_size >= 2, "vocab_size", vocab_size, "an integer >= 2")
    check(isinstance(max_len, int) and max_len >= 1, "max_len", max_len, "an integer >= 1")
    check(0.0 <= dropout < 1.0, "dropout", dropout, "a number in [0, 1)")
    n_layers, hidden, heads = BERT_SIZES[size]
    cfg = tf.BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        max_position_embeddings=max_len,
        type_vocab_size=1,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    cfg._attn_implementation = "eager"
    return HFMaskedLM(tf.BertForMaskedLM(cfg))
