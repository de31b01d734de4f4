"""`IterativeMagnitude` on a user's own non-classification LightningModules: dict batches, no example_input_array."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from lightning_prune import IterativeMagnitude, sparsity_report
from lightning_prune.flops import count_flops

from conftest import make_trainer
from task_models import PixelRegressor, TokenTagger, pixel_loader, token_loader


class Losses(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))


def exact_zeros(model, target):
    total = sparsity_report(model).total
    return total.total - total.nonzero == round(target * total.total)


@pytest.mark.parametrize("task", ["pixel", "token"])
def test_element_pruning_reaches_the_exact_target_and_the_zeros_hold(tmp_path, task):
    model, loader = (PixelRegressor(), pixel_loader()) if task == "pixel" else (TokenTagger(), token_loader())
    losses = Losses()
    pruning = IterativeMagnitude(0.7, "agp", start_epoch=1, end_epoch=2, make_permanent=False, monitor=None, verbose=False)
    make_trainer(tmp_path, [pruning, losses], max_epochs=4).fit(model, loader)
    assert exact_zeros(model, 0.7)
    for name, mask in pruning.masks.masks.items():  # zeros survived two epochs of optimizer steps
        assert not model.get_parameter(name)[~mask].any(), name
    assert all(torch.isfinite(torch.tensor(losses.losses)))
    # FLOPs are per sample: the dense count is the count on one sample of the first training batch
    batch = next(iter(loader))
    example = (batch,) if task == "pixel" else (batch["tokens"],)
    one = tuple({k: v[:1] for k, v in a.items()} if isinstance(a, dict) else a[:1] for a in example)
    assert pruning.figures.dense_flops.total == count_flops(model, one).total > 0


def test_channel_pruning_without_an_example_input_array_is_exact_after_physical_removal(tmp_path):
    batch = next(iter(pixel_loader()))
    probe = {"image": batch["image"][:4]}

    class Outputs(pl.Callback):
        def on_fit_end(self, trainer, pl_module):
            with torch.no_grad():
                self.output = pl_module.eval()(probe)
            pl_module.train()
            pruning = next(cb for cb in trainer.callbacks if isinstance(cb, IterativeMagnitude))
            if pruning.pruner is not None:
                self.plan = dict(pruning.pruner.plan)

    masked, physical = Outputs(), Outputs()
    pruning = IterativeMagnitude(0.5, "iterative", start_epoch=1, end_epoch=2, granularity="channel", physical=True, monitor="val/mse", verbose=False)
    model = PixelRegressor()
    make_trainer(tmp_path, [masked, pruning, physical], max_epochs=3).fit(model, pixel_loader(), pixel_loader(seed=1))
    assert torch.allclose(masked.output, physical.output, atol=1e-5)
    assert model.net[0].out_channels < 8 or model.net[3].out_channels < 8
    one_sample = ({"image": batch["image"][:1]},)
    assert count_flops(model, one_sample).total == pruning.figures.predictor.predict(masked.plan) < pruning.figures.dense_flops.total


def test_element_pruning_needs_no_example_at_all(tmp_path):
    class TwoArguments(PixelRegressor):
        """forward(image, gain): neither the batch's first tensor nor the whole batch is an input."""

        def forward(self, image, gain):
            return self.net(image) * gain

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.mse_loss(self(batch["image"], 1.0), batch["target"])

    model = TwoArguments()
    pruning = IterativeMagnitude(0.6, "one_shot", start_epoch=1, monitor=None, verbose=False)
    with pytest.warns(UserWarning, match="FLOPs are not reported"):
        make_trainer(tmp_path, [pruning], max_epochs=2).fit(model, pixel_loader())
    assert pruning.figures.dense_flops is None
    assert exact_zeros(model, 0.6)
