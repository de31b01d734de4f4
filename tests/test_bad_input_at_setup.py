"""Nothing is accepted that cannot run, and every error comes before a weight changes (issue 17).

- Empty mappings and mappings where a number is due are refused in ``__init__`` (``ValueError``).
- One rule for the three callbacks: a schedule that cannot complete inside the Trainer's ``max_epochs``, or the
  epochs ``max_steps`` allows, is refused at the start of ``fit`` (``MisconfigurationException`` naming the
  argument, its value and the limit), with the model's weights untouched.
- An auxiliary loader without a batch, manual optimization without ``loss_fn`` and a second instance with the
  same checkpoint key are refused at ``setup``; a ``loss_fn`` without gradient is named.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune import AutoPruneCallback, DigitsDataModule, GatePruningFromScratch, ImageClassifier, IterativeMagnitude, sparsity_report

from conftest import make_trainer

FAST = dict(limit_train_batches=3, limit_val_batches=1, num_sanity_val_steps=0)
"""Three optimizer steps per epoch."""


def lenet() -> ImageClassifier:
    return ImageClassifier("lenet300100")


def vgg() -> ImageClassifier:
    return ImageClassifier("vgg_small", in_channels=3, image_size=32, width=0.25)


def data_for(model: ImageClassifier) -> DigitsDataModule:
    return DigitsDataModule(batch_size=32, image_size=32, channels=3) if model.hparams.arch == "vgg_small" else DigitsDataModule()


def refused_before_any_change(tmp_path, model: pl.LightningModule, callbacks: list, error: type, data: Any = None, **trainer: Any) -> str:
    """Fit and expect ``error``; no optimizer step ran and every weight equals its copy taken before. The message."""
    before = {name: value.clone() for name, value in model.state_dict().items()}
    fit = make_trainer(tmp_path, callbacks, **{"max_epochs": 4, **FAST, **trainer})
    with pytest.raises(error) as raised:
        fit.fit(model, data if data is not None else data_for(model))
    assert fit.global_step == 0
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), name
    return str(raised.value)


# ------------------------------------------------------------------------------------------- __init__
@pytest.mark.parametrize(
    "make, argument, value",
    [
        (lambda: IterativeMagnitude(sparsity={}), "sparsity", {}),
        (lambda: IterativeMagnitude(scope="layer", sparsity={}), "sparsity", {}),
        (lambda: IterativeMagnitude(criterion="sensitivity", sensitivity={}), "sensitivity", {}),
        (lambda: GatePruningFromScratch(flops_ratio={}), "flops_ratio", {}),
        (lambda: GatePruningFromScratch(gate_ratio={"a": 0.5}), "gate_ratio", {"a": 0.5}),
        (lambda: AutoPruneCallback(aux_lr={}), "aux_lr", {}),
        (lambda: AutoPruneCallback(reg={}), "reg", {}),
        (lambda: AutoPruneCallback(init={}), "init", {}),
    ],
    ids=["magnitude-sparsity", "magnitude-layer-sparsity", "magnitude-sensitivity", "gate-flops_ratio", "gate-gate_ratio",
         "autoprune-aux_lr", "autoprune-reg", "autoprune-init"],
)
def test_a_mapping_where_a_number_is_due_or_an_empty_one_is_refused_by_name(make: Callable[[], Any], argument: str, value: Any) -> None:
    with pytest.raises(ValueError, match=f"`{argument}` must be") as raised:
        make()
    assert repr(value) in str(raised.value)


def test_a_one_pass_iterator_as_auxiliary_loader_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="`aux_dataloader` must be re-iterable.*list_iterator"):
        AutoPruneCallback(aux_dataloader=iter([]))
    with pytest.raises(ValueError, match="`aux_dataloader` must be re-iterable.*generator"):
        AutoPruneCallback(aux_dataloader=(batch for batch in [(torch.zeros(1, 64), torch.zeros(1))]))


# ------------------------------------------------------------------------------------------- the schedule rule
SCHEDULES = [
    # (id, model, callback, Trainer limits, argument, value, limit named)
    ("magnitude-start", lenet, lambda: IterativeMagnitude(start_epoch=10**9), {}, "start_epoch", 10**9, "`max_epochs`=4"),
    ("magnitude-frequency", lenet, lambda: IterativeMagnitude(frequency=10**9), {}, "frequency", 10**9, "`max_epochs`=4"),
    ("magnitude-end", lenet, lambda: IterativeMagnitude(start_epoch=1, end_epoch=4), {}, "end_epoch", 4, "`max_epochs`=4"),
    ("magnitude-max_steps", lenet, lambda: IterativeMagnitude(start_epoch=1, end_epoch=3), dict(max_steps=6), "end_epoch", 3, "`max_steps`=6"),
    ("magnitude-steps", lenet, lambda: IterativeMagnitude(interval="step", start_epoch=50), dict(max_epochs=-1, max_steps=20),
     "start_epoch", 50, "`max_steps`=20"),
    ("magnitude-steps-of-epochs", lenet, lambda: IterativeMagnitude(interval="step", start_epoch=2, end_epoch=12), {},
     "end_epoch", 12, "`max_epochs`=4 (12 optimizer steps)"),
    ("autoprune-start", lenet, lambda: AutoPruneCallback(start_epoch=10**9), {}, "start_epoch", 10**9, "`max_epochs`=4"),
    ("autoprune-end", lenet, lambda: AutoPruneCallback(end_epoch=100), {}, "end_epoch", 100, "`max_epochs`=4"),
    ("autoprune-end-no-fine-tuning", lenet, lambda: AutoPruneCallback(end_epoch=3), {}, "end_epoch", 3, "`max_epochs`=4"),
    ("autoprune-end-0", lenet, lambda: AutoPruneCallback(end_epoch=0), dict(max_epochs=1), "end_epoch", 0, "`max_epochs`=1"),
    ("autoprune-max_steps", lenet, lambda: AutoPruneCallback(end_epoch=1), dict(max_epochs=-1, max_steps=6), "end_epoch", 1, "`max_steps`=6"),
    ("gate", vgg, lambda: GatePruningFromScratch(gate_epochs=10**9), {}, "gate_epochs", 10**9, "`max_epochs`=4"),
    ("gate-max_steps", vgg, lambda: GatePruningFromScratch(gate_epochs=3), dict(max_epochs=-1, max_steps=6), "gate_epochs", 3, "`max_steps`=6"),
]


@pytest.mark.parametrize("model, callback, limits, argument, value, limit", [case[1:] for case in SCHEDULES], ids=[case[0] for case in SCHEDULES])
def test_a_schedule_that_cannot_complete_is_refused_before_any_weight_changes(tmp_path, model, callback, limits, argument, value, limit) -> None:
    message = refused_before_any_change(tmp_path, model(), [callback()], MisconfigurationException, **limits)
    assert f"`{argument}`={value!r}" in message and limit in message and "cannot complete" in message


@pytest.mark.parametrize(
    "callback, limits",
    [
        (lambda: IterativeMagnitude(start_epoch=1, end_epoch=3, verbose=False), dict(max_epochs=4)),
        (lambda: IterativeMagnitude(frequency=2, verbose=False), dict(max_epochs=4)),  # events at 0 and 2, halfway to max_epochs
        (lambda: AutoPruneCallback(end_epoch=2, verbose=False), dict(max_epochs=4)),
        (lambda: AutoPruneCallback(start_epoch=1, end_epoch=1, verbose=False), dict(max_epochs=-1, max_steps=9)),
    ],
    ids=["magnitude-end", "magnitude-frequency", "autoprune-end", "autoprune-max_steps"],
)
def test_the_longest_schedule_that_fits_runs_to_its_end(tmp_path, recwarn, callback, limits) -> None:
    model = lenet()
    make_trainer(tmp_path, [callback()], **{**FAST, "limit_val_batches": 0, **limits}).fit(model, DigitsDataModule())
    messages = [str(warning.message) for warning in recwarn]
    assert not any("schedule incomplete" in m or "before the fine-tuning phase" in m for m in messages), messages
    if isinstance(callback(), IterativeMagnitude):
        assert sparsity_report(model).sparsity == pytest.approx(0.5, abs=1e-4)


def test_gate_epochs_that_leave_one_epoch_of_max_steps_run(tmp_path) -> None:
    pruning = GatePruningFromScratch(gate_epochs=1, select="last", verbose=False)  # 3 steps per epoch: 1 gate epoch, 1 pruned
    trainer = make_trainer(tmp_path, [pruning], max_epochs=-1, max_steps=6, **FAST)
    trainer.fit(vgg(), data_for(vgg()))
    assert pruning.pruned and trainer.global_step == 6


# ------------------------------------------------------------------------------------------- auxiliary data, loss_fn
def _empty_drop_last_loader() -> DataLoader:
    return DataLoader(TensorDataset(torch.zeros(5, 1, 8, 8), torch.zeros(5, dtype=torch.long)), batch_size=8, drop_last=True)


class EmptyAuxData(DigitsDataModule):
    def aux_dataloader(self) -> DataLoader:
        return _empty_drop_last_loader()


@pytest.mark.parametrize(
    "loader, data, named",
    [
        ([], None, "`aux_dataloader` ([])"),
        (_empty_drop_last_loader(), None, "`aux_dataloader` (<torch.utils.data.dataloader.DataLoader"),
        (None, EmptyAuxData(), "`aux_dataloader()` of the DataModule EmptyAuxData"),
    ],
    ids=["empty-list", "drop_last-shorter-than-a-batch", "datamodule"],
)
def test_an_auxiliary_loader_without_a_batch_is_refused_at_setup(tmp_path, loader, data, named) -> None:
    message = refused_before_any_change(tmp_path, lenet(), [AutoPruneCallback(aux_dataloader=loader)], MisconfigurationException, data=data)
    assert named in message and "yields no batch" in message


class Manual(ImageClassifier):
    """An ``ImageClassifier`` that steps its optimizer itself."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(F.cross_entropy(self(batch[0]), batch[1]))
        optimizer.step()


