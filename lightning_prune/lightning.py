"""The same pruning callbacks for the unified package's ``lightning.pytorch.Trainer``.

A callback that subclasses ``pytorch_lightning.Callback`` is not a ``lightning.pytorch.Callback``
(and the other way round), although both namespaces ship the same code: the unified package's
LightningCLI refuses it in YAML, and ``isinstance`` checks against the other namespace fail.
The classes here are the package's own classes with the ``lightning.pytorch`` base class mixed in,
written out so that readers and type checkers see them: no logic is copied, only the base-class check
of the other Trainer is met (:func:`for_lightning` does the same for a callback of your own).
Needs the optional extra: ``pip install "lightning-prune[lightning]"``.

    import lightning as L
    from lightning_prune.lightning import IterativeMagnitude  # also GatePruningFromScratch, AutoPruneCallback

    L.Trainer(max_epochs=15, callbacks=[IterativeMagnitude(sparsity=0.9)]).fit(my_lightning_module, my_datamodule)

Only callbacks are offered: the built-in ``ImageClassifier``/``DigitsDataModule`` are
``pytorch_lightning`` classes, and mixing a second ``LightningModule`` base in would make the other
Trainer see every inherited hook as overridden.

YAML: use ``lightning.pytorch.cli.LightningCLI`` (or ``python -m lightning_prune.lightning fit --config
...``) with ``class_path: lightning_prune.lightning.IterativeMagnitude``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, TypeVar

try:
    import lightning.pytorch as L
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "lightning_prune.lightning needs the unified `lightning` package: pip install 'lightning-prune[lightning]'."
    ) from error

import pytorch_lightning as pl

from lightning_prune import callbacks as _callbacks

if TYPE_CHECKING:
    from lightning.pytorch.cli import LightningCLI

T = TypeVar("T", bound=type)


def for_lightning(cls: T) -> T:
    """``cls`` (a ``pytorch_lightning.Callback`` subclass) with ``lightning.pytorch.Callback`` mixed
    in, under the same name.

    Every method, argument, docstring and signature is ``cls``'s own (LightningCLI reads the same
    type hints); ``isinstance(callback, lightning.pytorch.Callback)`` becomes true. The hooks of both
    base classes are no-ops, so which one comes first does not matter; the checkpoint ``state_key``
    (the class name) is unchanged, so checkpoints move between the two Trainers.
    """
    if not (isinstance(cls, type) and issubclass(cls, pl.Callback)):
        raise TypeError(f"`cls` must be a pytorch_lightning.Callback subclass, got {cls!r}.")
    return type(cls.__name__, (cls, L.Callback), {"__module__": __name__, "__qualname__": cls.__qualname__, "__doc__": cls.__doc__})


class IterativeMagnitude(_callbacks.IterativeMagnitude, L.Callback):
    __doc__ = _callbacks.IterativeMagnitude.__doc__


class GatePruningFromScratch(_callbacks.GatePruningFromScratch, L.Callback):
    __doc__ = _callbacks.GatePruningFromScratch.__doc__


class AutoPruneCallback(_callbacks.AutoPruneCallback, L.Callback):
    __doc__ = _callbacks.AutoPruneCallback.__doc__


__all__ = ["AutoPruneCallback", "GatePruningFromScratch", "IterativeMagnitude", "for_lightning"]


def main(args: Optional[list[str]] = None) -> "LightningCLI":
    """``lightning.pytorch``'s LightningCLI over any model, data and callbacks (``fit``, ``validate``, ...)."""
    from lightning_prune.cli import build_cli

    return build_cli(args, namespace=L)


if __name__ == "__main__":
    main()
