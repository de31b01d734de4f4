"""lightning_prune: pruning packaged as PyTorch Lightning callbacks.

The built-in demo (:mod:`lightning_prune.demo`: ``ImageClassifier``, ``DigitsDataModule``,
``build_network``) is imported on first use of one of those names, not by ``import lightning_prune``.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

from lightning_prune.callbacks import AutoPruneCallback, GatePruningFromScratch, IterativeMagnitude
from lightning_prune.auxiliary import AuxiliaryParameters
from lightning_prune.correlation import structure_correlation
from lightning_prune.diagnostics import count_ops
from lightning_prune.export import export_sparse, load_sparse
from lightning_prune.channel_search import search_threshold
from lightning_prune.flops import FlopsPredictor, count_flops
from lightning_prune.gate_search import GatePruning, GateSearch
from lightning_prune.magnitude import MagnitudePruner
from lightning_prune.masks import MaskSet
from lightning_prune.pruner import Pruner, hook_optimizer
from lightning_prune.report import sparsity_report
from lightning_prune.schedules import PruningSchedule
from lightning_prune.structure import apply_plan, channel_ratio_vector, find_channel_groups
from lightning_prune.training_state import (
    load_from_checkpoint,
    rebuild_training_state,
    reshape_on_load,
    restore_structure_from_checkpoint,
)

if TYPE_CHECKING:
    from lightning_prune.demo import DigitsDataModule, ImageClassifier, build_network

__version__ = "0.1.0"

_DEMO_NAMES = ("DigitsDataModule", "ImageClassifier", "build_network")

__all__ = [
    "AutoPruneCallback",
    "AuxiliaryParameters",
    "DigitsDataModule",
    "FlopsPredictor",
    "GatePruning",
    "GatePruningFromScratch",
    "GateSearch",
    "ImageClassifier",
    "IterativeMagnitude",
    "MagnitudePruner",
    "MaskSet",
    "Pruner",
    "PruningSchedule",
    "apply_plan",
    "build_network",
    "channel_ratio_vector",
    "count_flops",
    "count_ops",
    "export_sparse",
    "find_channel_groups",
    "hook_optimizer",
    "load_from_checkpoint",
    "load_sparse",
    "rebuild_training_state",
    "reshape_on_load",
    "restore_structure_from_checkpoint",
    "search_threshold",
    "sparsity_report",
    "structure_correlation",
]


def __getattr__(name: str) -> Any:
    """``lightning_prune.ImageClassifier`` etc.: imports :mod:`lightning_prune.demo` on first use (PEP 562)."""
    if name in _DEMO_NAMES:
        return getattr(import_module("lightning_prune.demo"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
