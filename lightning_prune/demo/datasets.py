"""CIFAR-10 and MNIST data modules for the paper configs (examples/configs/*_cifar10*.yaml, *_mnist*.yaml).

They use ``torchvision`` (not a dependency of this package: ``pip install torchvision`` matching your
torch) and download the data only when a run prepares them (``prepare_data``); building one, e.g.
when a config is parsed, neither imports torchvision nor touches the network.
"""

from __future__ import annotations

from typing import Any, Optional

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Subset

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)


def _torchvision() -> Any:
    try:
        import torchvision
    except ImportError as error:
        raise ImportError(
            "The CIFAR-10/MNIST data modules read the data with torchvision, which is not installed: "
            "pip install torchvision (the build matching your torch). The bundled, offline "
            "`lightning_prune.DigitsDataModule` needs nothing."
        ) from error
    return torchvision


class _TorchvisionDataModule(pl.LightningDataModule):
    """Train / validation (the last ``val_size`` training images) / test splits of a torchvision set,
    plus an optional auxiliary split of the training part (AutoPrune's bi-level data, ``aux_fraction``)."""

    dataset_name = ""
    shape: tuple[int, int, int] = (1, 1, 1)
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 128,
        val_size: int = 5000,
        aux_fraction: float = 0.0,
        download: bool = True,
        num_workers: int = 4,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
        if val_size < 0:
            raise ValueError(f"`val_size` must be >= 0, got {val_size!r}.")
        if not 0.0 <= aux_fraction < 1.0:
            raise ValueError(f"`aux_fraction` must be in [0, 1), got {aux_fraction!r}.")
        self.save_hyperparameters()
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.val_size = val_size
        self.aux_fraction = aux_fraction
        self.download = download
        self.num_workers = num_workers
        self.seed = seed
        self.train_set: Optional[Dataset] = None

    def _dataset(self, train: bool, transform: Any) -> Dataset:
        torchvision = _torchvision()
        return getattr(torchvision.datasets, self.dataset_name)(self.data_dir, train=train, transform=transform, download=self.download)

    def _transforms(self, train: bool) -> Any:
        t = _torchvision().transforms
        augmentation = self._augmentation(t) if train else []
        return t.Compose([*augmentation, t.ToTensor(), t.Normalize(self.mean, self.std)])

    def _augmentation(self, t: Any) -> list[Any]:
        return []

    def prepare_data(self) -> None:
        """Download (once, on one process) when ``download`` is true."""
        self._dataset(True, None)
        self._dataset(False, None)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        augmented, plain = self._dataset(True, self._transforms(True)), self._dataset(True, self._transforms(False))
        n = len(plain)
        if self.val_size >= n:
            raise ValueError(f"`val_size` ({self.val_size}) must be smaller than the {n} training images.")
        train_idx = list(range(n - self.val_size))
        n_aux = int(round(self.aux_fraction * len(train_idx)))
        order = torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(self.seed)).tolist()
        aux_idx, train_idx = sorted(order[:n_aux]), sorted(order[n_aux:])
        self.train_set = Subset(augmented, train_idx)
        self.aux_set = Subset(augmented, aux_idx) if n_aux else None
        self.val_set = Subset(plain, list(range(n - self.val_size, n)))
        self.test_set = self._dataset(False, self._transforms(False))

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          pin_memory=torch.cuda.is_available(), persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, False)

    def aux_dataloader(self) -> Optional[DataLoader]:
        """Loader over the auxiliary split (AutoPrune), or ``None`` when ``aux_fraction`` is 0."""
        return None if self.aux_set is None else self._loader(self.aux_set, True)

    def example_input(self) -> torch.Tensor:
        """One zero image batch of the data's shape, for tracing and FLOP counting."""
        return torch.zeros(1, *self.shape)


class CIFAR10DataModule(_TorchvisionDataModule):
    """CIFAR-10: 45k training / 5k validation (the last 5k training images, as in Pruning from
    Scratch's code) / 10k test images, normalised; training with random 4-pixel-padded crops and
    horizontal flips. Downloads to ``data_dir`` on first use (needs torchvision).

    Args:
        data_dir: where the data is (or is downloaded to).
        batch_size: batch size of every loader.
        val_size: number of training images held out for validation (the last ones).
        aux_fraction: fraction of the remaining training images held out as auxiliary data.
        augment: random crops and flips on the training images.
        download: download when missing.
        num_workers: DataLoader workers.
        seed: seed of the auxiliary split.
    """

    dataset_name = "CIFAR10"
    shape = (3, 32, 32)
    mean, std = CIFAR10_MEAN, CIFAR10_STD

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 128,
        val_size: int = 5000,
        aux_fraction: float = 0.0,
        augment: bool = True,
        download: bool = True,
        num_workers: int = 4,
        seed: int = 0,
    ) -> None:
        super().__init__(data_dir, batch_size, val_size, aux_fraction, download, num_workers, seed)
        self.augment = augment

    def _augmentation(self, t: Any) -> list[Any]:
        return [t.RandomCrop(32, padding=4), t.RandomHorizontalFlip()] if self.augment else []


class MNISTDataModule(_TorchvisionDataModule):
    """MNIST: 55k training / 5k validation / 10k test 28x28 images, normalised; with
    ``aux_fraction=0.5`` the training images are split 1:1 between weights and AutoPrune's auxiliary
    parameters, as in the paper. Downloads to ``data_dir`` on first use (needs torchvision).

    Args:
        data_dir: where the data is (or is downloaded to).
        batch_size: batch size of every loader.
        val_size: number of training images held out for validation (the last ones).
        aux_fraction: fraction of the remaining training images held out as auxiliary data.
        download: download when missing.
        num_workers: DataLoader workers.
        seed: seed of the auxiliary split.
    """

    dataset_name = "MNIST"
    shape = (1, 28, 28)
    mean, std = MNIST_MEAN, MNIST_STD
