"""mNTK engine guards: parameters used outside their module are detected and sent to torch.func;
the Σ-gradient self-check catches what detection cannot see. Every Gram against brute force."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ntkit.errors import UnsupportedModelError
from ntkit.ntk import modular_ntk
from ntkit.ntk._checks import UseTracker, gram_self_check, op_name
from ntkit.partition import ParamSlice, Partition


def rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def layers_partition(model: nn.Module) -> Partition:
    spec: dict[str, list] = {}
    for mname, m in model.named_modules():
        own = [f"{mname}.{n}" if mname else n for n, _ in m.named_parameters(recurse=False)]
        own = [n for n in own if n in dict(model.named_parameters())]
        if own:
            spec[mname or "root"] = [(p, 0, None) for p in own]
    return Partition.from_slices(spec, kind="layer").bind(model)


class TiedLM(nn.Module):
    """Token embedding, one hidden Linear, output projection tied to the embedding as written in
    user code (``use``): a module-less op on ``tok.weight``."""

    def __init__(self, use: str, vocab: int = 9, d: int = 6) -> None:
        super().__init__()
        self.use = use
        self.tok = nn.Embedding(vocab, d)
        self.fc = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        if use in ("bias_add", "bias_sigmoid", "scale_shift", "matmul"):
            self.out = nn.Linear(d, vocab)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.norm(torch.tanh(self.fc(self.tok(ids))))
        w = self.tok.weight
        if self.use == "matmul_t":
            return h @ w.t()
        if self.use == "linear":
            return F.linear(h, w)
        if self.use == "einsum":
            return torch.einsum("btd,vd->btv", h, w) + torch.einsum("vd,btd->btv", [w, h])
        if self.use == "einsum_ellipsis":
            return torch.einsum("...d,vd->...v", h, w)
        if self.use == "bias_add":  # the hidden layer's bias reused functionally
            return self.out(h + self.fc.bias)
        if self.use == "bias_sigmoid":  # … through an op without a rule
            return self.out(h * torch.sigmoid(self.fc.bias))
        if self.use == "scale_shift":  # every element-wise form, both operand orders
            b = self.fc.bias
            return self.out((b * h - b) * self.norm.weight + (b - h) + h * b)
        if self.use == "matmul":  # x @ W with W [in, out] (the table's first d rows)
            return self.out(torch.tanh(h @ self.fc.weight) + torch.matmul(h, self.fc.weight))
        raise KeyError(self.use)


OPS = {  # uses without a per-op rule: the parameter falls back, named with the op
    "matmul_t": ("tok.weight", "Tensor.t"),
    "einsum_ellipsis": ("tok.weight", "torch.einsum"),
    "bias_sigmoid": ("fc.bias", "torch.sigmoid"),
}


@pytest.mark.parametrize("use", list(OPS))
def test_tied_functional_use_detected_and_exact(use: str) -> None:
    torch.manual_seed(0)
    model = TiedLM(use).double().eval()
    x = torch.randint(0, 9, (4, 3))
    part = layers_partition(model)
    ref = modular_ntk(model, x, part, strategy="brute_force").grams
    got = modular_ntk(model, x, part)
    pname, op = OPS[use]
    assert rel(got.grams, ref) <= 1e-10
    assert got.strategy == "hooks+functorch"
    assert any(f.startswith(f"{pname}: used by {op} outside") for f in got.fallback_layers), got.fallback_layers
    # only the misused parameter falls back; the others stay on hooks
    assert all(f.startswith(pname) for f in got.fallback_layers)
    with pytest.raises(UnsupportedModelError, match=pname.replace(".", r"\.")):
        modular_ntk(model, x, part, strategy="hooks")
    # the detection alone suffices: still exact without the self-check
    assert rel(modular_ntk(model, x, part, self_check=False).grams, ref) <= 1e-10


class SecondLookup(nn.Module):
    """``F.embedding(ids, tok.weight)`` a second time and ``F.linear(h, tok.weight)`` as the tied
    output: three uses of one table, two of them functional (both have per-op rules)."""

    def __init__(self, vocab: int = 9, d: int = 6, padding_idx: int | None = None) -> None:
        super().__init__()
        self.padding_idx = padding_idx
        self.tok = nn.Embedding(vocab, d, padding_idx=padding_idx)
        self.fc = nn.Linear(d, d)

    def forward(self, ids: Tensor) -> Tensor:
        h = torch.tanh(self.fc(self.tok(ids))) + F.embedding(ids.flip(1), self.tok.weight, self.padding_idx)
        return F.linear(h, self.tok.weight)


@pytest.mark.parametrize(
    "model",
    [TiedLM("linear"), TiedLM("bias_add"), TiedLM("scale_shift"), TiedLM("matmul"), TiedLM("einsum"),
     SecondLookup(), SecondLookup(padding_idx=-2)],
    ids=["tied_linear", "bias_add", "scale_shift", "matmul", "einsum", "second_lookup", "padding_idx"],
)
@pytest.mark.parametrize("output", ["sum_logits", "logits"])
def test_functional_uses_with_rules_stay_on_hooks(model: nn.Module, output: str) -> None:
    torch.manual_seed(0)
    model = model.double().eval()
    x = torch.randint(0, 9, (4, 3), generator=torch.Generator().manual_seed(0))
    x[0, 1] = 7  # the padding row (padding_idx=-2) occurs
    part = layers_partition(model)
    ref = modular_ntk(model, x, part, strategy="brute_force", output=output).grams
    got = modular_ntk(model, x, part, output=output, strategy="hooks")
    assert got.strategy == "hooks" and got.fallback_layers == []
    assert rel(got.grams, ref) <= 1e-10


class MetaReader(nn.Module):
    """Reads a covered weight's metadata outside its module: not a use."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(4, 5), nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        w = self.fc.weight
        assert w.shape[0] == w.size(0) == 5 and w.dim() == 2 and w.numel() == 20
        x = x.to(w.dtype).to(w.device)
        return self.out(torch.tanh(self.fc(x)))


