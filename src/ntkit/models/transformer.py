"""Transformer models of the zoo: BERT-style MLM encoders (dense and Switch-MoE) and a small ViT.

All are built from :class:`ntkit.models.layers.TransformerBlock` (fused QKV attention), so the
partition builders (:func:`ntkit.partition.attention_heads`, :func:`ntkit.partition.moe_experts`)
and the mNTK engine's hooks see the same modules everywhere.

Initialisation (deterministic given ``torch.manual_seed``): BERT's — every ``nn.Linear`` /
``nn.Embedding`` weight ~ N(0, 0.02²), biases 0, LayerNorm weight 1 / bias 0 (Devlin et al.
2019, HF ``BertPreTrainedModel._init_weights``). The ViT uses the same scheme plus N(0, 0.02²)
for its class token and position embeddings, and PyTorch's default init for the patch conv.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ntkit.errors import check
from ntkit.models.layers import SwitchFFN, TransformerBlock

__all__ = [
    "BERT_SIZES",
    "BertConfig",
    "BertMLM",
    "MLMHead",
    "ViT",
    "mlm_loss",
]

#: name → (num_layers L, hidden size H, attention heads); the FFN is 4·H (Turc et al. 2019 sizes).
BERT_SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (2, 128, 2),
    "mini": (4, 256, 4),
    "small": (4, 512, 8),
    "medium": (8, 512, 8),
    "base": (12, 768, 12),
    "large": (24, 1024, 16),
}


@dataclass
class BertConfig:
    """Configuration of :class:`BertMLM` (validated on construction).

    Attributes:
        vocab_size: number of token ids V (≥ 2).
        max_len: longest sequence T the learned position embedding covers (≥ 1).
        d_model: hidden size H (divisible by ``num_heads``).
        num_layers: number of Transformer blocks L (≥ 1).
        num_heads: attention heads per block.
        d_ff: inner size of the feed-forward sub-layer (default 4·H in the builders).
        dropout: dropout on embeddings, attention probabilities and residual branches, in [0, 1).
        tie_embeddings: the MLM decoder reuses the token-embedding matrix (plus its own bias).
        num_experts: 0 for dense FFNs; ≥ 1 makes the FFN of MoE blocks a ``SwitchFFN``.
        capacity_factor: Switch capacity factor (> 0), training mode only.
        moe_every: block i (0-based) is an MoE block iff ``i % moe_every == moe_every - 1``:
            1 = every block, 2 = every other block (blocks 1, 3, …, as in Switch Transformer).
    """

    vocab_size: int = 8000
    max_len: int = 128
    d_model: int = 128
    num_layers: int = 2
    num_heads: int = 2
    d_ff: int = 512
    dropout: float = 0.1
    tie_embeddings: bool = True
    num_experts: int = 0
    capacity_factor: float = 1.5
    moe_every: int = 1

    def __post_init__(self) -> None:
        check(isinstance(self.vocab_size, int) and self.vocab_size >= 2, "vocab_size", self.vocab_size,
              "an integer >= 2")
        check(isinstance(self.max_len, int) and self.max_len >= 1, "max_len", self.max_len, "an integer >= 1")
        check(isinstance(self.num_layers, int) and self.num_layers >= 1, "num_layers", self.num_layers,
              "an integer >= 1")
        check(isinstance(self.num_heads, int) and self.num_heads >= 1, "num_heads", self.num_heads,
              "an integer >= 1")
        check(isinstance(self.d_model, int) and self.d_model >= 1 and self.d_model % self.num_heads == 0,
              "d_model", self.d_model, f"a positive multiple of num_heads={self.num_heads}")
        check(isinstance(self.d_ff, int) and self.d_ff >= 1, "d_ff", self.d_ff, "an integer >= 1")
        check(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "a number in [0, 1)")
        check(isinstance(self.num_experts, int) and self.num_experts >= 0, "num_experts", self.num_experts,
              "an integer >= 0 (0 = dense)")
        check(self.capacity_factor > 0, "capacity_factor", self.capacity_factor, "a number > 0")
        check(isinstance(self.moe_every, int) and self.moe_every >= 1, "moe_every", self.moe_every,
              "an integer >= 1")

    @classmethod
    def from_size(cls, size: str, **kw: object) -> BertConfig:
        """Config of a named size (see :data:`BERT_SIZES`; FFN 4·H) with overrides ``kw``."""
        check(size in BERT_SIZES, "size", size, f"one of {', '.join(BERT_SIZES)}")
        n_layers, hidden, heads = BERT_SIZES[size]
        return cls(
            d_model=hidden, num_layers=n_layers, num_heads=heads, d_ff=4 * hidden, **kw  # type: ignore[arg-type]
        )

    def is_moe_block(self, i: int) -> bool:
        return self.num_experts > 0 and i % self.moe_every == self.moe_every - 1


def _bert_init(module: nn.Module) -> None:
    """BERT init: Linear/Embedding weights N(0, 0.02²), biases 0, LayerNorm (1, 0)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class MLMHead(nn.Module):
    """BERT's MLM head: decoder(LN(gelu(dense(h)))). ``decoder`` is Linear H → V whose weight
    may be tied to the token embedding (then it is the same Parameter object)."""

    def __init__(self, d_model: int, vocab_size: int) -> None:
        super().__init__()
        self.dense = nn.Linear(d_model, d_model)
        self.ln = nn.LayerNorm(d_model)
        self.decoder = nn.Linear(d_model, vocab_size)

    def forward(self, h: Tensor) -> Tensor:
        """[B, T, H] → logits [B, T, V]."""
        return self.decoder(self.ln(F.gelu(self.dense(h))))


