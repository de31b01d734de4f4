"""Checkpoints and training state around a physically pruned model inside ``Trainer.fit``.

- :func:`reshape_on_load`: a load-state-dict pre-hook that gives any module the shapes of the incoming
  (pruned) tensors first, so a pruned ``state_dict`` loads into a fresh dense module.
- :func:`restore_structure_from_checkpoint`: the same from the structure record a callback stored.
- :func:`load_from_checkpoint`: ``LightningModule.load_from_checkpoint`` for a pruned checkpoint, in one call.
- :func:`rebuild_training_state`: after parameters were replaced, train the new ones (DDP re-wrap,
  optimizers and schedulers re-created).
"""

from __future__ import annotations

from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable, Mapping, Optional, TypeVar, Union

import torch
from torch import nn

from lightning_prune.checks import check_module
from lightning_prune.structure import STRUCTURE_KEY, restore_structure, structure_from_state_dict

if TYPE_CHECKING:
    import pytorch_lightning as pl

M = TypeVar("M", bound=nn.Module)
L = TypeVar("L", bound="pl.LightningModule")

_MARK = "_lightning_prune_reshapes_on_load"
"""Attribute set on a module whose ``load_state_dict`` reshapes it (travels with pickling and copies)."""


def reshape_to_state_dict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], prefix: str, *args: Any) -> None:
    """Load-state-dict pre-hook: reshape every Conv/Linear/BatchNorm of ``module`` to the shapes of the
    incoming tensors (:func:`~lightning_prune.structure.structure_from_state_dict`), so that the load
    then succeeds strictly. Modules already of that shape are untouched. Module-level, so it pickles."""
    restore_structure(module, structure_from_state_dict(module, state_dict, prefix))


def reshapes_on_load(module: nn.Module) -> bool:
    """Whether :func:`reshape_on_load` was called on ``module`` (or on the module it was copied from)."""
    return bool(getattr(module, _MARK, False))


def reshape_on_load(module: M) -> M:
    """Make ``module.load_state_dict`` accept a channel-pruned ``state_dict`` (idempotent; returns ``module``).

    The pruning callbacks call it in ``setup``, which covers ``fit(ckpt_path=...)`` and later loads in
    the same process. Call it yourself before ``trainer.fit`` with ``strategy="ddp_spawn"`` (or another
    spawn/fork-based strategy) and physical pruning: there, the main process loads rank 0's pruned weights
    into its own dense copy of the module, which no callback hook sees (the callbacks refuse such a run
    at ``setup`` otherwise). Also for a fresh module before ``load_state_dict`` of a pruned checkpoint::

        model = reshape_on_load(MyModule())
        model.load_state_dict(torch.load("pruned.ckpt")["state_dict"])
    """
    check_module("module", module)
    if not reshapes_on_load(module):
        module.register_load_state_dict_pre_hook(reshape_to_state_dict)
        setattr(module, _MARK, True)
    return module


def restore_structure_from_checkpoint(
    module: nn.Module, checkpoint: Union[dict, str, Path], prefix: str = ""
) -> bool:
    """Apply the :data:`~lightning_prune.structure.StructureRecord` stored under
    :data:`~lightning_prune.structure.STRUCTURE_KEY` in ``checkpoint`` (a loaded dict, or a path loaded
    on CPU with ``weights_only=False``: trusted files only). Returns whether a record was found. Record
    names are relative to the module the plan was applied to (for a Lightning checkpoint, the
    LightningModule: ``network.fc``). ``prefix`` restricts the record to one submodule and strips that
    prefix, so a bare network can be restored from a LightningModule's checkpoint. Plain PyTorch::

        net = build_network("resnet56", num_classes=10, in_channels=3, image_size=32)
        restore_structure_from_checkpoint(net, ckpt, prefix="network.")
        net.load_state_dict({k[len("network."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("network.")})
    """
    check_module("module", module)
    if not isinstance(checkpoint, (dict, str, Path)):
        raise ValueError(f"`checkpoint` must be a loaded checkpoint dict or a file path, got {type(checkpoint).__name__} {checkpoint!r:.80}.")
    if isinstance(checkpoint, (str, Path)):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=False)
    record = checkpoint.get(STRUCTURE_KEY)
    if record is None:
        return False
    restore_structure(module, {name[len(prefix) :]: shape for name, shape in record.items() if name.startswith(prefix)})
    return True


