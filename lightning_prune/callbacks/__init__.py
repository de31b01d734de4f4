"""The pruning callbacks."""

from lightning_prune.callbacks.iterative_magnitude import IterativeMagnitude

__all__ = ["IterativeMagnitude"]
