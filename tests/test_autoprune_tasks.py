"""AutoPrune on a user's own non-classification LightningModules: dict batches, own losses, no example_input_array."""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
import torch.nn.utils.parametrize as parametrize
from torch import nn

from lightning_prune import AutoPruneCallback, sparsity_report

from task_models import PixelRegressor, TokenTagger, pixel_loader, token_loader

FAST = dict(init=0.1, aux_lr=0.1, reg=3.0, verbose=False)


class Probe(pl.Callback):
    """Training losses, and — before the masks are made permanent — M, the effective weights and an output."""

    def __init__(self, inputs=None) -> None:
        self.losses: list[float] = []
        self.inputs = inputs

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))

    def on_train_end(self, trainer, pl_module):
        pruning = next(cb for cb in trainer.callbacks if isinstance(cb, AutoPruneCallback))
        self.off = {key: (value <= 0).clone() for key, value in pruning.aux.values.items()}
        self.effective = {name: pl_module.get_submodule(name).weight.detach().clone() for name in pruning.layers}
        if self.inputs is not None:
            pl_module.eval()
            with torch.no_grad():
                self.masked_output = pl_module(self.inputs).clone()
            pl_module.train()


def test_token_tagger_learns_masks_through_its_own_training_step(trainer_factory):
    probe = Probe()
    callback = AutoPruneCallback(aux_dataloader=token_loader(seed=1), **FAST)
    model = TokenTagger()
    trainer = trainer_factory([callback, probe], max_epochs=4, limit_val_batches=0)
    trainer.fit(model, train_dataloaders=token_loader())
    assert all(math.isfinite(loss) for loss in probe.losses) and len(probe.losses) == 16
    assert callback.figures.dense_flops.total > 0  # per sample, from the first training batch
    assert any(off.any() for off in probe.off.values())  # M learned: some weights switched off
    for name, off in probe.off.items():  # masks hold: switched-off weights compute as zero
        assert torch.all(probe.effective[name][off] == 0), name
    assert not parametrize.is_parametrized(model)
    report = sparsity_report(model, callback.layers)
    assert report.total.total - report.total.nonzero == sum(int(off.sum()) for off in probe.off.values())


def test_pixel_regressor_channels_masked_output_equals_physically_pruned(trainer_factory):
    inputs = {"image": torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(3))}
    probe = Probe(inputs)
    callback = AutoPruneCallback(granularity="channel", physical=True, aux_dataloader=pixel_loader(seed=1), **FAST)
    model = PixelRegressor()
    trainer = trainer_factory([callback, probe], max_epochs=4, limit_val_batches=0)
    trainer.fit(model, train_dataloaders=pixel_loader())
    assert all(math.isfinite(loss) for loss in probe.losses)
    assert callback.figures.dense_flops and callback.figures.example is not None  # FLOPs per sample from the first training batch
    convs = [m for m in model.net if isinstance(m, nn.Conv2d)]
    removed = sum(int(off.sum()) for off in probe.off.values())
    assert removed > 0 and [c.out_channels for c in convs[:2]] != [8, 8] and convs[2].out_channels == 1
    assert sum(c.out_channels for c in convs[:2]) == 16 - removed
    assert all(c.out_channels >= 1 for c in convs)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(inputs), probe.masked_output, rtol=1e-5, atol=1e-6)


def test_resume_without_an_example_input_ends_as_the_uninterrupted_run(tmp_path, trainer_factory):
    from pytorch_lightning.callbacks import ModelCheckpoint

    def run(ckpt_path=None, callbacks=()):
        pl.seed_everything(0)
        model = PixelRegressor()
        callback = AutoPruneCallback(granularity="channel", aux_dataloader=pixel_loader(seed=1), end_epoch=2, **FAST)
        trainer = trainer_factory([callback, *callbacks], max_epochs=4, limit_val_batches=0, enable_checkpointing=bool(callbacks))
        trainer.fit(model, train_dataloaders=pixel_loader(), ckpt_path=ckpt_path)
        return model

    checkpoints = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    uninterrupted = run(callbacks=[checkpoints])
    middle = tmp_path / "ckpt" / "epoch=1.ckpt"
    assert any((v <= 0).any() for v in torch.load(middle, weights_only=False)["callbacks"]["AutoPruneCallback"]["aux"]["values"].values())
    resumed = run(ckpt_path=str(middle))
    for key, value in uninterrupted.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


class KeywordOnly(PixelRegressor):
    """A forward no candidate example fits (it needs a keyword): element pruning still runs, FLOPs are skipped."""

    def forward(self, batch=None, *, image=None):
        return self.net(image if image is not None else batch["missing"])

    def training_step(self, batch, batch_idx):
        return {"loss": torch.nn.functional.mse_loss(self(image=batch["image"]), batch["target"])}


def test_element_pruning_without_a_usable_example_warns_and_prunes(trainer_factory):
    import pytest

    callback = AutoPruneCallback(aux_dataloader=pixel_loader(seed=1), **FAST)
    model = KeywordOnly()
    with pytest.warns(UserWarning, match="FLOPs are not reported"):
        trainer_factory([callback], max_epochs=4, limit_val_batches=0).fit(model, train_dataloaders=pixel_loader())
    assert callback.figures.dense_flops is None and sparsity_report(model, callback.layers).sparsity > 0
