"""The gate phase of GatePruningFromScratch is the first `gate_epochs` epochs of the user's own `fit`: every gate
step is a Lightning training step (counted, seen by other callbacks, checkpointed), and a checkpoint written at any
step of the gate phase resumes to the uninterrupted result."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger

from lightning_prune import DigitsDataModule, GatePruningFromScratch, ImageClassifier
from lightning_prune.gates import GATE_PARAMETER
from lightning_prune.structure import STRUCTURE_KEY
from test_magnitude_runs import ResumableDigits

BATCHES = 5
LIMITS = dict(limit_train_batches=BATCHES, limit_val_batches=2, num_sanity_val_steps=0)


def digits() -> DigitsDataModule:
    return DigitsDataModule(batch_size=32, image_size=32, channels=3)


def classifier() -> ImageClassifier:
    return ImageClassifier("vgg_small", in_channels=3, image_size=32, width=0.25)


def gate_pruning(**kwargs: Any) -> GatePruningFromScratch:
    options = dict(flops_ratio=0.5, gate_epochs=2, gate_lr=0.3, gate_ratio=0.5, verbose=False)
    return GatePruningFromScratch(**{**options, **kwargs})


class StepCounter(pl.Callback):
    """Counts the training steps Lightning runs, and what the module looked like at each."""

    def __init__(self) -> None:
        self.steps = 0
        self.gated = 0
        self.frozen_weights = 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.steps += 1
        parameters = dict(pl_module.named_parameters())
        if GATE_PARAMETER in parameters:
            self.gated += 1
            self.frozen_weights += all(not p.requires_grad for n, p in parameters.items() if n != GATE_PARAMETER)


def test_every_gate_step_is_a_training_step_of_the_fit(trainer_factory) -> None:
    counter, pruning = StepCounter(), gate_pruning()
    trainer = trainer_factory([pruning, counter], max_epochs=4, **LIMITS)
    model = classifier()
    trainer.fit(model, digits())
    assert counter.steps == trainer.global_step == 4 * BATCHES  # max_epochs × batches, gate epochs included
    assert counter.gated == counter.frozen_weights == 2 * BATCHES  # the first gate_epochs epochs: gated, weights frozen
    assert pruning.pruned and pruning.snapshot["steps"] == 2 * BATCHES
    assert GATE_PARAMETER not in dict(model.named_parameters())  # taken out at the pruning
    assert all(p.requires_grad for p in model.parameters())


def fit(tmp_path: Path, trainer_factory, name: str, ckpt_path: str | None = None, every: int | None = None, init: str = "random"):
    pl.seed_everything(0, workers=True)
    model, pruning = classifier(), gate_pruning(init=init)
    callbacks: list[pl.Callback] = [pruning]
    if every is not None:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path / name, every_n_train_steps=every, save_top_k=-1, filename="{step}"))
    trainer = trainer_factory(callbacks, max_epochs=3, enable_checkpointing=every is not None, **LIMITS)
    if ckpt_path is not None:
        pl.seed_everything(1, workers=True)  # a resumed process need not share the interrupted one's random state
        model = classifier()
    trainer.fit(model, ResumableDigits(batch_size=32, image_size=32, channels=3), ckpt_path=ckpt_path)
    return model, pruning


@pytest.mark.parametrize("step", [3, 7])  # mid-epoch in the first and in the last gate epoch
def test_a_checkpoint_inside_the_gate_phase_resumes_to_the_uninterrupted_result(tmp_path, trainer_factory, step) -> None:
    full, full_pruning = fit(tmp_path, trainer_factory, "full", every=step)
    checkpoint = tmp_path / "full" / f"step={step}.ckpt"
    saved = torch.load(checkpoint, weights_only=False)
    assert GATE_PARAMETER in saved["state_dict"] and STRUCTURE_KEY not in saved  # written inside the gate phase
    resumed, resumed_pruning = fit(tmp_path, trainer_factory, "resumed", ckpt_path=str(checkpoint))
    assert resumed_pruning.plan.keys() == full_pruning.plan.keys()
    assert all(torch.equal(resumed_pruning.plan[g], full_pruning.plan[g]) for g in full_pruning.plan)
    assert all(torch.equal(resumed_pruning.gates[g], full_pruning.gates[g]) for g in full_pruning.gates)
    assert resumed_pruning.snapshot == full_pruning.snapshot
    full_state, resumed_state = full.state_dict(), resumed.state_dict()
    assert full_state.keys() == resumed_state.keys()
    assert all(torch.equal(full_state[k], resumed_state[k]) for k in full_state)


def test_other_callbacks_see_the_gate_epochs(tmp_path, trainer_factory) -> None:
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/loss", save_top_k=-1, filename="{epoch}")
    lr_monitor, stopping = LearningRateMonitor(logging_interval="step"), EarlyStopping(monitor="val/loss", patience=5)
    logger = CSVLogger(tmp_path, name="csv")
    trainer = trainer_factory([gate_pruning(), checkpoints, lr_monitor, stopping], max_epochs=3, logger=logger, enable_checkpointing=True,
                              log_every_n_steps=1, **LIMITS)
    trainer.fit(classifier(), digits())
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["epoch=0.ckpt", "epoch=1.ckpt", "epoch=2.ckpt"]
    assert GATE_PARAMETER in torch.load(tmp_path / "ckpt" / "epoch=0.ckpt", weights_only=False)["state_dict"]
    metrics = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()
    header = metrics[0].split(",")
    rows = [dict(zip(header, line.split(","))) for line in metrics[1:]]
    lr_rows = [row for row in rows if row.get("lr-Adam")]
    assert len(lr_rows) >= 2 * BATCHES  # the gate optimizer's learning rate, at every gate step
    assert {float(row["lr-Adam"]) for row in lr_rows[: 2 * BATCHES]} == {0.3}
    assert any(row.get("gate/mean") for row in rows)
    assert torch.isfinite(stopping.best_score) and trainer.current_epoch == 3  # it compared the gate epochs too


class FirstStepRates(pl.Callback):
    """The optimizer and learning rate of each epoch's first step."""

    def __init__(self) -> None:
        self.rates: list[tuple[str, float]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:
            optimizer = trainer.optimizers[0]
            self.rates.append((type(optimizer).__name__, optimizer.param_groups[0]["lr"]))


def test_the_pruned_network_gets_fresh_optimizers_and_a_schedule_over_the_epochs_left(trainer_factory) -> None:
    """Adam on the gates in the gate epochs; then configure_optimizers' SGD and cosine schedule, built at the pruning
    over the 3 epochs left and first stepped at the end of the pruned network's first epoch (not the gate epoch's)."""
    rates = FirstStepRates()
    model = ImageClassifier("vgg_small", in_channels=3, image_size=32, width=0.25, lr=0.1, lr_schedule="cosine")
    trainer = trainer_factory([gate_pruning(gate_epochs=1), rates], max_epochs=4, **LIMITS)
    trainer.fit(model, digits())
    cosine = [0.1 * (1 + math.cos(math.pi * epoch / 3)) / 2 for epoch in range(3)]
    assert [name for name, _ in rates.rates] == ["Adam", "SGD", "SGD", "SGD"]
    assert rates.rates[0][1] == 0.3 and [lr for _, lr in rates.rates[1:]] == pytest.approx(cosine, rel=1e-12)


class StateAtEpochStart(pl.Callback):
    """The module's state as the pruned network's first epoch (epoch 2) starts, before it sees a batch."""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == 2:
            self.state = {k: v.clone() for k, v in pl_module.state_dict().items()}


def test_a_checkpoint_after_the_last_gate_validation_resumes_into_the_pruning(tmp_path, trainer_factory) -> None:
    """Saved at the last gate epoch's validation end, before its `on_train_epoch_end` prunes: the resumed fit
    prunes to the same structure and the same freshly drawn weights."""

    def run(name: str, ckpt_path: str | None = None) -> tuple[dict, GatePruningFromScratch]:
        pl.seed_everything(0, workers=True)
        pruning, state = gate_pruning(), StateAtEpochStart()
        checkpoints = ModelCheckpoint(dirpath=tmp_path / name, monitor="val/loss", save_top_k=-1, filename="{epoch}",
                                      save_on_train_epoch_end=False)
        trainer = trainer_factory([pruning, state, checkpoints], max_epochs=3, enable_checkpointing=True, **LIMITS)
        if ckpt_path is not None:
            pl.seed_everything(1, workers=True)
        trainer.fit(classifier(), digits(), ckpt_path=ckpt_path)
        return state.state, pruning

    full, full_pruning = run("full")
    checkpoint = tmp_path / "full" / "epoch=1.ckpt"
    assert GATE_PARAMETER in torch.load(checkpoint, weights_only=False)["state_dict"]
    resumed, resumed_pruning = run("resumed", str(checkpoint))
    assert resumed_pruning.snapshot == full_pruning.snapshot
    assert all(torch.equal(resumed_pruning.plan[g], full_pruning.plan[g]) for g in full_pruning.plan)
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)
