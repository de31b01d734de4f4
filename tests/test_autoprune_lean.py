"""AutoPrune's lean step: the fine-tune phase costs what fixed masks cost (a ``MaskSet``, no gating), its zeros stay
exact, a resume on either side of the switch ends as the uninterrupted run; op counts per Trainer step on ResNet-20."""

from __future__ import annotations

from typing import Any, Optional

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torch.nn.utils.parametrize as parametrize
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune import AutoPruneCallback, DigitsDataModule, ImageClassifier, build_network
from lightning_prune.auxiliary import AuxiliaryParameters
from lightning_prune.demo.models import LeNet5
from lightning_prune.diagnostics import OpCount, count_ops
from lightning_prune.structure import find_channel_groups

from test_autoprune import CountingLoader

FAST = dict(init=0.1, aux_lr=0.05, reg=2.0, verbose=False)


def gated(model: nn.Module) -> bool:
    return any(parametrize.is_parametrized(module) for module in model.modules())


class ResNet20(pl.LightningModule):
    """ResNet-20 on 3x32x32 inputs, SGD with momentum and weight decay; the optimizer step of ``count_step`` (the
    forward and backward of its closure included) is counted with ``count_ops``."""

    def __init__(self, count_step: int = -1) -> None:
        super().__init__()
        self.network = build_network("resnet20", num_classes=10, in_channels=3, image_size=32)
        self.example_input_array = torch.zeros(1, 3, 32, 32)
        self.count_step, self.count = count_step, OpCount()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        if self.trainer.global_step != self.count_step:
            return super().optimizer_step(*args, **kwargs)
        _, count = count_ops(super().optimizer_step, *args, **kwargs)
        self.count = _add(self.count, count)


def _add(a: OpCount, b: OpCount) -> OpCount:
    return OpCount(a.ops + b.ops, a.syncs + b.syncs, a.transfers + b.transfers, a.by_op + b.by_op, a.sync_ops + b.sync_ops)


class CountBatchHooks(pl.Callback):
    """Adds the ops of ``callback``'s batch hooks at the module's counted step to the module's count."""

    def __init__(self, callback: pl.Callback) -> None:
        for name in ("on_train_batch_start", "on_train_batch_end"):
            setattr(callback, name, self._counted(getattr(callback, name)))

    @staticmethod
    def _counted(hook: Any) -> Any:
        def counted(trainer: pl.Trainer, pl_module: ResNet20, *args: Any) -> Any:
            if trainer.global_step != pl_module.count_step:
                return hook(trainer, pl_module, *args)
            result, count = count_ops(hook, trainer, pl_module, *args)
            pl_module.count = _add(pl_module.count, count)
            return result

        return counted


def _random_batches(seed: int, batches: int = 3, batch: int = 2) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batches * batch, 3, 32, 32, generator=generator)
    return DataLoader(TensorDataset(x, torch.randint(0, 10, (batches * batch,), generator=generator)), batch_size=batch)


def resnet20_step(trainer_factory, callback: Optional[pl.Callback]) -> OpCount:
    """The ops of one ResNet-20 training step in epoch 1 (global step 4 of 3 per epoch), the callback's batch hooks
    included; a third epoch leaves AutoPrune's fine-tuning room after an ``end_epoch=1``."""
    pl.seed_everything(0)
    model = ResNet20(count_step=4)
    callbacks = [] if callback is None else [callback, CountBatchHooks(callback)]
    trainer_factory(callbacks, max_epochs=3, limit_val_batches=0, deterministic=False).fit(model, _random_batches(0))
    return model.count


# ---------------------------------------------------------------------- the fine-tune phase at mask cost
@pytest.mark.parametrize("granularity", ["element", "channel"])
def test_a_fine_tune_step_costs_what_fixed_masks_cost(trainer_factory, granularity):
    """Dense ResNet-20: about 511 ops per step; a MaskSet adds two fused multiplies (gradients, weights). The gating
    ``W ⊙ h(M)`` kept through fine-tuning cost +88 (element) and +126 (channel)."""
    dense = resnet20_step(trainer_factory, None)
    pruning = AutoPruneCallback(aux_dataloader=list(_random_batches(1)), end_epoch=0, granularity=granularity, **FAST)
    fine_tune = resnet20_step(trainer_factory, pruning)
    assert dense.ops > 400 and dense.syncs == 0
    assert 2 <= fine_tune.ops - dense.ops <= 6, (fine_tune.ops, dense.ops, fine_tune.by_op - dense.by_op)
    assert fine_tune.syncs == 0 and fine_tune.by_op["aten::_foreach_mul_"] == 2, fine_tune.sync_ops