class BertMLM(nn.Module):
    """Post-LN BERT encoder with an MLM head (dense or Switch-MoE FFNs, see :class:`BertConfig`).

    Parameter names: ``tok_emb``, ``pos_emb``, ``emb_ln``, ``blocks.<i>.attn.qkv|proj``,
    ``blocks.<i>.ffn...`` (``ffn.fc1/fc2`` dense; ``ffn.router``, ``ffn.experts.<e>.fc1/fc2``
    MoE), ``blocks.<i>.ln1|ln2``, ``head.dense|ln|decoder``. With tied embeddings the decoder
    weight *is* ``tok_emb.weight`` (``named_parameters`` lists it once, under that name).
    """

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)
        self.pos_emb = nn.Embedding(c.max_len, c.d_model)
        self.emb_ln = nn.LayerNorm(c.d_model)
        self.emb_drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(
                c.d_model,
                c.num_heads,
                c.d_ff,
                dropout=c.dropout,
                num_experts=c.num_experts if c.is_moe_block(i) else 0,
                capacity_factor=c.capacity_factor,
            )
            for i in range(c.num_layers)
        )
        self.head = MLMHead(c.d_model, c.vocab_size)
        self.apply(_bert_init)
        if c.tie_embeddings:
            self.head.decoder.weight = self.tok_emb.weight

    def forward(
        self, input_ids: Tensor, key_padding_mask: Tensor | None = None, positions: Tensor | None = None
    ) -> Tensor:
        """Token ids [B, T] (int64, T ≤ max_len), optional ``key_padding_mask`` [B, T] bool
        (True = padding, never attended to) → logits [B, T, V] (float, the model's dtype).

        ``positions`` [B, T] bool: compute the MLM head only at these positions and return
        logits [n, V] for the n selected positions in row-major order (training only needs the
        masked positions; this skips ~85% of the vocabulary projection's work)."""
        t = input_ids.shape[1]
        check(t <= self.config.max_len, "input_ids.shape[1]", t, f"<= max_len={self.config.max_len}")
        # positions expanded per sample (a view), so per-sample NTK hooks see a batch dimension
        pos = torch.arange(t, device=input_ids.device).unsqueeze(0).expand_as(input_ids)
        x = self.emb_drop(self.emb_ln(self.tok_emb(input_ids) + self.pos_emb(pos)))
        for block in self.blocks:
            x = block(x, key_padding_mask)
        if positions is not None:
            x = x[positions]
        return self.head(x)

    def aux_loss(self) -> Tensor:
        """Sum of the MoE blocks' load-balancing losses from the last forward (scalar; 0 for a
        dense model or before any forward)."""
        return _sum_aux(self)


