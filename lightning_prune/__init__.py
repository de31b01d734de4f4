"""lightning_prune: pruning packaged as PyTorch Lightning callbacks."""

from lightning_prune.callbacks import GatePruningFromScratch, IterativeMagnitude
from lightning_prune.classifier import ImageClassifier
from lightning_prune.correlation import structure_correlation
from lightning_prune.data import DigitsDataModule
from lightning_prune.export import export_sparse, load_sparse
from lightning_prune.masks import MaskSet
from lightning_prune.models import build_network
from lightning_prune.report import sparsity_report
from lightning_prune.schedules import PruningSchedule

__version__ = "0.1.0"

__all__ = [
    "DigitsDataModule",
    "GatePruningFromScratch",
    "ImageClassifier",
    "IterativeMagnitude",
    "MaskSet",
    "PruningSchedule",
    "build_network",
    "export_sparse",
    "load_sparse",
    "sparsity_report",
    "structure_correlation",
]