@pytest.mark.parametrize(
    "model, callback",
    [
        (lambda: Manual("lenet300100"), lambda: AutoPruneCallback()),
    ],
    ids=["autoprune"],
)
def test_manual_optimization_without_loss_fn_is_refused_at_setup(tmp_path, model, callback) -> None:
    module = model()
    message = refused_before_any_change(tmp_path, module, [callback()], MisconfigurationException, data=data_for(module))
    assert "manual optimization" in message and "`loss_fn`=None" in message


class TwoOptimizers(Manual):
    def configure_optimizers(self) -> list:
        return [torch.optim.SGD(self.parameters(), lr=0.1), torch.optim.SGD(self.parameters(), lr=0.01)]


def test_manual_optimization_with_several_optimizers_is_refused_before_a_gate_step(tmp_path) -> None:
    module = TwoOptimizers("vgg_small", in_channels=3, image_size=32, width=0.25)
    message = refused_before_any_change(tmp_path, module, [GatePruningFromScratch(gate_epochs=1)], MisconfigurationException)
    assert "manual optimization with 2 optimizers" in message and "`self.optimizers()` is the one gate optimizer" in message


def constant_loss(pl_module: pl.LightningModule, batch: Any) -> torch.Tensor:
    return torch.tensor(1.0)


def test_a_loss_fn_without_gradient_is_named(tmp_path) -> None:
    with pytest.raises(MisconfigurationException, match=r"`loss_fn`=.*constant_loss.*requires_grad=False"):
        make_trainer(tmp_path, [AutoPruneCallback(loss_fn=constant_loss)], **FAST).fit(lenet(), DigitsDataModule())