def _reshaping_first(on_load_checkpoint: Callable[[Any, dict], None]) -> Callable[[Any, dict], None]:
    """``on_load_checkpoint`` that first reshapes the module to the checkpoint: its structure record, else
    the shapes of its ``state_dict``; then runs the class's own hook, which sees the pruned shapes."""

    def hook(self: nn.Module, checkpoint: dict) -> None:
        if not restore_structure_from_checkpoint(self, checkpoint):
            restore_structure(self, structure_from_state_dict(self, checkpoint["state_dict"]))
        on_load_checkpoint(self, checkpoint)

    return hook


def load_from_checkpoint(
    cls: type[L],
    checkpoint_path: Union[str, Path, IO],
    map_location: Any = None,
    hparams_file: Optional[Union[str, Path]] = None,
    strict: Optional[bool] = None,
    **kwargs: Any,
) -> L:
    """``cls.load_from_checkpoint(checkpoint_path, ...)`` for a checkpoint of a physically pruned model: the
    module is built from the checkpoint's hyperparameters (``kwargs`` override them, as there), reshaped to
    the pruned shapes (the structure record the pruning callbacks store, else the ``state_dict``'s shapes)
    before its ``on_load_checkpoint`` and its strict ``load_state_dict``, so its outputs are the pruned
    model's. Arguments as in Lightning's ``LightningModule.load_from_checkpoint``; a dense checkpoint loads
    as there. Returns an instance of ``cls`` itself::

        model = lightning_prune.load_from_checkpoint(MyModule, "pruned.ckpt", map_location="cpu")
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module) and callable(getattr(cls, "load_from_checkpoint", None))):
        raise ValueError(f"`cls` must be a LightningModule class (e.g. `MyModule`, not an instance), got {cls!r:.80}.")
    # Lightning builds the module and calls its `on_load_checkpoint` before `load_state_dict`: a subclass for
    # this one call reshapes there, and the loaded module becomes an instance of `cls` again.
    reshaping = type(cls.__name__, (cls,), {"on_load_checkpoint": _reshaping_first(cls.on_load_checkpoint), "__module__": cls.__module__, "__qualname__": cls.__qualname__})
    model = reshaping.load_from_checkpoint(checkpoint_path, map_location=map_location, hparams_file=hparams_file, strict=strict, **kwargs)
    model.__class__ = cls
    return model


def rebuild_training_state(trainer: "pl.Trainer", fresh: bool = False) -> None:
    """After parameters were replaced during ``trainer.fit`` (a plan applied), train the new ones: under
    DDP, re-wrap the LightningModule (DDP's buckets and hooks hold the old parameters), then re-create
    optimizers and LR schedulers with the strategy's ``setup_optimizers`` (the LightningModule's own
    ``configure_optimizers``). Works with the strategies of both ``pytorch_lightning`` and
    ``lightning.pytorch``.

    With ``fresh=False``, each param group's hyperparameters (``lr``, ``momentum``, ...) and each
    scheduler's progress (its ``state_dict``) carry over when the new configuration has the same layout;
    with ``fresh=True`` the new optimizers and schedulers start as ``configure_optimizers`` builds them
    (e.g. before any step, for a changed epoch count). Per-parameter optimizer state (momentum buffers,
    Adam moments) always starts afresh, as its tensors have the old shapes: so a checkpoint written
    afterwards holds optimizer state of the new shapes, and resuming from it works.

    Under DDP every rank must apply the same plan and then call this (wrapping is a collective)."""
    if not hasattr(trainer, "strategy"):
        raise ValueError(f"`trainer` must be the Lightning Trainer running `fit`, got {type(trainer).__name__} {trainer!r:.80}.")
    from torch.nn.parallel import DistributedDataParallel

    strategy = trainer.strategy
    # duck-typed, so that the DDP strategies of both `pytorch_lightning` and `lightning.pytorch` match
    if hasattr(strategy, "configure_ddp") and isinstance(strategy.model, DistributedDataParallel):
        strategy.model = strategy.lightning_module
        strategy.configure_ddp()
    old_optimizers, old_schedulers = ([], []) if fresh else (strategy.optimizers, strategy.lr_scheduler_configs)
    strategy.setup_optimizers(trainer)
    strategy.setup_precision_plugin()
    if len(old_optimizers) == len(strategy.optimizers):
        for old, new in zip(old_optimizers, strategy.optimizers):
            if len(old.param_groups) == len(new.param_groups):
                for old_group, new_group in zip(old.param_groups, new.param_groups):
                    new_group.update({key: value for key, value in old_group.items() if key != "params"})
    if len(old_schedulers) == len(strategy.lr_scheduler_configs):
        for old, new in zip(old_schedulers, strategy.lr_scheduler_configs):
            new.scheduler.load_state_dict(old.scheduler.state_dict())
