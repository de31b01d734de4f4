"""The pruning callbacks."""

from lightning_prune.callbacks.autoprune import AutoPruneCallback
from lightning_prune.callbacks.gate_pruning import GatePruningFromScratch
from lightning_prune.callbacks.iterative_magnitude import IterativeMagnitude

__all__ = ["AutoPruneCallback", "GatePruningFromScratch", "IterativeMagnitude"]
