"""``ImageClassifier``: the built-in LightningModule that trains any built-in network."""

from __future__ import annotations

from typing import Literal, Optional

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from lightning_prune.demo.models import ARCHITECTURES, build_network
from lightning_prune.training_state import reshape_on_load

Architecture = Literal[
    "lenet300100", "lenet5", "lenet5_caffe", "resnet20", "resnet56", "vgg_small", "vgg11", "vgg16", "vgg_like", "mobilenetv2",
    "resnet50",
]


class ImageClassifier(pl.LightningModule):
    """Cross-entropy classifier around a built-in network.

    Logs ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc`` and ``test/acc``.

    Args:
        arch: built-in network name.
        num_classes: number of output classes.
        in_channels: input channels.
        image_size: input side (needed by the fully connected nets).
        width: channel multiplier of the network.
        optimizer: ``"sgd"`` (with ``momentum``) or ``"adam"``.
        lr: learning rate.
        momentum: SGD momentum.
        weight_decay: L2 weight decay.
        lr_schedule: ``"constant"``, ``"cosine"`` over ``max_epochs``, or ``"multistep"``
            (x0.1 at 50% and 75% of ``max_epochs``, the Pruning-from-Scratch recipe).
    """

    def __init__(
        self,
        arch: Architecture = "lenet300100",
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 8,
        width: float = 1.0,
        optimizer: Literal["sgd", "adam"] = "sgd",
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        lr_schedule: Literal["constant", "cosine", "multistep"] = "constant",
    ) -> None:
        super().__init__()
        if arch not in ARCHITECTURES:
            raise ValueError(f"`arch` must be one of {sorted(ARCHITECTURES)}, got {arch!r}.")
        if optimizer not in ("sgd", "adam"):
            raise ValueError(f"`optimizer` must be 'sgd' or 'adam', got {optimizer!r}.")
        if lr_schedule not in ("constant", "cosine", "multistep"):
            raise ValueError(f"`lr_schedule` must be 'constant', 'cosine' or 'multistep', got {lr_schedule!r}.")
        if lr <= 0:
            raise ValueError(f"`lr` must be positive, got {lr!r}.")
        self.save_hyperparameters()
        self.width = width
        self.network = build_network(arch, num_classes, in_channels, image_size, width)
        self.example_input_array = torch.zeros(1, in_channels, image_size, image_size)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        reshape_on_load(self)  # a pruned state_dict loads into a fresh module (also under ddp_spawn)

    def set_width(self, width: float) -> None:
        """Rebuild the network at another channel multiplier (the channel-expansion hook)."""
        hp = self.hparams
        self.width = width
        self.network = build_network(hp.arch, hp.num_classes, hp.in_channels, hp.image_size, width).to(self.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.train_acc(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val/loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log("val/acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.test_acc(self(x), y)
        self.log("test/acc", self.test_acc)

    def configure_optimizers(self):  # noqa: ANN201 - Lightning accepts several return shapes
        hp = self.hparams
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        else:
            optimizer = torch.optim.Adam(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        epochs: Optional[int] = self.trainer.max_epochs if self._trainer is not None else None
        if epochs is not None and epochs > 0:  # the epochs left: built after GatePruningFromScratch's gate epochs, the rest
            epochs -= self.trainer.fit_loop.epoch_progress.current.processed
        if hp.lr_schedule == "constant" or not epochs or epochs < 0:
            return optimizer
        if hp.lr_schedule == "cosine":
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
        else:
            milestones = [max(1, epochs // 2), max(1, (3 * epochs) // 4)]
            scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

