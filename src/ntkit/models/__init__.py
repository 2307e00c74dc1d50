"""The model zoo: registered builder functions.

>>> from ntkit.models import build_model, list_models
>>> model = build_model("bert_mlm", size="tiny", vocab_size=1000)

Every builder returns an ``nn.Module`` with deterministic init given ``torch.manual_seed`` and an
``aux_loss()`` method (the MoE load-balancing loss; 0 for dense models). Language models take
token ids [B, T] (+ optional ``key_padding_mask`` [B, T] bool) and return logits [B, T, V];
image models take [B, C, H, W] and return logits [B, num_classes].

Register a new model with ``@register_model("name")`` on a builder function.

Hugging Face masked-LM adapters (optional ``transformers``) live in :mod:`ntkit.models.hf`; they
are not registered, so ``import ntkit.models`` never imports ``transformers``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from ntkit._registry import Registry
from ntkit.errors import ConfigError, check
from ntkit.models.layers import MultiHeadSelfAttention, SwitchFFN, TransformerBlock
from ntkit.models.transformer import BERT_SIZES, BertConfig, BertMLM, MLMHead, ViT, mlm_loss
from ntkit.models.vision import VGG16, BasicBlock, Conv4, LeNet5Caffe, LeNet300100, ResNet56

__all__ = [
    "BERT_SIZES",
    "MODELS",
    "VGG16",
    "BasicBlock",
    "BertConfig",
    "BertMLM",
    "Conv4",
    "LeNet5Caffe",
    "LeNet300100",
    "MLMHead",
    "MultiHeadSelfAttention",
    "ResNet56",
    "SwitchFFN",
    "TransformerBlock",
    "ViT",
    "bert_mlm",
    "build_model",
    "conv4",
    "lenet5_caffe",
    "lenet300_100",
    "list_models",
    "mlm_loss",
    "register_model",
    "resnet56",
    "switch_mlm",
    "vgg16",
    "vit_tiny",
]

ModelBuilder = Callable[..., nn.Module]

#: name → builder function.
MODELS: Registry[ModelBuilder] = Registry("model")


def register_model(name: str | None = None) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator registering a builder under ``name`` (default: the function's name)."""
    return MODELS.register(name)


def list_models() -> list[str]:
    """Sorted names of the registered models."""
    return MODELS.names()


def build_model(name: str, **kw: Any) -> nn.Module:
    """Build the registered model ``name`` with keyword arguments ``kw``.

    Raises :class:`ConfigError` (one line) for an unknown name or an argument the builder does
    not take; invalid values raise the builders' own ConfigErrors.
    """
    builder = MODELS.get(name)
    try:
        inspect.signature(builder).bind(**kw)
    except TypeError as e:
        raise ConfigError(f"model={name!r}: {e}") from None
    return builder(**kw)


@register_model()
def bert_mlm(
    size: str = "tiny",
    vocab_size: int = 8000,
    max_len: int = 128,
    dropout: float = 0.1,
    tie_embeddings: bool = True,
) -> BertMLM:
    """BERT MLM of a named size (:data:`BERT_SIZES`: tiny L2/H128/2 heads, mini L4/H256/4, small
    L4/H512/8, medium L8/H512/8, base L12/H768/12, large L24/H1024/16; FFN 4·H).
    forward(input_ids [B, T], key_padding_mask=None) → logits [B, T, vocab_size]."""
    cfg = BertConfig.from_size(
        size, vocab_size=vocab_size, max_len=max_len, dropout=dropout, tie_embeddings=tie_embeddings
    )
    return BertMLM(cfg)


@register_model()
def switch_mlm(
    size: str = "tiny",
    num_experts: int = 4,
    capacity_factor: float = 1.5,
    vocab_size: int = 8000,
    max_len: int = 128,
    dropout: float = 0.1,
    tie_embeddings: bool = True,
    moe_every: int = 1,
) -> BertMLM:
    """Switch-Transformer MLM: :func:`bert_mlm` whose FFNs are top-1 :class:`SwitchFFN` s with
    ``num_experts`` experts (seed 000: 4 experts, capacity factor 1.5). ``moe_every=1`` (default)
    makes every block MoE — so the expert partition has L·E groups; ``moe_every=2`` makes every
    other block (1, 3, …) MoE as in Fedus et al. ``model.aux_loss()`` sums the load-balancing
    losses of the last forward."""
    check(isinstance(num_experts, int) and num_experts >= 1, "num_experts", num_experts, "an integer >= 1")
    cfg = BertConfig.from_size(
        size,
        vocab_size=vocab_size,
        max_len=max_len,
        dropout=dropout,
        tie_embeddings=tie_embeddings,
        num_experts=num_experts,
        capacity_factor=capacity_factor,
        moe_every=moe_every,
    )
    return BertMLM(cfg)


@register_model()
def vgg16(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> VGG16:
    """CIFAR VGG-16 with BatchNorm (13 conv + Linear); ``width`` scales every conv's filters."""
    return VGG16(num_classes=num_classes, in_channels=in_channels, width=width)


@register_model()
def resnet56(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> ResNet56:
    """CIFAR ResNet-56 (3 stages × 9 basic blocks, BN, 1×1-conv shortcuts when shapes change)."""
    return ResNet56(num_classes=num_classes, in_channels=in_channels, width=width)


@register_model()
def lenet300_100(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> LeNet300100:
    """LeNet-300-100 MLP (seed 003), Glorot-normal init."""
    return LeNet300100(num_classes=num_classes, in_channels=in_channels, image_size=image_size)


@register_model()
def lenet5_caffe(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> LeNet5Caffe:
    """LeNet-5-caffe (conv 20 5×5, pool, conv 50 5×5, pool, fc 500, fc classes), Glorot init."""
    return LeNet5Caffe(num_classes=num_classes, in_channels=in_channels, image_size=image_size)


@register_model()
def conv4(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, padding: str = "keras") -> Conv4:
    """Conv-4 of seed 003 Table 1 (4 convs + 2 Linear with dropout), Glorot init. ``padding``:
    ``"keras"`` (same, valid; ``fc1`` 4608 inputs at 32×32) or ``"valid"`` (the NTT authors' code;
    3200 inputs), see :class:`Conv4`."""
    return Conv4(num_classes=num_classes, in_channels=in_channels, image_size=image_size, padding=padding)


@register_model()
def vit_tiny(
    image_size: int = 8,
    patch_size: int = 2,
    in_channels: int = 1,
    num_classes: int = 10,
    dim: int = 64,
    depth: int = 2,
    heads: int = 4,
    pool: str = "cls",
    dropout: float = 0.0,
) -> ViT:
    """Small ViT (defaults fit scikit-learn's 8×8 digits): patch conv, class token, ``depth``
    fused-QKV Transformer blocks, LayerNorm, Linear. [B, C, H, W] → [B, num_classes]."""
    return ViT(
        image_size=image_size,
        patch_size=patch_size,
        in_channels=in_channels,
        num_classes=num_classes,
        dim=dim,
        depth=depth,
        heads=heads,
        pool=pool,
        dropout=dropout,
    )
