"""MAT inside an unchanged Hugging Face ``Trainer`` (tiny random BertForMaskedLM, no downloads)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import BertConfig, BertForMaskedLM, Trainer, TrainerCallback, TrainingArguments

from ntkit.errors import ConfigError, DataError
from ntkit.integrations.hf import NtkitCallback
from ntkit.methods import TrainingMethod
from ntkit.train.flops import FlopCounter

B, T, H, HEADS, LAYERS, N_SAMPLES = 4, 8, 16, 4, 2, 16


def tiny_bert() -> BertForMaskedLM:
    cfg = BertConfig(vocab_size=50, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                     intermediate_size=32, max_position_embeddings=T, type_vocab_size=1,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return BertForMaskedLM(cfg)


class MLMData(torch.utils.data.Dataset):
    """Random token blocks; every other position is a prediction target (labels -100 elsewhere)."""

    def __len__(self) -> int:
        return N_SAMPLES

    def __getitem__(self, i: int) -> dict:
        ids = torch.randint(0, 50, (T,), generator=torch.Generator().manual_seed(i))
        labels = ids.clone()
        labels[::2] = -100
        return {"input_ids": ids, "labels": labels}


def args(tmp_path, epochs: int = 2) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=B, num_train_epochs=epochs,
                             report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
                             disable_tqdm=True, weight_decay=0.1, seed=0)


class Watch(TrainerCallback):
    """Snapshots the weights when epoch 1 begins (after MAT's first decision at the end of epoch 0)."""

    def __init__(self, model):
        self.model, self.snapshot, self.epochs = model, None, 0

    def on_epoch_begin(self, args, state, control, **kw):
        if self.epochs == 1:
            self.snapshot = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        self.epochs += 1


def test_mat_in_trainer_freezes_heads_and_skips_their_weight_gradients(tmp_path):
    model = tiny_bert()
    ntk = NtkitCallback(model, "mat", alpha={"head": 0.9}, beta=0.0, start_epoch=1, interval=1, num_samples=8)
    watch = Watch(model)
    trainer = Trainer(model=model, args=args(tmp_path), train_dataset=MLMData(), callbacks=[ntk, watch],
                      optimizers=(ntk.optimizer(lr=1e-2, weight_decay=0.1), None))
    counter, per_step = FlopCounter(), []
    backward = trainer.accelerator.backward

    def counted_backward(loss, **kw):  # the executed backward FLOPs of every step
        before = counter.total()
        with counter.phase("backward"):
            backward(loss, **kw)
        per_step.append(counter.total() - before)

    trainer.accelerator.backward = counted_backward
    trainer.train()

    part = ntk.driver.partition
    assert len(part) == LAYERS * HEADS and all(g.kind == "head" for g in part)
    assert [r["event"] for r in ntk.method.history] == ["mat", "mat"]  # end of epochs 0 and 1
    # epoch 1 ran with the set decided at the end of epoch 0
    active = torch.tensor([g.name in ntk.method.history[0]["active"] for g in part])
    n_inactive = int((~active).sum())
    assert n_inactive == len(part) - LAYERS  # α = 0.9: one head per layer stays (protection)

    # inactive heads' weights did not move during epoch 1 (no decay, no stale moments); active ones did
    params = dict(model.named_parameters())
    for g, on in zip(part, active.tolist(), strict=True):
        moved = any(not torch.equal(s.select(params[s.param]), s.select(watch.snapshot[s.param])) for s in g.slices)
        assert moved == on, (g.name, on)

    # and their weight gradients were never computed: per inactive head the skipped work is the weight
    # gradients of its Q, K, V rows and output-projection columns, 4 × 2·(B·T)·dh·H FLOPs
    steps = len(per_step) // 2
    assert steps == N_SAMPLES // B and len(set(per_step[:steps])) == 1 and len(set(per_step[steps:])) == 1
    dh = H // HEADS
    assert per_step[0] - per_step[steps] == n_inactive * 4 * 2 * (B * T) * dh * H
    assert ntk.driver.ctx.steps_per_epoch == steps


def test_trainer_default_optimizer_is_refused(tmp_path):
    model = tiny_bert()
    ntk = NtkitCallback(model, "mat", alpha={"head": 0.5}, start_epoch=1, interval=1, num_samples=8)
    trainer = Trainer(model=model, args=args(tmp_path, epochs=1), train_dataset=MLMData(), callbacks=[ntk])
    with pytest.raises(ConfigError, match=r"optimizer=AdamW: expected the callback's optimizer"):
        trainer.train()


class Penalised(TrainingMethod):
    name = "penalised"

    def loss_term(self, ctx, batch, loss):
        return loss * 0.0


def test_loss_term_methods_are_refused():
    with pytest.raises(ConfigError, match=r"method='penalised': adds a loss term"):
        NtkitCallback(tiny_bert(), Penalised())


def _mat_trainer(out, epochs, logger=None):
    model = tiny_bert()
    ntk = NtkitCallback(model, "mat", alpha={"head": 0.5}, beta=0.0, start_epoch=1, interval=1, num_samples=8,
                        logger=logger)
    a = args(out, epochs=epochs)
    a.save_strategy = "epoch"
    trainer = Trainer(model=model, args=a, train_dataset=MLMData(), callbacks=[ntk],
                      optimizers=(ntk.optimizer(lr=1e-2, weight_decay=0.1), None))
    return trainer, ntk


def test_resume_restores_the_method_state_from_the_trainer_checkpoint(tmp_path):
    from ntkit.train.log import read_jsonl

    trainer, ntk = _mat_trainer(tmp_path / "a", 3, logger=tmp_path / "m.jsonl")
    trainer.train()
    full = ntk.method.history
    assert len(full) == 3 and len({tuple(h["active"]) for h in full}) > 1  # the set changed over time
    assert (tmp_path / "a" / "checkpoint-4" / "ntkit_method.json").is_file()
    logged = [r for r in read_jsonl(tmp_path / "m.jsonl") if r.get("event") == "mat"]
    assert [r["active"] for r in logged] == [h["active"] for h in full] and logged[0]["step"] == 4

    # a second process resumes from the end of epoch 0 (after the first decision) to the end
    trainer, ntk = _mat_trainer(tmp_path / "a", 3)
    trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-4"))
    resumed = ntk.method.history
    assert [h["active"] for h in resumed] == [h["active"] for h in full]
    for r, f in zip(resumed, full):
        assert r["lambda_max"] == pytest.approx(f["lambda_max"], rel=1e-5)
    assert torch.equal(ntk.controller.active.cpu(), torch.tensor([g.name in full[-1]["active"] for g in
                                                                 ntk.driver.partition]))

    # a checkpoint without the method state is refused instead of silently restarting the method
    (tmp_path / "a" / "checkpoint-8" / "ntkit_method.json").unlink()
    trainer, ntk = _mat_trainer(tmp_path / "a", 3)
    with pytest.raises(DataError, match=r"checkpoint-8 has no ntkit_method.json"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-8"))
