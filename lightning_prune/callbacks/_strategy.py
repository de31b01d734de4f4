"""What every callback checks about the Trainer's strategy and the module at ``setup``, and the
load-state-dict hook it installs there (one shared entry point: :func:`prepare_module`)."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from lightning_prune.training_state import reshape_on_load, reshapes_on_load

SHARDED_STRATEGIES = frozenset({"FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAFSDPStrategy"})
"""Strategy class names (of either Lightning namespace) that shard parameters across ranks."""


def class_names(obj: Any) -> set[str]:
    """The names of ``obj``'s class and its bases (matches under both Lightning namespaces)."""
    return {cls.__name__ for cls in type(obj).__mro__}


def prepare_module(trainer: pl.Trainer, pl_module: pl.LightningModule, callback: str, physical: bool) -> None:
    """Refuse set-ups the callback cannot serve, before any weight changes, then make ``pl_module``
    reshape itself to a pruned ``state_dict`` on load (:func:`~lightning_prune.training_state.reshape_on_load`).

    Refused with a ``MisconfigurationException``:

    - a sharded strategy (FSDP, DeepSpeed, model parallel): each rank holds a shard of every weight,
      while masks, scores and channel plans need whole tensors (as Lightning's own
      ``StochasticWeightAveraging`` refuses them);
    - a ``torch.compile``-d LightningModule or submodule: the callbacks trace the model and change
      its weights, parametrisations or shapes under the compiled graph; prune the uncompiled module
      and compile afterwards;
    - physical pruning (``callback`` removes channels) under a spawn/fork-based strategy
      (``ddp_spawn``, ``ddp_fork``, ``ddp_notebook``) when the user's module does not reshape itself on
      load: there the main process copies rank 0's pruned weights into its own dense module, which no
      callback hook reaches, and the whole run would be lost at that last step.

    Works with the Trainers of both ``pytorch_lightning`` and ``lightning.pytorch`` (class names are compared).
    """
    strategy = trainer.strategy
    if class_names(strategy) & SHARDED_STRATEGIES:
        raise MisconfigurationException(
            f"{callback} does not support sharded models: `strategy`={type(strategy).__name__} splits every weight "
            "across ranks, while pruning decides on whole tensors. Use `strategy='ddp'` (or a single device)."
        )
    compiled = getattr(pl_module, "_compiler_ctx", None) is not None or any(
        type(module).__name__ == "OptimizedModule" for module in pl_module.modules()
    )
    if compiled:
        raise MisconfigurationException(
            f"{callback} cannot prune a `torch.compile`d model ({type(pl_module).__name__} or one of its submodules "
            "is compiled): pass the uncompiled LightningModule and network to `trainer.fit`, and compile the pruned "
            "model after fit."
        )
    launcher = strategy.launcher
    spawned = launcher is not None and "_MultiProcessingLauncher" in class_names(launcher)
    if physical and spawned and not reshapes_on_load(pl_module):
        raise MisconfigurationException(
            f"{callback} removes channels physically, and under `strategy`={type(strategy).__name__} (processes "
            "started by spawn/fork) the main process then loads rank 0's pruned weights into its own dense "
            f"{type(pl_module).__name__}, which fails. Call `lightning_prune.reshape_on_load(model)` before "
            "`trainer.fit(model)`, or use `strategy='ddp'`."
        )
    reshape_on_load(pl_module)


def stepping_batches(trainer: pl.Trainer) -> float:
    """``trainer.estimated_stepping_batches`` taken at ``setup`` without losing a resumable training loader's place.

    Before the fit loop has loaded the training data, the estimate makes Lightning load it, and the checkpoint
    restored after ``setup`` never hands that loader its saved state (Lightning issue #20550): a mid-epoch resume
    would start the epoch's batches over. So a loader built here for the estimate is dropped again (private
    ``fit_loop`` attributes), and the fit loop builds it after the restore.
    """
    fit_loop = trainer.fit_loop
    built = fit_loop._combined_loader is not None
    steps = trainer.estimated_stepping_batches
    if not built and fit_loop._combined_loader is not None:
        if fit_loop._data_fetcher is not None:
            fit_loop._data_fetcher.teardown()
        fit_loop._combined_loader, fit_loop._data_fetcher = None, None
    return steps
