"""Lightning clips gradients right after the module's ``on_before_optimizer_step``: by then the callbacks' masks have
zeroed the masked weights' gradients (so the clipping norm is the kept weights'), as when the module runs its own
clipping or logs gradient norms there."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from conftest import make_trainer
from lightning_prune import AutoPruneCallback, IterativeMagnitude
from lightning_prune.demo import DigitsDataModule, ImageClassifier


class MaskedGradientProbe(ImageClassifier):
    """Records, at its own ``on_before_optimizer_step`` (after the callbacks', before Lightning's clipping), the largest
    gradient left at a masked weight."""

    def __init__(self) -> None:
        super().__init__("lenet300100")
        self.masks: dict[str, torch.Tensor] = {}
        self.largest: list[float] = []

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.masks:
            self.largest.append(max(float(self.get_parameter(name).grad[~mask].abs().max()) for name, mask in self.masks.items()))


def _masks_of(callback) -> dict[str, torch.Tensor]:
    masks = callback.masks
    return {} if masks is None else {name: mask.bool() for name, mask in masks.masks.items()}


class _ShareMasks(pl.Callback):
    def __init__(self, pruning) -> None:
        self.pruning = pruning

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        pl_module.masks = _masks_of(self.pruning)


@pytest.mark.parametrize(
    "make_pruning",
    [
        lambda: IterativeMagnitude(sparsity=0.8, schedule="one_shot", start_epoch=1, make_permanent=False, verbose=False),
        lambda: AutoPruneCallback(target_sparsity=0.8, end_epoch=0, verbose=False),
    ],
    ids=["IterativeMagnitude", "AutoPruneCallback-fine-tune"],
)
def test_masked_gradients_are_zero_before_lightning_clips_them(tmp_path, make_pruning) -> None:
    pruning, model = make_pruning(), MaskedGradientProbe()
    trainer = make_trainer(tmp_path, [pruning, _ShareMasks(pruning)], max_epochs=2, gradient_clip_val=0.1)
    trainer.fit(model, DigitsDataModule())
    assert len(model.largest) > 5 and max(model.largest) == 0.0
