"""plreg (seed 002): features = the engine's spectra, TopK counts and protection, the relaxed mask's
and the Tr(H) penalty's gradients reach the gate (the latter against finite differences in float64),
non-finite features keep the mask, and surgery through the harness gives a smaller model that trains on."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import ntkit
from ntkit.errors import ConfigError
from ntkit.harness import ImageTask, LoopConfig, MethodEntry, train_run
from ntkit.methods import build_method
from ntkit.methods.base import LoopContext
from ntkit.methods.plreg import (
    Gate,
    PLRegConfig,
    _Masked,
    mask_index,
    masked_params,
    normalise_features,
    relaxed_topk,
    structure_features,
)
from ntkit.models import build_model
from ntkit.ntk.hessian import hessian_trace_estimate
from ntkit.partition import attention_heads, linear_neurons
from ntkit.pruning import Pruner


def _vit(depth: int = 2, heads: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return build_model("vit_tiny", dim=32, depth=depth, heads=heads).eval()


def _toy_task(depth: int = 1, heads: int = 2, n: int = 96) -> ImageTask:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x.flatten(1) @ torch.randn(64, 10, generator=g)).argmax(1)
    a, b = 2 * n // 3, 5 * n // 6
    return ImageTask(name="toy", train_x=x[:a], train_y=y[:a], val_x=x[a:b], val_y=y[a:b], test_x=x[b:],
                     test_y=y[b:], partition_fn=attention_heads,
                     build=lambda: build_model("vit_tiny", dim=16, depth=depth, heads=heads))


def test_features_equal_the_engines_spectra_for_the_same_samples() -> None:
    model = _vit()
    part = attention_heads(model)
    x = torch.randn(12, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    feats, (_spec, _grams) = structure_features(model, x, part)
    ref = ntkit.spectrum(ntkit.modular_ntk(model, x, part, dtype=torch.float64).grams)
    assert feats.dtype == torch.float64 and feats.shape == (len(part), 2)
    assert torch.equal(feats[:, 0], ref.lambda_min) and torch.equal(feats[:, 1], ref.entropy)
    # and the method measures exactly these, on the samples ctx.ntk_batch hands it
    m = build_method("plreg", kind="head", ratio=0.5)
    m.bind(model, part, None)
    ctx = LoopContext(model=model, ntk_batch=lambda s, g: (x[:s], None))
    meas = m._measure(ctx, ("head",), 12)
    assert torch.equal(meas["head"]["features"], feats)
    assert torch.equal(meas["head"]["cond"], ref.condition_number)


def test_normalised_features_are_log_zscores_and_constant_columns_are_zero() -> None:
    f = torch.tensor([[1e-6, 2.0], [1e-3, 2.0], [1.0, 2.0]], dtype=torch.float64)
    n = normalise_features(f, "log_zscore")
    lg = torch.log(f[:, 0])
    assert torch.allclose(n[:, 0], (lg - lg.mean()) / lg.std(unbiased=False), rtol=0, atol=1e-12)
    assert torch.equal(n[:, 1], torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("count", [0, 5, 8, 12])
def test_topk_keeps_exactly_the_requested_count_and_never_empties_a_layer(count: int) -> None:
    model = _vit(depth=4, heads=4)  # 16 heads in 4 layers
    part = attention_heads(model)
    m = build_method("plreg", kind="head", ratio=0.75)
    m.bind(model, part, None)
    # adversarial: layer 0's heads score lowest, so an unprotected TopK would empty it
    z = torch.arange(16, dtype=torch.float64)
    idx = torch.arange(16)
    pruner = Pruner("random", kind="head", protect=True)
    keep = m._hard_keep(pruner, z, idx, torch.zeros(16, dtype=torch.bool), count)
    assert int((~keep).sum()) == count
    layers = part.layers
    for lay in dict.fromkeys(layers):
        assert any(keep[i] for i in range(16) if layers[i] == lay), lay
    if count == 5:  # the 3 lowest of layer 0 (one protected), then the lowest of layer 1
        assert (~keep).nonzero().flatten().tolist() == [0, 1, 2, 4, 5]


def test_ste_mask_is_the_hard_mask_and_its_gradient_reaches_the_gate() -> None:
    torch.manual_seed(0)
    gate = Gate(8)
    d = torch.randn(6, 2)
    z = gate(d)
    keep = z.detach() >= z.detach().sort().values[2]  # keep the top 4 of 6
    m = relaxed_topk(z, keep, 0.5, "ste")
    assert torch.equal(m.detach(), keep.float())
    w = torch.randn(6)
    (m * w).sum().backward()
    grads = [p.grad for p in gate.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    soft = relaxed_topk(z.detach(), keep, 0.5, "sigmoid")
    assert bool(((soft > 0.5) == keep).all())  # the sigmoid's cut is the TopK's


def test_masked_params_scale_each_structures_slice_and_a_precomputed_index_changes_nothing() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    part = linear_neurons(net)
    mask = torch.rand(len(part), dtype=torch.float64)
    got = masked_params(net, part, mask)
    again = masked_params(net, part, mask, mask_index(net, part))
    params = dict(net.named_parameters())
    for g_i, g in enumerate(part):
        for sl in g.slices:
            ref = params[sl.param].narrow(sl.dim, sl.start, sl.stop - sl.start) * mask[g_i]
            assert torch.equal(got[sl.param].narrow(sl.dim, sl.start, sl.stop - sl.start), ref)
    assert got.keys() == again.keys() and all(torch.equal(got[k], again[k]) for k in got)


def test_hessian_trace_penalty_is_differentiable_wrt_the_mask_and_matches_finite_differences() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    part = linear_neurons(net)
    x, y = torch.randn(7, 4, dtype=torch.float64), torch.randint(0, 3, (7,))

    def trace(mask: torch.Tensor, create_graph: bool) -> torch.Tensor:
        wrapped = _Masked(net, masked_params(net, part, mask))
        est = hessian_trace_estimate(lambda: nn.functional.cross_entropy(wrapped(x), y), net, part, num_probes=3,
                                     generator=torch.Generator().manual_seed(5), create_graph=create_graph)
        return est.trace.sum()

    mask = torch.full((len(part),), 0.7, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(trace(mask, True), mask)
    eps = 1e-5
    for i in (0, 3, 6):
        e = torch.zeros_like(mask)
        e[i] = eps
        fd = (trace(mask.detach() + e, False) - trace(mask.detach() - e, False)) / (2 * eps)
        assert math.isclose(float(grad[i]), float(fd), rel_tol=1e-6, abs_tol=1e-9)
    # and through a gate: the penalty's gradient reaches v
    gate = Gate(4).double()
    z = gate(torch.randn(len(part), 2, dtype=torch.float64))
    keep = z.detach() > z.detach().median()
    trace(relaxed_topk(z, keep, 0.5, "ste"), True).backward()
    assert sum(float(p.grad.abs().sum()) for p in gate.parameters()) > 0


def test_frozen_penalty_is_the_masked_models_exact_trace_at_a_hard_mask() -> None:
    """trace="frozen": Tr(H) w.r.t. w of the model at m ⊙ w equals Σᵢ mᵢ·tᵢ, tᵢ the trace of
    structure i's diagonal Hessian block at θ = m ⊙ w (exact Hessians, float64)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    part = linear_neurons(net)
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    named = list(net.named_parameters())
    flat0 = torch.cat([p.detach().flatten() for _, p in named])

    def unflat(v: torch.Tensor) -> dict[str, torch.Tensor]:
        sizes = [p.numel() for _, p in named]
        return {n: c.view(p.shape) for (n, p), c in zip(named, v.split(sizes))}

    def loss_at(v: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(torch.func.functional_call(net, unflat(v), (x,)), y)

    def flat_mask(active: list[bool]) -> torch.Tensor:  # the element mask of the active groups, flattened
        ms = part.element_masks(net, active)
        return torch.cat([ms.get(n, torch.ones_like(p, dtype=torch.bool)).flatten() for n, p in named])

    everyone = [True] * len(part)
    for keep in ([1, 0, 1, 1, 0, 1], [0, 1, 1, 0, 1, 1]):
        m = flat_mask([bool(k) for k in keep]).double()
        h_w = torch.autograd.functional.hessian(lambda v, m=m: loss_at(v * m), flat0)  # w.r.t. w at m ⊙ w
        h_theta = torch.autograd.functional.hessian(loss_at, flat0 * m).diagonal()
        t = [h_theta[~flat_mask(everyone[:i] + [False] + everyone[i + 1:])].sum() for i in range(len(part))]
        frozen = (torch.tensor(keep, dtype=torch.float64) * torch.stack(t)).sum()
        assert math.isclose(float(h_w.diagonal().sum()), float(frozen), rel_tol=1e-10, abs_tol=1e-12)


@pytest.mark.parametrize("trace", ["differentiated", "frozen"])
def test_frozen_trace_estimates_once_per_pruning_time_without_a_graph(monkeypatch, trace: str) -> None:
    """The frozen penalty is measured once (no graph: no third-order backward) and the gate still
    trains on it; the differentiated one re-estimates with its graph at every gate step."""
    from ntkit.ntk import hessian

    calls: list[bool] = []
    real = hessian.hessian_trace_estimate

    def spy(*a, **k):
        if k.get("num_probes") == 3:  # the gate's, not the diagnostics' (track_probes=1)
            calls.append(bool(k.get("create_graph", False)))
        return real(*a, **k)

    monkeypatch.setattr(hessian, "hessian_trace_estimate", spy)
    cfg = LoopConfig(epochs=1, batch_size=16, lr=1e-2, progress=False)
    pl = {"ratio": 0.5, "t": 1, "num_samples": 8, "track_samples": 4, "track_probes": 1, "gate_steps": 3,
          "num_probes": 3, "trace": trace}
    rec = train_run(_toy_task(depth=1, heads=4), "pl", MethodEntry("plreg", pl), cfg, seed=0)
    assert calls == ([True] * 3 if trace == "differentiated" else [False])
    prune = next(h for h in rec["method_history"] if h["event"] == "pl_prune")
    assert len(prune["pruned"]) == 2 and len(prune["gate_loss"]) == 3
    assert all(math.isfinite(v) for v in prune["gate_loss"])


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"plreg.ratio=1.0"):
        build_method("plreg", ratio=1.0)
    with pytest.raises(ConfigError, match=r"plreg.t_end=2"):
        build_method("plreg", schedule="linear", t0=3, t_end=2)
    with pytest.raises(ConfigError, match=r"plreg.kind='head\+head'"):
        build_method("plreg", kind="head+head")
    sched = PLRegConfig(schedule="linear", t0=3, t_end=5).pruning_schedule()  # after epochs 3, 4, 5 (1-based)
    assert [sched.ratio_at(e) for e in range(6)] == pytest.approx([0, 0, 0.25, 0.5, 0.75, 0.75])


