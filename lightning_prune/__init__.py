"""lightning_prune: pruning packaged as PyTorch Lightning callbacks."""

from lightning_prune.classifier import ImageClassifier
from lightning_prune.data import DigitsDataModule
from lightning_prune.models import build_network

__version__ = "0.1.0"

__all__ = [
    "DigitsDataModule",
    "ImageClassifier",
    "build_network",
]
