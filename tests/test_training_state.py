"""The Lightning layer around a physically pruned model: any LightningModule reshapes to a pruned
checkpoint (resume, ddp_spawn), checkpoints after pruning resume, unsupported set-ups are refused."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import nn

from conftest import make_trainer
from ddp_support import ddp_trainer
from lightning_prune import (
    AutoPruneCallback,
    DigitsDataModule,
    GatePruningFromScratch,
    IterativeMagnitude,
    build_network,
    reshape_on_load,
)
from lightning_prune.training_state import rebuild_training_state, reshapes_on_load

LIMITS = dict(limit_train_batches=4, limit_val_batches=0, num_sanity_val_steps=0)


class Custom(pl.LightningModule):
    """A user's own LightningModule: no structure-aware hook, SGD with momentum (optimizer state)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = build_network("vgg_small", num_classes=10, in_channels=1, image_size=8, width=0.25)
        self.example_input_array = torch.zeros(1, 1, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def shapes(module: nn.Module) -> dict[str, torch.Size]:
    return {name: value.shape for name, value in module.state_dict().items()}


def channel_pruning() -> IterativeMagnitude:
    return IterativeMagnitude(sparsity=0.5, granularity="channel", physical=True, start_epoch=0, end_epoch=0, verbose=False)


def test_reshape_on_load_is_idempotent_and_loads_a_pruned_state_dict() -> None:
    pruned, dense = Custom(), Custom()
    first = pruned.body.features[0][0]
    pruned.body.features[0][0] = nn.Conv2d(1, 3, 3, padding=1, bias=first.bias is not None)
    with pytest.raises(RuntimeError, match="size mismatch"):
        dense.load_state_dict(pruned.state_dict(), strict=False)
    assert reshape_on_load(dense) is dense and reshape_on_load(dense) is dense
    assert len(dense._load_state_dict_pre_hooks) == 1 and reshapes_on_load(dense)


def test_checkpoint_after_physical_pruning_resumes_without_the_callback(tmp_path) -> None:
    """The optimizer state saved after fit-end pruning has the pruned shapes (momentum buffers)."""
    model = Custom()
    trainer = make_trainer(tmp_path, [channel_pruning()], max_epochs=2, **LIMITS)
    trainer.fit(model, DigitsDataModule(batch_size=32))
    trainer.save_checkpoint(tmp_path / "pruned.ckpt")
    pruned = shapes(model)
    assert pruned != shapes(Custom())
    state = torch.load(tmp_path / "pruned.ckpt", weights_only=False)["optimizer_states"][0]
    for buffer, parameter in zip(state["state"].values(), model.parameters()):
        assert buffer["momentum_buffer"].shape == parameter.shape

    resumed = reshape_on_load(Custom())  # no pruning callback in this Trainer
    trainer = make_trainer(tmp_path, [], max_epochs=3, **LIMITS)
    trainer.fit(resumed, DigitsDataModule(batch_size=32), ckpt_path=str(tmp_path / "pruned.ckpt"))
    assert trainer.global_step == 12 and shapes(resumed) == pruned


def test_gate_resume_of_a_custom_module_keeps_the_module_unpatched(tmp_path) -> None:
    options = dict(flops_ratio=0.5, gate_epochs=1, verbose=False, budget_training=True)
    model = Custom()
    trainer = make_trainer(tmp_path, [GatePruningFromScratch(**options)], max_epochs=2, **LIMITS)
    trainer.fit(model, DigitsDataModule(batch_size=32))
    assert trainer.current_epoch == 3  # the budget: 1 gate epoch + round(1 / 0.5) epochs of the pruned network
    trainer.save_checkpoint(tmp_path / "gate.ckpt")
    resumed = Custom()
    trainer = make_trainer(tmp_path, [GatePruningFromScratch(**options)], max_epochs=2, **LIMITS)
    trainer.fit(resumed, DigitsDataModule(batch_size=32), ckpt_path=str(tmp_path / "gate.ckpt"))
    assert shapes(resumed) == shapes(model) and "on_load_checkpoint" not in vars(resumed)
    assert trainer.global_step == 12  # no further epoch: the budget of 3 epochs was restored, not max_epochs=2


CALLBACKS = {
    "magnitude": channel_pruning,
    "gate": lambda: GatePruningFromScratch(flops_ratio=0.5, gate_epochs=1, verbose=False),
    "autoprune": lambda: AutoPruneCallback(granularity="channel", physical=True, init=0.1, aux_lr=0.1, reg=3.0, verbose=False),
}


@pytest.mark.parametrize("name", sorted(CALLBACKS))
def test_sharded_strategies_are_refused_at_setup(name) -> None:
    from types import SimpleNamespace

    from pytorch_lightning.strategies import DeepSpeedStrategy, FSDPStrategy

    # FSDP needs a GPU and DeepSpeed is not installed, so the Trainer is a stand-in holding the strategy
    for strategy in (FSDPStrategy(), DeepSpeedStrategy.__new__(DeepSpeedStrategy)):
        model = Custom()
        with pytest.raises(MisconfigurationException, match=f"sharded models.*{type(strategy).__name__}"):
            CALLBACKS[name]().setup(SimpleNamespace(strategy=strategy), model, "fit")
        assert not reshapes_on_load(model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP needs a GPU")
def test_fsdp_fit_is_refused_before_any_weight_changes(tmp_path) -> None:
    model = Custom()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = make_trainer(tmp_path, [channel_pruning()], accelerator="gpu", strategy="fsdp", **LIMITS)
    with pytest.raises(MisconfigurationException, match="sharded models"):
        trainer.fit(model, DigitsDataModule(batch_size=32))
    assert all(torch.equal(v.cpu(), before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", sorted(CALLBACKS))
@pytest.mark.parametrize("compiled", ["network", "lightning_module"])
def test_compiled_models_are_refused_at_setup(name, compiled, tmp_path) -> None:
    model = Custom()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    if compiled == "network":
        model.body = torch.compile(model.body)
    trainer = make_trainer(tmp_path, [CALLBACKS[name]()], **LIMITS)
    with pytest.raises(MisconfigurationException, match="cannot prune a `torch.compile`d model"):
        trainer.fit(model if compiled == "network" else torch.compile(model), DigitsDataModule(batch_size=32))
    state = (model.body._orig_mod if compiled == "network" else model.body).state_dict()
    assert all(torch.equal(v, before[f"body.{k}"]) for k, v in state.items())


@pytest.mark.distributed
@pytest.mark.parametrize("name", sorted(CALLBACKS))
def test_ddp_spawn_physical_pruning_of_a_custom_module(name, tmp_path) -> None:
    refused = Custom()
    with pytest.raises(Exception, match="reshape_on_load"):
        ddp_trainer(tmp_path, [CALLBACKS[name]()], max_epochs=2, **LIMITS).fit(refused, DigitsDataModule(batch_size=16))
    model = reshape_on_load(Custom())
    dense = shapes(model)
    trainer = ddp_trainer(tmp_path, [CALLBACKS[name]()], max_epochs=2, **LIMITS)
    trainer.fit(model, DigitsDataModule(batch_size=16))
    assert shapes(model) != dense  # the main process holds rank 0's pruned network
    x = torch.randn(4, 1, 8, 8)
    model.eval()
    assert torch.isfinite(model(x)).all()


class Scheduled(Custom):
    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)}


class Rebuild(pl.Callback):
    """Rebuilds the training state at the start of epoch 2 and records the learning rate it gives."""

    def __init__(self, fresh: bool) -> None:
        self.fresh = fresh

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == 2:
            old = trainer.optimizers[0]
            rebuild_training_state(trainer, fresh=self.fresh)
            assert trainer.optimizers[0] is not old
            self.lr = trainer.optimizers[0].param_groups[0]["lr"]
            self.scheduler_epoch = trainer.lr_scheduler_configs[0].scheduler.last_epoch


@pytest.mark.parametrize("fresh", [False, True])
def test_rebuild_carries_over_or_starts_fresh(fresh, tmp_path) -> None:
    rebuild = Rebuild(fresh)
    make_trainer(tmp_path, [rebuild], max_epochs=3, **LIMITS).fit(Scheduled(), DigitsDataModule(batch_size=32))
    assert (rebuild.lr, rebuild.scheduler_epoch) == ((0.1, 0) if fresh else (0.025, 2))