class FineTuneWatch(pl.Callback):
    """In the fine-tune phase, at every batch end: no gating on the model, and every weight switched off at the first
    fine-tune batch is exactly +0.0 (no sign bit); counts the weights that moved elsewhere."""

    def __init__(self, pruning: AutoPruneCallback) -> None:
        self.pruning, self.off, self.first, self.checked, self.moved = pruning, None, None, 0, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.pruning.masks is None:
            return
        assert not gated(pl_module)
        weights = {name: pl_module.get_parameter(name).detach() for name in self.pruning.masks.masks}
        if self.off is None:
            self.off = {name: ~mask.clone() for name, mask in self.pruning.masks.masks.items()}
            self.first = {name: w.clone() for name, w in weights.items()}
        for name, weight in weights.items():
            off = self.off[name]
            assert torch.equal(weight[off], torch.zeros_like(weight[off])), name
            assert not torch.signbit(weight[off]).any(), name
            self.checked += int(off.sum())
            self.moved += int((weight[~off] != self.first[name][~off]).sum())


def test_zeros_stay_exactly_zero_through_fine_tuning_with_momentum_and_weight_decay(trainer_factory):
    pruning = AutoPruneCallback(end_epoch=0, **FAST)
    watch = FineTuneWatch(pruning)
    model = ImageClassifier("lenet300100", optimizer="sgd", momentum=0.9, weight_decay=5e-2)
    trainer_factory([pruning, watch], max_epochs=3, limit_val_batches=0).fit(model, DigitsDataModule(aux_fraction=0.5))
    assert watch.checked > 10_000 and watch.moved > 10_000


class GatedAtStart(pl.Callback):
    """Whether the model trains under the gating ``W ⊙ h(M)`` when training starts (after a checkpoint is restored)."""

    def __init__(self) -> None:
        self.gated: Optional[bool] = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.gated = gated(pl_module)


def _run(trainer_factory, ckpt_path=None, callbacks=(), granularity="element", physical=False):
    pl.seed_everything(0)
    model = ImageClassifier("lenet5" if granularity == "channel" else "lenet300100")
    pruning, start = AutoPruneCallback(end_epoch=0, granularity=granularity, physical=physical, **FAST), GatedAtStart()
    trainer = trainer_factory([pruning, start, *callbacks], max_epochs=3, limit_train_batches=4, limit_val_batches=0,
                              enable_checkpointing=bool(callbacks))
    trainer.fit(model, DigitsDataModule(aux_fraction=0.5), ckpt_path=ckpt_path)
    return model, pruning, start.gated


@pytest.mark.parametrize(("granularity", "physical"), [("element", False), ("channel", True)])
def test_resume_on_either_side_of_the_switch_ends_as_the_uninterrupted_run(tmp_path, trainer_factory, granularity, physical):
    """Learning in epoch 0, fine-tuning in epochs 1-2: the checkpoint of epoch 0 is from before the switch (the
    resumed run makes it itself), epoch 1's from the fine-tune phase (it holds the masks, the resumed run starts
    without gating). Channel granularity removes the switched-off channels at the end of fit from either."""
    every = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_epochs=1, save_top_k=-1, filename="{epoch}")
    uninterrupted, _, _ = _run(trainer_factory, callbacks=[every], granularity=granularity, physical=physical)
    before, during = (torch.load(tmp_path / "ckpt" / f"epoch={epoch}.ckpt", weights_only=False) for epoch in (0, 1))
    assert before["callbacks"]["AutoPruneCallback"]["masks"] is None
    assert during["callbacks"]["AutoPruneCallback"]["masks"] and not any("parametrizations" in key for key in during["state_dict"])
    for epoch in (0, 1):
        resumed, pruning, gated = _run(trainer_factory, ckpt_path=str(tmp_path / "ckpt" / f"epoch={epoch}.ckpt"),
                                       granularity=granularity, physical=physical)
        assert gated == (epoch == 0)  # from the fine-tune phase's checkpoint: its masks, no gating from the start
        assert uninterrupted.state_dict().keys() == resumed.state_dict().keys()
        for key, value in uninterrupted.state_dict().items():
            assert torch.equal(value, resumed.state_dict()[key]), (epoch, key)
        assert pruning.switched_off is not None and pruning.switched_off > 0
    if physical:
        assert sum(p.numel() for p in resumed.parameters()) < sum(p.numel() for p in ImageClassifier("lenet5").parameters())


