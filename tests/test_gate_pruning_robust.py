"""GatePruningFromScratch never loses a user's run: crashes and Ctrl-C in the gate phase leave the model as it
was (expansion included); odd set-ups (two instances, reuse, SWA, bf16-true, fast_dev_run) work or refuse
clearly; every argument is type-checked at construction; the snapshot and budget survive a resume."""

from __future__ import annotations

import signal
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint, StochasticWeightAveraging
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from lightning_prune import DigitsDataModule, GatePruningFromScratch, ImageClassifier
from lightning_prune.flops import count_flops
from task_models import PixelRegressor, pixel_loader

LIMITS = dict(limit_train_batches=4, limit_val_batches=2, num_sanity_val_steps=0)


def digits() -> DigitsDataModule:
    return DigitsDataModule(batch_size=32, image_size=32, channels=3)


def classifier() -> ImageClassifier:
    return ImageClassifier("vgg_small", in_channels=3, image_size=32, width=0.25)


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: ImageClassifier, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert model.width == 0.25 and after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


class Interrupt(pl.Callback):
    """Raises `error` at the 3rd training step, i.e. in the middle of the gate phase."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == 2:
            raise self.error


def test_a_crash_in_the_gate_phase_leaves_the_widened_model_as_it_was(trainer_factory) -> None:
    model = classifier()
    before = state(model)
    pruning = GatePruningFromScratch(gate_epochs=1, expansion=2.0, verbose=False)
    with pytest.raises(RuntimeError, match="boom"):
        trainer_factory([pruning, Interrupt(RuntimeError("boom"))], max_epochs=2, **LIMITS).fit(model, digits())
    assert_unchanged(model, before)
    assert not pruning.pruned


def test_ctrl_c_in_the_gate_phase_leaves_the_widened_model_as_it_was(trainer_factory) -> None:
    model = classifier()
    before = state(model)
    pruning = GatePruningFromScratch(gate_epochs=1, expansion=2.0, verbose=False)
    try:
        with pytest.raises(SystemExit):  # Lightning's graceful shutdown after Ctrl-C
            trainer_factory([pruning, Interrupt(KeyboardInterrupt())], max_epochs=2, **LIMITS).fit(model, digits())
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning ignores further Ctrl-C
    assert_unchanged(model, before)


def test_two_instances_in_one_trainer_are_refused(trainer_factory) -> None:
    callbacks = [GatePruningFromScratch(flops_ratio=0.5), GatePruningFromScratch(flops_ratio=0.3)]
    with pytest.raises(RuntimeError, match="more than one stateful callback of type `GatePruningFromScratch`"):
        trainer_factory(callbacks, max_epochs=1, **LIMITS)  # Lightning refuses two equal state keys
    model = classifier()
    before = state(model)
    trainer = trainer_factory([GatePruningFromScratch(flops_ratio=0.5)], max_epochs=1, **LIMITS)
    trainer.callbacks.append(GatePruningFromScratch(flops_ratio=0.3))  # added after the Trainer's own check
    with pytest.raises(MisconfigurationException, match="2 GatePruningFromScratch callbacks"):
        trainer.fit(model, digits())
    assert_unchanged(model, before)


def test_one_instance_reused_for_a_second_model_searches_afresh(trainer_factory) -> None:
    pruning = GatePruningFromScratch(gate_epochs=1, verbose=False)
    first, second = classifier(), ImageClassifier("resnet20", in_channels=3, image_size=32, width=0.25)
    dense = count_flops(second, second.example_input_array[:1]).total
    trainer_factory([pruning], max_epochs=2, **LIMITS).fit(first, digits())
    first_plan = dict(pruning.plan)
    trainer_factory([pruning], max_epochs=2, **LIMITS).fit(second, digits())
    assert count_flops(second, second.example_input_array[:1]).total <= 0.5 * dense
    assert pruning.plan.keys() != first_plan.keys() or any(len(pruning.plan[k]) != len(first_plan[k]) for k in first_plan)
    # fitting the already pruned model again continues training it: no second gate phase
    shapes = {k: v.shape for k, v in second.state_dict().items()}
    trainer = trainer_factory([pruning], max_epochs=2, **LIMITS)
    trainer.fit(second, digits())
    assert {k: v.shape for k, v in second.state_dict().items()} == shapes and trainer.global_step == 8


@pytest.mark.parametrize("fast_dev_run", [True, 2])
def test_fast_dev_run_completes(fast_dev_run, trainer_factory) -> None:
    model = classifier()
    dense = count_flops(model, model.example_input_array[:1]).total
    pruning = GatePruningFromScratch(verbose=False)
    trainer_factory([pruning], fast_dev_run=fast_dev_run).fit(model, digits())
    assert pruning.pruned and pruning.snapshot["steps"] == int(fast_dev_run)  # one gate epoch of the run's batches
    assert count_flops(model, model.example_input_array[:1]).total <= 0.5 * dense


def test_with_stochastic_weight_averaging_the_average_is_of_the_pruned_model(trainer_factory) -> None:
    model = classifier()
    before = state(model)
    inside = StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=1)  # would average the gate epoch's random weights
    with pytest.raises(MisconfigurationException, match="StochasticWeightAveraging would start averaging at epoch 0.*`swa_epoch_start` to at least 2"):
        trainer_factory([GatePruningFromScratch(gate_epochs=1, verbose=False), inside], max_epochs=3, **LIMITS).fit(model, digits())
    assert_unchanged(model, before)
    pruning = GatePruningFromScratch(gate_epochs=1, verbose=False)
    swa = StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=2)  # from the pruned network's first epoch on
    trainer_factory([swa, pruning], max_epochs=4, **LIMITS).fit(model, digits())
    assert pruning.pruned
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in swa._average_model.state_dict().items()} == shapes


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
def test_bf16_precision(precision, trainer_factory) -> None:
    model = PixelRegressor()
    pruning = GatePruningFromScratch(gate_epochs=1, monitor="val/mse", verbose=False)
    trainer = trainer_factory([pruning], max_epochs=2, precision=precision, **LIMITS)
    trainer.fit(model, pixel_loader(), pixel_loader(seed=1))
    dtype = torch.bfloat16 if precision == "bf16-true" else torch.float32
    assert pruning.pruned and all(p.dtype == dtype for p in model.parameters())
    assert pruning.snapshot["metric"] is not None and torch.isfinite(trainer.callback_metrics["val/mse"].float())


def test_snapshot_and_budget_survive_a_resume(tmp_path, trainer_factory) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    options = dict(gate_epochs=1, budget_training=True, verbose=False)
    pruning = GatePruningFromScratch(**options)
    trainer_factory([pruning, checkpoint], max_epochs=2, enable_checkpointing=True, **LIMITS).fit(classifier(), digits())
    resumed = GatePruningFromScratch(**options)
    trainer = trainer_factory([resumed], max_epochs=2, **LIMITS)
    trainer.fit(classifier(), digits(), ckpt_path=str(tmp_path / "last.ckpt"))
    assert resumed.snapshot == pruning.snapshot and resumed.budget_epochs == pruning.budget_epochs == 3
    assert resumed.threshold == pruning.threshold and all(torch.equal(resumed.gates[g], pruning.gates[g]) for g in pruning.gates)
    assert trainer.max_epochs == 3


def _loss_two(pl_module: Any, batch: Any) -> torch.Tensor:
    return pl_module(batch)


@pytest.mark.parametrize(
    "argument, value",
    [
        ("flops_ratio", 0.0), ("flops_ratio", 1.5), ("flops_ratio", "0.5"), ("flops_ratio", True),
        ("gate_ratio", 1.0), ("gate_ratio", 0.0), ("gate_ratio", None),
        ("gamma", -0.1), ("gamma", "1"), ("l1", -1.0), ("l1", float("nan")),
        ("gate_epochs", -1), ("gate_epochs", 1.5), ("gate_epochs", True), ("gate_epochs", "10"),
        ("gate_lr", 0.0), ("gate_lr", [0.1]),
        ("gate_position", "relu"), ("gate_position", 1),
        ("select", "best"), ("select", None),
        ("monitor", ""), ("monitor", 3), ("monitor", ["val/loss"]),
        ("mode", "maximize"), ("mode", None),
        ("init", "zeros"),
        ("budget_training", 1), ("budget_training", "yes"),
        ("expansion", 0.5), ("expansion", "2"), ("expansion", True),
        ("example_input_fn", "x"), ("example_input_fn", lambda: None), ("example_input_fn", _loss_two),
        ("verbose", "no"), ("verbose", 0),
    ],
)
def test_every_argument_is_checked_at_construction(argument: str, value: Any) -> None:
    with pytest.raises(ValueError, match=f"`{argument}`.*{value!r}"[:60].replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        GatePruningFromScratch(**{argument: value})


def test_budget_training_with_stochastic_weight_averaging_is_refused_at_setup(trainer_factory) -> None:
    model = classifier()
    before = state(model)
    callbacks = [GatePruningFromScratch(budget_training=True), StochasticWeightAveraging(swa_lrs=0.01)]
    with pytest.raises(MisconfigurationException, match="`budget_training=True`.*StochasticWeightAveraging"):
        trainer_factory(callbacks, max_epochs=2, **LIMITS).fit(model, digits())
    assert_unchanged(model, before)


def test_resume_with_changed_arguments_keeps_the_structure_and_budget_and_says_so(tmp_path, trainer_factory) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    pruning = GatePruningFromScratch(flops_ratio=0.5, gate_epochs=1, budget_training=True, verbose=False)
    model = classifier()
    trainer_factory([pruning, checkpoint], max_epochs=2, enable_checkpointing=True, **LIMITS).fit(model, digits())
    resumed = GatePruningFromScratch(flops_ratio=0.3, gate_position="bn_weight", gate_epochs=1, budget_training=True, verbose=False)
    resumed_model = classifier()
    trainer = trainer_factory([resumed], max_epochs=2, **LIMITS)
    with pytest.warns(UserWarning, match=r"flops_ratio=0\.5.*gate_position='bn'.*flops_ratio=0\.3"):
        trainer.fit(resumed_model, digits(), ckpt_path=str(tmp_path / "last.ckpt"))
    assert resumed.budget_epochs == 3 == trainer.max_epochs and resumed.plan.keys() == pruning.plan.keys()
    assert {k: v.shape for k, v in resumed_model.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_budget_training_warns_when_max_steps_may_end_it_first(trainer_factory) -> None:
    pruning = GatePruningFromScratch(gate_epochs=1, budget_training=True, verbose=False)
    trainer = trainer_factory([pruning], max_epochs=2, max_steps=6, **LIMITS)
    with pytest.warns(UserWarning, match="`budget_training=True`.*`max_steps`=6"):
        trainer.fit(classifier(), digits())
    assert pruning.budget_epochs == 3 and trainer.global_step == 6


class StopAt(pl.Callback):
    """Stops training (as EarlyStopping or a time limit would) after the 2nd step, inside the gate phase."""

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == 2:
            trainer.should_stop = True


def test_training_stopped_inside_the_gate_phase_leaves_the_widened_model_as_it_was(trainer_factory) -> None:
    model = classifier()
    before = state(model)
    pruning = GatePruningFromScratch(gate_epochs=2, expansion=2.0, verbose=False)
    with pytest.warns(UserWarning, match="training stopped during the gate phase"):
        trainer_factory([pruning, StopAt()], max_epochs=3, **LIMITS).fit(model, digits())
    assert_unchanged(model, before)
    assert not pruning.pruned and all(p.requires_grad for p in model.parameters())