def _sum_aux(model: nn.Module) -> Tensor:
    ref = next(model.parameters())
    total = torch.zeros((), dtype=ref.dtype, device=ref.device)
    for m in model.modules():
        if isinstance(m, SwitchFFN) and m.aux_loss is not None:
            total = total + m.aux_loss
    return total


def mlm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over the labelled positions.

    Args:
        logits: [B, T, V] float.
        labels: [B, T] int64; ``-100`` = not a prediction target.

    Returns: scalar Tensor (nats per predicted token); exactly 0 (still attached to the graph)
    when no position is labelled, instead of PyTorch's NaN. No data-dependent Python branching,
    so it also works under ``torch.func`` transforms (``vmap``, ``grad``).
    """
    valid = labels != -100
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.clamp_min(0).reshape(-1), reduction="none"
    ).view(labels.shape)
    w = valid.to(nll.dtype)
    return (nll * w).sum() / w.sum().clamp_min(1.0)


class ViT(nn.Module):
    """A small Vision Transformer for low-resolution images.

    Patches of ``patch_size``² pixels are embedded by a stride-``patch_size`` Conv2d
    (``patch_embed``), a learned class token and position embeddings (``cls_token`` [1, 1, D],
    ``pos_emb`` [1, N+1, D]) are added, then ``depth`` :class:`TransformerBlock` s (fused QKV,
    FFN 4·D), a final LayerNorm and a Linear ``classifier``. ``pool="cls"`` reads the class
    token; ``"mean"`` averages the patch tokens.

    Shapes: images [B, C, H, W] with H = W = ``image_size`` → logits [B, num_classes].
    """

    def __init__(
        self,
        image_size: int = 8,
        patch_size: int = 2,
        in_channels: int = 1,
        num_classes: int = 10,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: int = 4,
        dropout: float = 0.0,
        pool: str = "cls",
    ) -> None:
        super().__init__()
        check(image_size >= 1 and patch_size >= 1 and image_size % patch_size == 0, "patch_size", patch_size,
              f"a positive divisor of image_size={image_size}")
        check(in_channels >= 1, "in_channels", in_channels, "an integer >= 1")
        check(num_classes >= 1, "num_classes", num_classes, "an integer >= 1")
        check(depth >= 1, "depth", depth, "an integer >= 1")
        check(heads >= 1 and dim % heads == 0, "dim", dim, f"a positive multiple of heads={heads}")
        check(pool in ("cls", "mean"), "pool", pool, "'cls' or 'mean'")
        check(0.0 <= dropout < 1.0, "dropout", dropout, "a number in [0, 1)")
        self.image_size = image_size
        self.pool = pool
        n = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_emb = nn.Parameter(torch.zeros(1, n + 1, dim))
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, heads, mlp_ratio * dim, dropout=dropout) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, num_classes)
        for m in self.modules():
            if m is not self.patch_embed:
                _bert_init(m)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.pos_emb, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        """[B, C, H, W] → logits [B, num_classes]."""
        b = x.shape[0]
        check(tuple(x.shape[-2:]) == (self.image_size, self.image_size), "input size", tuple(x.shape[-2:]),
              f"({self.image_size}, {self.image_size})")
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, N, D]
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1) + self.pos_emb
        h = self.drop(tokens)
        for block in self.blocks:
            h = block(h)
        h = self.norm(h)
        pooled = h[:, 0] if self.pool == "cls" else h[:, 1:].mean(dim=1)
        return self.classifier(pooled)

    def aux_loss(self) -> Tensor:
        """0 (no MoE layers); present so every zoo model answers ``aux_loss()``."""
        return _sum_aux(self)
