"""MAT inside PyTorch Lightning (tiny ViT on random 8×8 images); skipped without Lightning."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

L = pytest.importorskip("lightning.pytorch")

from ntkit.errors import ConfigError, DataError
from ntkit.integrations.lightning import NtkitLightningCallback
from ntkit.models import build_model
from ntkit.train.flops import FlopCounter

B, N_SAMPLES, DIM, HEADS, DEPTH, TOKENS = 8, 32, 32, 4, 2, 1 + 16  # 8×8 images, 2×2 patches + class token


def data() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    ds = torch.utils.data.TensorDataset(torch.randn(N_SAMPLES, 1, 8, 8, generator=g),
                                        torch.randint(0, 10, (N_SAMPLES,), generator=g))
    return torch.utils.data.DataLoader(ds, batch_size=B, shuffle=False)


class Module(L.LightningModule):
    def __init__(self, own_optimizer: bool = True, alpha: float = 0.9):
        super().__init__()
        torch.manual_seed(0)
        self.model = build_model("vit_tiny", dim=DIM, heads=HEADS, depth=DEPTH)
        self.ntk = NtkitLightningCallback(self.model, "mat", alpha={"head": alpha}, beta=0.0, start_epoch=1,
                                          interval=1, num_samples=16)
        self.own_optimizer = own_optimizer
        self.counter, self.per_step, self.snapshot = FlopCounter(), [], None

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def backward(self, loss, *args, **kw):  # count the executed backward FLOPs of every step
        before = self.counter.total()
        with self.counter.phase("backward"):
            loss.backward()
        self.per_step.append(self.counter.total() - before)

    def on_train_epoch_start(self):
        if self.current_epoch == 1:  # after MAT's first decision (end of epoch 0)
            self.snapshot = {n: p.detach().clone() for n, p in self.model.named_parameters()}

    def configure_optimizers(self):
        if self.own_optimizer:
            return self.ntk.optimizer(lr=1e-2, weight_decay=0.1)
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def trainer(module: Module, epochs: int = 2) -> L.Trainer:
    return L.Trainer(max_epochs=epochs, callbacks=[module.ntk], accelerator="cpu", devices=1, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


def test_mat_in_lightning_freezes_heads_and_skips_their_weight_gradients():
    module = Module()
    trainer(module).fit(module, data())

    ntk = module.ntk
    part = ntk.driver.partition
    assert len(part) == DEPTH * HEADS
    assert [r["event"] for r in ntk.method.history] == ["mat", "mat"]
    active = torch.tensor([g.name in ntk.method.history[0]["active"] for g in part])  # the set of epoch 1
    n_inactive = int((~active).sum())
    assert n_inactive == len(part) - DEPTH  # α = 0.9: one head per layer stays (protection)

    params = dict(module.model.named_parameters())
    for g, on in zip(part, active.tolist(), strict=True):
        moved = any(not torch.equal(s.select(params[s.param]), s.select(module.snapshot[s.param])) for s in g.slices)
        assert moved == on, (g.name, on)

    steps = N_SAMPLES // B
    per_step = module.per_step
    assert len(per_step) == 2 * steps and len(set(per_step[:steps])) == 1 and len(set(per_step[steps:])) == 1
    dh = DIM // HEADS  # skipped per inactive head: weight gradients of its q, k, v rows and proj columns
    assert per_step[0] - per_step[steps] == n_inactive * 4 * 2 * (B * TOKENS) * dh * DIM


def test_lightning_other_optimizer_is_refused():
    module = Module(own_optimizer=False)
    with pytest.raises(ConfigError, match=r"optimizer=AdamW: expected the callback's optimizer"):
        trainer(module, epochs=1).fit(module, data())


@pytest.mark.slow  # three Lightning fits, ~20 s on the shared cores
def test_lightning_resume_restores_the_method_state(tmp_path):
    def fit(ckpt_path=None):
        module = Module(alpha=0.5)
        save = L.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1)
        L.Trainer(max_epochs=3, callbacks=[module.ntk, save], accelerator="cpu", devices=1, logger=False,
                  enable_progress_bar=False, enable_model_summary=False).fit(module, data(), ckpt_path=ckpt_path)
        return module.ntk

    full = fit().method.history
    assert len(full) == 3  # decisions at the ends of epochs 0, 1, 2; a restart would hold 2
    ckpt = tmp_path / "epoch=0-step=4.ckpt"  # saved after the first decision (end of epoch 0)
    assert "ntkit_method" in torch.load(ckpt, weights_only=False)
    ntk = fit(ckpt)
    assert [h["active"] for h in ntk.method.history] == [h["active"] for h in full]
    for r, f in zip(ntk.method.history, full):
        assert r["lambda_max"] == pytest.approx(f["lambda_max"], rel=1e-5)
    assert ntk.controller.active.tolist() == [g.name in full[-1]["active"] for g in ntk.driver.partition]

    state = torch.load(ckpt, weights_only=False)  # a checkpoint written without the callback
    del state["ntkit_method"]
    torch.save(state, tmp_path / "bare.ckpt")
    with pytest.raises(DataError, match=r"has no 'ntkit_method'"):
        fit(tmp_path / "bare.ckpt")