# ------------------------------------------------------------------------------------------- two instances
class AppendsSecond(pl.Callback):
    """Puts a second pruning callback into the Trainer after construction (as ``configure_callbacks`` or a user's
    ``trainer.callbacks.append`` may), where Lightning's own check of unique state keys does not look."""

    def __init__(self, second: pl.Callback) -> None:
        self.second = second

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.second not in trainer.callbacks:
            trainer.callbacks.insert(trainer.callbacks.index(self) + 1, self.second)


@pytest.mark.parametrize(
    "model, make, named",
    [
        (lenet, lambda: IterativeMagnitude(), "distinct `name=`"),
        (lenet, lambda: IterativeMagnitude(name="encoder"), "distinct `name=`"),
        (lenet, lambda: AutoPruneCallback(), "Only one AutoPruneCallback"),
        (vgg, lambda: GatePruningFromScratch(gate_epochs=1), "2 GatePruningFromScratch callbacks"),
    ],
    ids=["magnitude", "magnitude-same-name", "autoprune", "gate"],
)
def test_a_second_instance_with_the_same_state_key_is_refused_at_setup(tmp_path, model, make, named) -> None:
    message = refused_before_any_change(tmp_path, model(), [AppendsSecond(make()), make()], MisconfigurationException)
    assert named in message


def test_two_magnitude_instances_with_distinct_names_prune_their_own_layers(tmp_path) -> None:
    first = IterativeMagnitude(0.5, "one_shot", parameters=["network.fc1"], name="first", verbose=False)
    second = IterativeMagnitude(0.8, "one_shot", parameters=["network.fc2"], name="second", verbose=False)
    model = lenet()
    make_trainer(tmp_path, [first, second], max_epochs=1, **FAST).fit(model, DigitsDataModule())
    assert float((model.network.fc1.weight == 0).float().mean()) == pytest.approx(0.5, abs=1e-3)
    assert float((model.network.fc2.weight == 0).float().mean()) == pytest.approx(0.8, abs=1e-3)
