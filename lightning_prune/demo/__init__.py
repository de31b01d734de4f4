"""The built-in demo: networks, data modules and ``ImageClassifier`` for the example configs and tests.

Not part of the pruning library: the callbacks work on any LightningModule. ``import lightning_prune``
does not import this subpackage; ``lightning_prune.ImageClassifier`` (and the other names below) import
it on first use.
"""

from lightning_prune.demo.classifier import ImageClassifier
from lightning_prune.demo.data import DigitsDataModule
from lightning_prune.demo.datasets import CIFAR10DataModule, MNISTDataModule
from lightning_prune.demo.models import build_network

__all__ = ["CIFAR10DataModule", "DigitsDataModule", "ImageClassifier", "MNISTDataModule", "build_network"]
