"""Built-in, offline data: scikit-learn's bundled 8x8 handwritten digits.

No download ever happens: the 1,797 images ship inside scikit-learn. Splits are deterministic
for a given ``seed``; images can be upsampled (e.g. to 32x32) and repeated over channels so that
CIFAR-style networks run on them.
"""

from __future__ import annotations

from typing import Optional

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler, TensorDataset


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"`{name}` must be in [0, 1), got {value!r}.")


def load_digits_tensors(image_size: int = 8, channels: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """All digits images as a float tensor ``(N, channels, image_size, image_size)`` in [0, 1] and labels."""
    from sklearn.datasets import load_digits

    if image_size < 8:
        raise ValueError(f"`image_size` must be at least 8 (the digits are 8x8), got {image_size!r}.")
    if channels < 1:
        raise ValueError(f"`channels` must be at least 1, got {channels!r}.")
    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if image_size != 8:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = (images - 0.5) / 0.5
    if channels > 1:
        images = images.repeat(1, channels, 1, 1)
    return images.contiguous(), torch.tensor(bunch.target, dtype=torch.long)


class EpochSeededSampler(Sampler[int]):
    """Shuffles with a permutation drawn from ``seed + epoch``.

    Lightning calls ``set_epoch`` at the start of every epoch (as for ``DistributedSampler``), so a
    run resumed from a checkpoint sees exactly the batches an uninterrupted run would have seen.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):  # noqa: ANN204 - Sampler protocol
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


class DigitsDataModule(pl.LightningDataModule):
    """Train/val/test splits of the bundled digits data set, deterministic from ``seed``.

    Args:
        batch_size: batch size of every loader.
        image_size: side of the (square) images; 8 is the native size, 32 suits CIFAR-style nets.
        channels: number of channels the grey image is repeated over (3 for CIFAR-style nets).
        val_fraction: fraction of all images held out for validation.
        test_fraction: fraction of all images held out for testing.
        aux_fraction: fraction of the *training* images held out for auxiliary learning
            (AutoPrune's bi-level split; the paper uses 0.5). 0 means no auxiliary split:
            ``aux_dataloader()`` then returns ``None``.
        seed: seed of the split permutation and of the training shuffle (reseeded every epoch).
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        batch_size: int = 64,
        image_size: int = 8,
        channels: int = 1,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        aux_fraction: float = 0.0,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction), ("aux_fraction", aux_fraction)):
            _check_fraction(name, value)
        if val_fraction + test_fraction >= 0.9:
            raise ValueError(
                f"`val_fraction` + `test_fraction` must leave at least 10% for training, got {val_fraction + test_fraction!r}."
            )
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.image_size = image_size
        self.channels = channels
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.aux_fraction = aux_fraction
        self.seed = seed
        self.num_workers = num_workers
        self.train_set: Optional[TensorDataset] = None

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        images, labels = load_digits_tensors(self.image_size, self.channels)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))
        n_val = int(round(self.val_fraction * len(labels)))
        n_test = int(round(self.test_fraction * len(labels)))
        val_idx, test_idx, train_idx = order[:n_val], order[n_val : n_val + n_test], order[n_val + n_test :]
        n_aux = int(round(self.aux_fraction * len(train_idx)))
        aux_idx, train_idx = train_idx[:n_aux], train_idx[n_aux:]
        self.train_set = TensorDataset(images[train_idx], labels[train_idx])
        self.val_set = TensorDataset(images[val_idx], labels[val_idx])
        self.test_set = TensorDataset(images[test_idx], labels[test_idx])
        self.aux_set = TensorDataset(images[aux_idx], labels[aux_idx]) if n_aux else None

    def _loader(self, dataset: TensorDataset, shuffle: bool) -> DataLoader:
        sampler = EpochSeededSampler(len(dataset), self.seed) if shuffle else None
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def aux_dataloader(self) -> Optional[DataLoader]:
        """Loader over the held-out auxiliary split of the training data, or ``None`` without one."""
        if self.aux_set is None:
            return None
        return self._loader(self.aux_set, shuffle=True)

    def example_input(self) -> torch.Tensor:
        """One image batch of the right shape, for tracing and FLOP counting."""
        return torch.zeros(1, self.channels, self.image_size, self.image_size)