def test_nonfinite_features_keep_the_previous_mask_and_name_the_modules(monkeypatch) -> None:
    from ntkit.methods import plreg

    real = plreg.structure_features

    def broken(*a, **k):
        f, rest = real(*a, **k)
        f[1, 0] = float("nan")
        return f, rest

    monkeypatch.setattr(plreg, "structure_features", broken)
    cfg = LoopConfig(epochs=1, batch_size=16, lr=1e-2, progress=False)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        rec = train_run(_toy_task(depth=2), "pl", MethodEntry("plreg", {"ratio": 0.5, "t": 1, "num_samples": 8,
                                                                         "track_every": 0, "gate_steps": 1}),
                        cfg, seed=0)
    msgs = [str(x.message) for x in w if "plreg: non-finite features" in str(x.message)]
    assert msgs and "blocks.0.attn.head1" in msgs[0]
    assert rec["structure_changes"] == [] and not any(rec["pruned_history"][-1])


def test_surgery_through_the_harness_gives_a_smaller_model_that_trains_on() -> None:
    task = _toy_task(depth=1, heads=4)
    cfg = LoopConfig(epochs=3, batch_size=16, lr=1e-2, eval_every=2, progress=False)
    pl = {"ratio": 0.5, "t": 1, "num_samples": 8, "track_samples": 4, "track_probes": 1, "gate_steps": 2}
    rec = train_run(task, "pl", MethodEntry("plreg", pl), cfg, seed=0)
    dense = train_run(task, "v", MethodEntry("vanilla"), cfg, seed=0)
    assert len(rec["structure_changes"]) == 1 and len(rec["structure_changes"][0]) == 2
    per_head = 3 * 16 * 4 + 3 * 4 + 4 * 16  # qkv rows + bias, proj columns (dim 16, head_dim 4)
    assert dense["num_params"] - rec["num_params"] == 2 * per_head
    assert rec["module_names"] == [n for n in dense["module_names"] if n not in rec["structure_changes"][0]]
    prune = next(h for h in rec["method_history"] if h["event"] == "pl_prune")
    assert prune["epoch"] == 0 and len(prune["gate_loss"]) == 2
    after = [c["val_loss"] for c in rec["curve"] if c["step"] > prune["step"]]
    assert all(math.isfinite(v) for v in after)
    assert rec["epoch_train_acc"][-1] > rec["epoch_train_acc"][0]  # the reduced model trains on
    tracks = [h for h in rec["method_history"] if h["event"] == "pl_track" and h.get("phase") != "before"]
    assert [h["epoch"] for h in tracks] == [0, 1, 2] and all(h["num_structures"] == 2 for h in tracks)
    assert all(h["trace_mean"] is not None and math.isfinite(h["trace_mean"]) for h in tracks)
    # the decision's time splits into features, gate training and the rest (TopK, surgery)
    t = [r for r in rec["log"] if r.get("event") == "pl_time"][-1]
    assert 0 < t["features_s"] and 0 < t["gate_s"] and t["features_s"] + t["gate_s"] < t["decision_s"]


@pytest.mark.slow
def test_pruned_step_bench_quick_smoke(tmp_path) -> None:
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "pruned_step.py"
    spec = importlib.util.spec_from_file_location("_bench_pruned_step", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "ps.json"
    assert mod.main(["--quick", "--reps", "1", "--out", str(out)]) == 0
    res = {r["case"]: r for r in json.loads(out.read_text())["results"]}
    bert, vgg = res["bert_small_heads_75"], res["vgg16_filters_50"]
    assert bert["params"]["pruned"] < bert["params"]["dense"] and 0.5 < bert["flop_ratio"] < 1.0
    # half the filters of every conv: conv FLOPs scale with in × out channels (≈ 1/4), the classifier less
    assert 0.2 < vgg["flop_ratio"] < 0.35, vgg["flop_ratio"]
    switch, resnet = res["switch_small_experts_50"], res["resnet56_filters_25"]
    assert switch["params"]["pruned"] < switch["params"]["dense"] and switch["removed_groups"] == switch["groups"] // 2
    # a quarter of each block's first-conv filters: that conv's and the next one's FLOPs fall by ≈ 1/4
    assert resnet["removed_groups"] > 0 and 0.6 < resnet["flop_ratio"] < 0.95, resnet["flop_ratio"]