def test_metadata_reads_are_not_uses() -> None:
    model = MetaReader().double().eval()
    x = torch.randn(5, 4, dtype=torch.float64)
    part = layers_partition(model)
    got = modular_ntk(model, x, part)
    assert got.strategy == "hooks" and got.fallback_layers == []
    assert rel(got.grams, modular_ntk(model, x, part, strategy="brute_force").grams) <= 1e-10


class HookedTwice(nn.Module):
    """A user forward hook on ``fc`` uses ``fc.weight`` a second time *inside* fc's call: the
    tracker counts it as fc's own use, the Linear rule misses it — only the self-check sees it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.head = nn.Linear(4, 3), nn.Linear(3, 2)
        self.fc.register_forward_hook(lambda m, args, out: out + 0.5 * F.linear(args[0], m.weight))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.fc(x)))


def test_self_check_catches_what_detection_misses() -> None:
    torch.manual_seed(0)
    model = HookedTwice().double().eval()
    x = torch.randn(6, 4, dtype=torch.float64)
    part = Partition.from_slices(
        {f"fc.{r}": [("fc.weight", 0, r), ("fc.bias", 0, r)] for r in range(3)}
        | {"head": [("head.weight", 0, None), ("head.bias", 0, None)]}
    ).bind(model)
    ref = modular_ntk(model, x, part, strategy="brute_force").grams
    unchecked = modular_ntk(model, x, part, self_check=False)
    assert unchecked.strategy == "hooks" and rel(unchecked.grams[:3], ref[:3]) > 1e-2  # the defect
    got = modular_ntk(model, x, part)
    assert rel(got.grams, ref) <= 1e-10
    assert got.strategy == "hooks+functorch"
    assert sorted(f.split(":")[0] for f in got.fallback_layers) == ["fc.0", "fc.1", "fc.2"]
    assert all("self-check failed" in f for f in got.fallback_layers)
    assert torch.equal(got.grams[3], unchecked.grams[3])  # the head group kept its hook Gram
    with pytest.raises(UnsupportedModelError, match="self-check"):
        modular_ntk(model, x, part, strategy="hooks")
    for output in ("logits",):
        ref_k = modular_ntk(model, x, part, strategy="brute_force", output=output).grams
        assert rel(modular_ntk(model, x, part, output=output).grams, ref_k) <= 1e-10


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_self_check_no_false_alarm_on_supported_model(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))
    model[1].running_var.uniform_(0.5, 2.0)
    model = model.to(dtype).eval()
    x = torch.randn(6, 3, 6, 6, dtype=dtype)
    got = modular_ntk(model, x, layers_partition(model))
    assert got.strategy == "hooks" and got.fallback_layers == []


def test_gram_self_check_unit() -> None:
    """Zero hook Gram but a non-zero autograd gradient fails; a correct Gram passes; roundoff in a
    tiny group next to a large one is tolerated."""
    g = torch.randn(3, 4, dtype=torch.float64)  # per-sample gradients of a [4] parameter, S = 3
    grams = torch.zeros(2, 3, 3, dtype=torch.float64)
    grams[0] = g[:, :2] @ g[:, :2].T
    slices = {"p": [(0, ParamSlice("p", 0, 0, 2)), (1, ParamSlice("p", 0, 2, 4))]}
    total = g[[0, 2]].sum(0)
    assert gram_self_check(grams, 1, [0, 2], {"p": total}, slices, 1e-9) == {1: pytest.approx(1.0)}
    grams[1] = g[:, 2:] @ g[:, 2:].T
    assert gram_self_check(grams, 1, [0, 2], {"p": total}, slices, 1e-9) == {}
    assert gram_self_check(grams, 1, [0, 2], {"p": None}, slices, 1e-9).keys() == {0, 1}


def test_op_names_and_tracker_scope() -> None:
    assert op_name(F.linear) == "torch.nn.functional.linear"
    assert op_name(torch.matmul) == "torch.matmul"
    assert op_name(Tensor.t) == "Tensor.t"
    lin = nn.Linear(2, 2)
    w = lin.weight
    active: dict[int, int] = {}
    with UseTracker({id(w): ("lin.weight", frozenset({id(lin)}), "lin", w)}, active) as tr:
        _ = w.shape, w.dtype, w.size(0)
        active[id(lin)] = 1
        _ = torch.cat([w, w])  # inside lin's forward: accounted
        active[id(lin)] = 0
        _ = torch.stack([w.detach()])  # w.detach() is the use
    assert tr.found == {"lin.weight": "lin.weight: used by Tensor.detach outside lin"}


class SharedPositions(nn.Module):
    """Position ids [1, T] shared by all samples (HF BERT / GPT-2 style): the lookup is broadcast
    into the token embeddings, by ``+``, ``.to()`` (a no-op) and, in ``twice``, also ``-``; in
    ``misuse`` it also goes through an op without a rule."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.tok, self.pos = nn.Embedding(9, 6), nn.Embedding(5, 6, padding_idx=4)
        self.out = nn.Linear(6, 3)

    def forward(self, ids: Tensor) -> Tensor:
        e = self.pos(torch.arange(ids.shape[1]).unsqueeze(0))
        h = self.tok(ids) + e.to(self.tok.weight.dtype)
        if self.how == "twice":
            h = torch.tanh(h) - e
        if self.how == "misuse":
            h = h + torch.sigmoid(e)
        return self.out(torch.tanh(h))


