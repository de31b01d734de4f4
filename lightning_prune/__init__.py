"""lightning_prune: pruning packaged as PyTorch Lightning callbacks."""

from lightning_prune.callbacks import AutoPruneCallback, GatePruningFromScratch, IterativeMagnitude
from lightning_prune.classifier import ImageClassifier
from lightning_prune.correlation import structure_correlation
from lightning_prune.data import DigitsDataModule
from lightning_prune.diagnostics import count_ops
from lightning_prune.export import export_sparse, load_sparse
from lightning_prune.flops import FlopsPredictor, count_flops, search_threshold
from lightning_prune.masks import MaskSet
from lightning_prune.models import build_network
from lightning_prune.report import sparsity_report
from lightning_prune.schedules import PruningSchedule
from lightning_prune.structure import apply_plan, channel_ratio_vector, find_channel_groups
from lightning_prune.training_state import rebuild_training_state, reshape_on_load, restore_structure_from_checkpoint

__version__ = "0.1.0"

__all__ = [
    "AutoPruneCallback",
    "DigitsDataModule",
    "FlopsPredictor",
    "GatePruningFromScratch",
    "ImageClassifier",
    "IterativeMagnitude",
    "MaskSet",
    "PruningSchedule",
    "apply_plan",
    "build_network",
    "channel_ratio_vector",
    "count_flops",
    "count_ops",
    "export_sparse",
    "find_channel_groups",
    "load_sparse",
    "rebuild_training_state",
    "reshape_on_load",
    "restore_structure_from_checkpoint",
    "search_threshold",
    "sparsity_report",
    "structure_correlation",
]
