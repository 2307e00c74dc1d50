"""Transformer building blocks shared by the model zoo.

These classes are the *contract* that partitions, the mNTK engine and the partial backward rely
on; keep their attribute names stable:

* :class:`MultiHeadSelfAttention` — fused ``qkv`` Linear (d → 3d, rows ``[q; k; v]``, head h owns
  rows ``h·dh:(h+1)·dh`` inside each of the three blocks) and output ``proj`` Linear (d → d, head h
  owns columns ``h·dh:(h+1)·dh``).
* :class:`SwitchFFN` — ``router`` Linear (d → E, no bias) and ``experts`` (ModuleList of
  :class:`Expert`, each ``fc1`` d → d_ff, ``fc2`` d_ff → d); top-1 routing. After each forward it
  records ``last_dispatch`` (list of E LongTensors: flat token indices, in ``[0, B·T)``, that each
  expert processed), ``last_shape`` ``(B, T)`` and ``aux_loss`` (the load-balancing loss).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ntkit.errors import check
from ntkit.structure import HeadSlice, declare

__all__ = ["DenseFFN", "Expert", "MultiHeadSelfAttention", "SwitchFFN", "TransformerBlock"]


class MultiHeadSelfAttention(nn.Module):
    """Self-attention with a fused QKV projection.

    Args:
        d_model: hidden size d (divisible by ``num_heads``).
        num_heads: number of heads H; head_dim = d / H.
        dropout: attention-probability dropout (training mode only).

    Shapes: ``x`` [B, T, d], optional ``key_padding_mask`` [B, T] bool (True = padding) →
    [B, T, d].
    """

    def __init__(self, d_model: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        check(d_model % num_heads == 0, "num_heads", num_heads, f"a divisor of d_model={d_model}")
        self.d_model = d_model
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        b, t = x.shape[:2]
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        mask = None
        if key_padding_mask is not None:
            mask = (~key_padding_mask)[:, None, None, :]  # True = attend
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        # H·dh, not d: surgery (ntkit.sparse.surgery) may have removed heads
        return self.proj(y.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class Expert(nn.Module):
    """One feed-forward expert: fc2(gelu(fc1(x)))."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class DenseFFN(Expert):
    """The dense feed-forward sub-layer of a Transformer block (same shape as one expert)."""


class SwitchFFN(nn.Module):
    """Switch-Transformer feed-forward layer: top-1 routing over ``num_experts`` experts.

    Capacity: in training mode each expert takes at most ``ceil(capacity_factor · N / E)`` tokens
    (N = B·T); overflowing tokens are dropped (their output is 0, so the residual carries them).
    In eval mode capacity is unlimited, so every sample's output depends on that sample only
    (which the mNTK engine requires). ``aux_loss`` = E · Σ_e f_e · P_e (Fedus et al. 2021), with
    f_e the fraction of tokens routed to e and P_e the mean router probability of e.
    """

    def __init__(self, d_model: int, d_ff: int, num_experts: int = 4, capacity_factor: float = 1.5) -> None:
        super().__init__()
        check(num_experts >= 1, "num_experts", num_experts, "an integer >= 1")
        check(capacity_factor > 0, "capacity_factor", capacity_factor, "a number > 0")
        self.num_experts = num_experts
        self.capacity_factor = capacity_factor
        self.router = nn.Linear(d_model, num_experts, bias=False)
        self.experts = nn.ModuleList(Expert(d_model, d_ff) for _ in range(num_experts))
        self.last_dispatch: list[Tensor] = []
        self.last_shape: tuple[int, int] = (0, 0)
        self.aux_loss: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        flat = x.reshape(b * t, d)
        probs = self.router(flat).softmax(dim=-1)
        gate, choice = probs.max(dim=-1)
        n, e_total = flat.shape[0], self.num_experts
        capacity = math.ceil(self.capacity_factor * n / e_total) if self.training else n
        out = torch.zeros_like(flat)
        dispatch = []
        for e, expert in enumerate(self.experts):
            idx = (choice == e).nonzero(as_tuple=True)[0][:capacity]
            dispatch.append(idx)
            if idx.numel():
                y = expert(flat.index_select(0, idx)) * gate.index_select(0, idx).unsqueeze(-1)
                out = out.index_add(0, idx, y.to(out.dtype))
        frac = torch.bincount(choice, minlength=e_total).to(probs.dtype) / n
        self.aux_loss = e_total * (frac * probs.mean(dim=0)).sum()
        self.last_dispatch = dispatch
        self.last_shape = (b, t)
        return out.view(b, t, d)


def _mhsa_heads(m: MultiHeadSelfAttention) -> list[list[HeadSlice]]:
    """Head h of H (head_dim dh, block B = qkv.out_features / 3): ``qkv`` weight / bias rows
    ``[j·B + h·dh, j·B + (h+1)·dh)`` for j = 0, 1, 2 (its q, k, v rows) and ``proj.weight``
    columns ``[h·dh, (h+1)·dh)``; ``proj.bias`` is shared by all heads."""
    dh, block = m.head_dim, m.qkv.out_features // 3
    heads = []
    for h in range(m.num_heads):
        rows = [(j * block + h * dh, j * block + (h + 1) * dh) for j in range(3)]
        slices = [HeadSlice(m.qkv.weight, 0, a, b) for a, b in rows]
        if m.qkv.bias is not None:
            slices += [HeadSlice(m.qkv.bias, 0, a, b) for a, b in rows]
        slices.append(HeadSlice(m.proj.weight, 1, h * dh, (h + 1) * dh))
        heads.append(slices)
    return heads


# what the mNTK engine and the partition builders need to know about these layers (ntkit.structure)
declare(
    MultiHeadSelfAttention,
    heads=_mhsa_heads,
    coupling=lambda m: f"attention dropout={m.dropout} in training makes the kernel random"
    if m.training and m.dropout > 0 else None,
)
declare(
    SwitchFFN,
    experts=lambda m: list(m.experts),
    router=lambda m: m.router,
    dispatch=lambda m: (list(m.last_dispatch), m.last_shape[1]),
    coupling=lambda m: "expert capacity couples samples in training" if m.training else None,
)


class TransformerBlock(nn.Module):
    """Post-LN encoder block (as BERT): x = LN(x + drop(attn(x))); x = LN(x + drop(ffn(x))).

    ``num_experts=0`` gives a dense FFN (:class:`DenseFFN`, attribute ``ffn``); otherwise ``ffn``
    is a :class:`SwitchFFN`.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        d_ff: int,
        dropout: float = 0.1,
        num_experts: int = 0,
        capacity_factor: float = 1.5,
    ) -> None:
        super().__init__()
        self.attn = MultiHeadSelfAttention(d_model, num_heads, dropout)
        self.ln1 = nn.LayerNorm(d_model)
        self.ffn: nn.Module = (
            SwitchFFN(d_model, d_ff, num_experts, capacity_factor) if num_experts else DenseFFN(d_model, d_ff)
        )
        self.ln2 = nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        x = self.ln1(x + self.drop(self.attn(x, key_padding_mask)))
        return self.ln2(x + self.drop(self.ffn(x)))