@pytest.mark.parametrize("how", ["once", "twice", "misuse"])
def test_shared_position_lookup_is_hooked_or_reported(how: str) -> None:
    torch.manual_seed(0)
    model = SharedPositions(how).double().eval()
    x = torch.randint(0, 9, (4, 5), generator=torch.Generator().manual_seed(1))
    part = layers_partition(model)
    for output in ("sum_logits", "logits"):
        ref = modular_ntk(model, x, part, strategy="brute_force", output=output).grams
        got = modular_ntk(model, x, part, output=output)
        assert rel(got.grams, ref) <= 1e-10
        if how == "misuse":
            assert got.fallback_layers == ["pos.weight: used by torch.sigmoid outside pos"], got.fallback_layers
        else:
            assert got.strategy == "hooks" and got.fallback_layers == []
            assert rel(modular_ntk(model, x, part, output=output, self_check=False).grams, ref) <= 1e-10


class ConvZoo(nn.Module):
    """Conv layers beyond plain Conv2d: depthwise / grouped, dilated, strided, 'same' padding,
    reflect / circular / replicate padding modes, Conv1d, GroupNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.c2 = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1, padding_mode="reflect"), nn.Tanh(),
            nn.Conv2d(6, 6, 3, padding=2, dilation=2, groups=6), nn.GroupNorm(3, 6), nn.Tanh(),
            nn.Conv2d(6, 4, (3, 2), padding="same", padding_mode="circular", groups=2), nn.Tanh(),
            nn.Conv2d(4, 4, 3, stride=2, padding=1, padding_mode="replicate"),
        )
        self.c1 = nn.Conv1d(4, 4, 3, padding="same", groups=2)
        self.out = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.c2(x).flatten(2)  # [S, 4, L]
        return self.out(torch.tanh(self.c1(h)).mean(-1))


@pytest.mark.parametrize("output", ["sum_logits", "logits"])
def test_grouped_conv_padding_modes_conv1d_and_groupnorm_are_hooked_and_exact(output: str) -> None:
    from ntkit.partition import conv_filters

    torch.manual_seed(0)
    model = ConvZoo().double().eval()
    x = torch.randn(5, 3, 7, 7, dtype=torch.float64)
    for part in (layers_partition(model), conv_filters(model)):
        ref = modular_ntk(model, x, part, strategy="brute_force", output=output).grams
        got = modular_ntk(model, x, part, output=output, strategy="hooks")
        assert got.fallback_layers == [] and rel(got.grams, ref) <= 1e-10