# ---------------------------------------------------------------------- channel mode's gating
def test_channel_gating_costs_at_most_300_ops_over_element_per_learning_step(trainer_factory):
    """While ``M`` learns, a ResNet-20 step gates 63 tensors per channel (convolutions and their BatchNorms' weights and
    biases) where element pruning gates 22: every gate comes from one gather per change of ``M`` (and one per held-out
    forward), the magnitudes and the one-channel floor from a few ops for the whole network. Rebuilt per tensor, twice
    per step, the gates cost +1,530 ops over element pruning's step."""
    counts = {}
    for granularity in ("element", "channel"):
        pruning = AutoPruneCallback(aux_dataloader=list(_random_batches(1)), end_epoch=1, granularity=granularity, **FAST)
        counts[granularity] = resnet20_step(trainer_factory, pruning)
    element, channel = counts["element"], counts["channel"]
    for count in (element, channel):  # in the counted step: W's step with the switched-off weights restored, M's step
        assert count.by_op["aten::_foreach_lerp_"] == count.by_op["aten::addcmul_"] == 1, count.by_op
    assert channel.ops - element.ops <= 300, (channel.ops, element.ops, channel.by_op - element.by_op)
    assert channel.syncs == element.syncs == 0, (channel.sync_ops, element.sync_ops)


# ---------------------------------------------------------------------- the held-out batch, prefetched
class DrawnBeforeTheStep(pl.Callback):
    """At every batch start: how many held-out batches this epoch's pass has drawn (the loader counts them)."""

    def __init__(self, loader: CountingLoader) -> None:
        self.loader, self.base, self.seen = loader, 0, []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.base = self.loader.batches

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append((batch_idx, self.loader.batches - self.base))


def test_the_held_out_batch_is_drawn_before_its_step_and_none_is_wasted(trainer_factory):
    """After each auxiliary step the next step's held-out batch is drawn and moved to the device, so a step (but the
    first of an epoch, which begins a pass) finds it ready; none is drawn that no step uses."""
    data = DigitsDataModule(aux_fraction=0.5)
    data.setup("fit")
    loader = CountingLoader(data.aux_dataloader())
    probe = DrawnBeforeTheStep(loader)
    pruning = AutoPruneCallback(aux_dataloader=loader, end_epoch=1, **FAST)
    trainer = trainer_factory([pruning, probe], max_epochs=3, limit_train_batches=5, limit_val_batches=0)
    trainer.fit(ImageClassifier("lenet300100"), data)
    assert probe.seen[:10] == [(index, 0 if index == 0 else index + 1) for index in range(5)] * 2  # epochs 0 and 1 learn
    assert probe.seen[10:] == [(index, 0) for index in range(5)]  # fine-tuning draws none
    assert loader.batches == 10 and trainer.global_step == 15


# ---------------------------------------------------------------------- what DDP must reduce
@pytest.mark.parametrize("granularity", ["element", "channel"])
def test_one_reduce_per_auxiliary_step_of_one_signal_per_entry_of_m(granularity):
    """Under DDP the loss signal of ``M`` is averaged over ranks (every rank then takes the same step): one all-reduce
    per step, of one value per entry of ``M``: per channel with channel granularity (a few hundred values for LeNet-5's
    ~21,000 weights), per weight with element granularity (each weight's own signal: what DDP reduces for ``W``)."""
    net, layers = LeNet5(), ["features.0", "features.3", "classifier.1", "classifier.3"]
    groups = find_channel_groups(net, torch.zeros(1, 1, 8, 8)) if granularity == "channel" else ()
    core = AuxiliaryParameters(net, layers, granularity, groups)
    core.prepare()
    core.build_optimizer("sgd", 0.1)
    reduced = []
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    core.learn(lambda: F.cross_entropy(net(x), y), reg=1.0, reduce=lambda t: reduced.append(t.numel()) or t)
    entries = core.values_flat.numel()
    assert reduced == [entries]
    weights = sum(net.get_submodule(name).weight.numel() for name in layers)
    assert entries == (weights if granularity == "element" else sum(group.size for group in groups))
    assert granularity == "element" or entries < weights / 20
