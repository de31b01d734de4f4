"""Lightning's own load paths after physical pruning: `lightning_prune.load_from_checkpoint`, a module's own
`load_from_checkpoint` with the structure read in `on_load_checkpoint`, `trainer.validate/test/predict(ckpt_path=...)`
with a pruning callback, and a fit continued from a checkpoint saved after AutoPrune removed channels."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_prune as lp
from conftest import make_trainer
from lightning_prune import AutoPruneCallback, DigitsDataModule, GatePruningFromScratch, IterativeMagnitude, build_network
from lightning_prune.structure import STRUCTURE_KEY

LIMITS = dict(limit_train_batches=4, limit_val_batches=2, limit_test_batches=2, num_sanity_val_steps=0)
X = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))


class Net(pl.LightningModule):
    """A user's own LightningModule with hyperparameters and every step, nothing pruning-aware."""

    def __init__(self, width: float = 0.25, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.body = build_network("vgg_small", num_classes=10, in_channels=1, image_size=8, width=width)
        self.example_input_array = torch.zeros(1, 1, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

    def test_step(self, batch, batch_idx):
        self.log("test_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


class ReadsStructure(Net):
    """The one line that makes `ReadsStructure.load_from_checkpoint(path)` itself load a pruned checkpoint."""

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        lp.restore_structure_from_checkpoint(self, checkpoint)


CALLBACKS = {
    "magnitude": lambda: IterativeMagnitude(sparsity=0.5, granularity="channel", physical=True, start_epoch=0, end_epoch=0, verbose=False),
    "gate": lambda: GatePruningFromScratch(flops_ratio=0.5, gate_epochs=1, verbose=False),
    "autoprune": lambda: AutoPruneCallback(granularity="channel", physical=True, init=0.1, aux_lr=0.1, reg=3.0, verbose=False),
}


def shapes(module: nn.Module) -> dict[str, torch.Size]:
    return {name: value.shape for name, value in module.state_dict().items()}


def predict_loader() -> DataLoader:
    return DataLoader(TensorDataset(X), batch_size=len(X))


@pytest.fixture(scope="module", params=sorted(CALLBACKS))
def pruned(request, tmp_path_factory):
    """(callback name, the trained pruned module, its checkpoint saved after fit)."""
    torch.set_num_threads(1)
    directory = tmp_path_factory.mktemp(request.param)
    model = Net()
    trainer = make_trainer(directory, [CALLBACKS[request.param]()], max_epochs=2, **LIMITS)
    trainer.fit(model, DigitsDataModule(batch_size=32))
    path = directory / "pruned.ckpt"
    trainer.save_checkpoint(path)
    assert shapes(model) != shapes(Net()) and STRUCTURE_KEY in torch.load(path, weights_only=False)
    return request.param, model.eval(), path


def test_the_module_class_alone_cannot_load_a_pruned_checkpoint(pruned) -> None:
    _, _, path = pruned
    with pytest.raises(RuntimeError, match="size mismatch"):
        Net.load_from_checkpoint(path)


def test_load_from_checkpoint_gives_the_pruned_module_with_its_exact_outputs(pruned) -> None:
    _, model, path = pruned
    loaded = lp.load_from_checkpoint(Net, path, map_location="cpu", strict=True)
    assert type(loaded) is Net and loaded.hparams.width == 0.25 and shapes(loaded) == shapes(model)
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in loaded.state_dict().items())
    assert torch.equal(loaded.eval()(X), model(X))
    assert lp.load_from_checkpoint(Net, str(path), lr=0.5).hparams.lr == 0.5  # kwargs override the saved hparams


def test_a_module_reading_the_structure_in_on_load_checkpoint_loads_with_its_own_class_method(pruned) -> None:
    _, model, path = pruned
    loaded = ReadsStructure.load_from_checkpoint(path)
    assert torch.equal(loaded.eval()(X), model(X))


def test_validate_test_and_predict_with_ckpt_path_load_the_pruned_checkpoint(pruned, tmp_path) -> None:
    name, model, path = pruned
    data = DigitsDataModule(batch_size=32)
    expected = make_trainer(tmp_path, [], **LIMITS)
    reference = {**expected.validate(model, data, verbose=False)[0], **expected.test(model, data, verbose=False)[0]}
    for stage in ("validate", "test", "predict"):
        fresh = Net()
        trainer = make_trainer(tmp_path, [CALLBACKS[name]()], **LIMITS)
        if stage == "predict":
            outputs = trainer.predict(fresh, predict_loader(), ckpt_path=str(path))
            assert torch.equal(torch.cat(outputs), model(X))
        else:
            results = getattr(trainer, stage)(fresh, data, ckpt_path=str(path), verbose=False)[0]
            metric = {"validate": "val_loss", "test": "test_loss"}[stage]
            assert results == {metric: reference[metric]}
        assert shapes(fresh) == shapes(model)


@pytest.mark.parametrize("name", sorted(CALLBACKS))
def test_a_fit_continues_from_a_checkpoint_saved_after_removing_channels(name, tmp_path) -> None:
    """AutoPrune rebuilds its gates for the loaded shapes; every callback's later checkpoints keep the structure."""
    model = Net()
    trainer = make_trainer(tmp_path, [CALLBACKS[name]()], max_epochs=2, **LIMITS)
    trainer.fit(model, DigitsDataModule(batch_size=32))
    trainer.save_checkpoint(tmp_path / "after.ckpt")
    pruned = shapes(model)

    continued, checkpoints = Net(), ModelCheckpoint(dirpath=tmp_path / "later", save_last=True)
    trainer = make_trainer(tmp_path, [CALLBACKS[name](), checkpoints], max_epochs=4, enable_checkpointing=True, **LIMITS)
    trainer.fit(continued, DigitsDataModule(batch_size=32), ckpt_path=str(tmp_path / "after.ckpt"))
    assert trainer.current_epoch == 4 and trainer.global_step == 16  # two more epochs, from where the first fit ended
    widths = shapes(continued)
    assert widths.keys() == pruned.keys() and all(widths[k].numel() <= pruned[k].numel() for k in pruned)
    last = torch.load(tmp_path / "later" / "last.ckpt", weights_only=False)  # written mid-fit, over the pruned model
    assert last[STRUCTURE_KEY] == torch.load(tmp_path / "after.ckpt", weights_only=False)[STRUCTURE_KEY]
    assert shapes(lp.load_from_checkpoint(Net, tmp_path / "later" / "last.ckpt")) == pruned
