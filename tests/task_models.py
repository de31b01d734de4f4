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


def _conv_block(inputs: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inputs, outputs, 3, padding=1), nn.BatchNorm2d(outputs), nn.ReLU())


class UNet(nn.Module):
    """A two-level U-Net: Conv/BatchNorm/ReLU encoder blocks with ``MaxPool2d``, ``ConvTranspose2d``
    up-sampling, ``torch.cat`` skip connections into the decoder blocks and a 1x1 conv head. Inputs
    ``(B, 1, H, W)`` with ``H``, ``W`` divisible by 4; output of the input's shape."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.enc1, self.enc2, self.mid = _conv_block(1, width), _conv_block(width, 2 * width), _conv_block(2 * width, 4 * width)
        self.pool = nn.MaxPool2d(2)
        self.up2, self.dec2 = nn.ConvTranspose2d(4 * width, 2 * width, 2, stride=2), _conv_block(4 * width, 2 * width)
        self.up1, self.dec1 = nn.ConvTranspose2d(2 * width, width, 2, stride=2), _conv_block(2 * width, width)
        self.head = nn.Conv2d(width, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip1 = self.enc1(x)
        skip2 = self.enc2(self.pool(skip1))
        x = self.mid(self.pool(skip2))
        x = self.dec2(torch.cat([self.up2(x), skip2], 1))
        x = self.dec1(torch.cat([self.up1(x), skip1], 1))
        return self.head(x)


class PixelRegressor(LightningModule):
    """Per-pixel regression (denoising): ``forward(batch)`` takes the whole dict, MSE loss, BatchNorm inside.
    ``unet=True`` swaps the plain conv stack for :class:`UNet` (transposed convs, skip concatenations).

    Batches: ``{"image": (B, 1, 16, 16), "target": (B, 1, 16, 16)}``. Validation logs ``val/mse``.
    """

    def __init__(self, width: int = 8, lr: float = 0.05, unet: bool = False) -> None:
        super().__init__()
        self.lr = lr
        self.net = UNet(width) if unet else nn.Sequential(
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
