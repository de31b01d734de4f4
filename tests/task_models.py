"""Non-classification LightningModules a user might bring: dict batches, their own losses, no example_input_array.

Shared by the callbacks' "any task" tests. Data is random but fixed by seed, small enough for CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pytorch_lightning import LightningModule
from torch import nn
from torch.utils.data import DataLoader, Dataset


class _DictDataset(Dataset):
    def __init__(self, items: list[dict[str, torch.Tensor]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.items[index]


class PixelRegressor(LightningModule):
    """Per-pixel regression (denoising): ``forward(batch)`` takes the whole dict, MSE loss, BatchNorm inside.

    Batches: ``{"image": (B, 1, 16, 16), "target": (B, 1, 16, 16)}``. Validation logs ``val/mse``.
    """

    def __init__(self, width: int = 8, lr: float = 0.05) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 1, 3, padding=1),
        )

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.net(batch["image"])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        loss = F.mse_loss(self(batch), batch["target"])
        self.log("train/mse", loss)
        return {"loss": loss}

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("val/mse", F.mse_loss(self(batch), batch["target"]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def pixel_loader(samples: int = 64, batch_size: int = 16, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    clean = torch.rand(samples, 1, 16, 16, generator=generator)
    noisy = clean + 0.1 * torch.randn(samples, 1, 16, 16, generator=generator)
    items = [{"image": noisy[i], "target": clean[i]} for i in range(samples)]
    return DataLoader(_DictDataset(items), batch_size=batch_size)


class TokenTagger(LightningModule):
    """A small token model: embedding + ``nn.TransformerEncoder`` + per-token head, dict batches
    ``{"tokens": (B, T) long, "labels": (B, T) long}``; ``forward(tokens)`` takes the token tensor.
    Validation logs ``val/loss``."""

    def __init__(self, vocab: int = 32, dim: int = 32, lr: float = 1e-3) -> None:
        super().__init__()
        self.lr = lr
        self.embed = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)))

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self(batch["tokens"])
        return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("val/loss", self._loss(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def token_loader(samples: int = 64, batch_size: int = 16, length: int = 12, vocab: int = 32, seed: int = 0) -> DataLoader:
    """Labels are a fixed function of the tokens (next token mod vocab), so the model can learn."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (samples, length), generator=generator)
    labels = (tokens.roll(-1, dims=1) + 1) % vocab
    items = [{"tokens": tokens[i], "labels": labels[i]} for i in range(samples)]
    return DataLoader(_DictDataset(items), batch_size=batch_size)
