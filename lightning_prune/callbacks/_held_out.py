"""AutoPrune's data access: held-out batches (sharded per rank under DDP, one per call)."""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Optional

import pytorch_lightning as pl
from pytorch_lightning.trainer.states import RunningStage
from pytorch_lightning.utilities import rank_zero_warn
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, SequentialSampler


def _check_yields(loader: Iterable[Any], source: str) -> None:
    """At ``setup``, before any weight changes: a held-out loader with a length (a list, a DataLoader over a sized
    dataset, e.g. one with ``drop_last`` over fewer samples than a batch) has at least one batch. One without a
    length is not drawn from here (that would use up a batch and random state); :meth:`HeldOutBatches.next` says so."""
    try:
        empty = len(loader) == 0  # type: ignore[arg-type]
    except TypeError:
        return
    if empty:
        raise MisconfigurationException(
            f"AutoPruneCallback: {source} ({loader!r:.80}) yields no batch, so M could not learn. Give it held-out data "
            "(an empty split? `aux_fraction` too small for the batch size with drop_last?)."
        )


class HeldOutBatches:
    """Held-out batches for ``M``: the ``argument`` loader, else ``aux_dataloader()`` of the module or the
    DataModule, else (``source == "train"``, with a warning) none: the training batch itself is used.

    The loader is iterated afresh each epoch (its sampler's ``set_epoch`` called, so epoch-seeded samplers
    repeat an uninterrupted run on resume), re-requested when Lightning reloads dataloaders, and under a
    distributed strategy re-created with Lightning's distributed sampler, so each rank draws its own shard.
    :meth:`state_dict` holds how far the current pass has come: a run resumed inside an epoch skips as many
    batches of the restarted pass, so it draws what the uninterrupted run would have drawn next.

    :meth:`prefetch` draws the next batch of the current pass ahead of its step and starts its copy to the device
    (non-blocking on an accelerator: Lightning's ``batch_to_device``; it overlaps the device's work when the loader
    pins memory, ``pin_memory=True``), so :meth:`next` hands it over without waiting for the loader.
    """

    def __init__(self, trainer: pl.Trainer, pl_module: pl.LightningModule, argument: Optional[Iterable[Any]]) -> None:
        self.argument = argument
        self.source = self._resolve(trainer, pl_module)
        self._loader: Optional[Iterable[Any]] = None
        self._iterator: Optional[Iterator[Any]] = None
        self._ready: Optional[Any] = None  # the next batch of the current pass, drawn and on the device
        self._epoch, self._drawn = -1, 0  # the epoch of the current pass, batches handed out from it

    def _resolve(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> str:
        if self.argument is not None:
            _check_yields(self.argument, "`aux_dataloader`")
            return "argument"
        for owner, name in ((pl_module, "module"), (trainer.datamodule, "datamodule")):
            loader = owner.aux_dataloader() if owner is not None and callable(getattr(owner, "aux_dataloader", None)) else None
            if loader is not None:
                _check_yields(loader, f"`aux_dataloader()` of the {'LightningModule' if name == 'module' else 'DataModule'} {type(owner).__name__}")
                return name
        rank_zero_warn(
            "AutoPruneCallback: no held-out auxiliary data (no `aux_dataloader` argument, and neither the LightningModule "
            "nor the DataModule returns one from `aux_dataloader()`), so the auxiliary parameters learn from the "
            "training batches themselves instead of the paper's separate split. Pass `aux_dataloader=...` or give "
            "the DataModule a held-out split (e.g. `DigitsDataModule(aux_fraction=0.5)`)."
        )
        return "train"

    def new_epoch(self, trainer: pl.Trainer) -> None:
        reload = trainer.reload_dataloaders_every_n_epochs
        if reload > 0 and trainer.current_epoch % reload == 0:
            self._loader = None
        self._iterator, self._ready = None, None

    def _fetch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Iterable[Any]:
        owner = pl_module if self.source == "module" else trainer.datamodule
        loader = self.argument if self.source == "argument" else owner.aux_dataloader()
        if isinstance(loader, DataLoader) and trainer.world_size > 1:
            shuffle = not isinstance(loader.sampler, SequentialSampler)
            loader = trainer._data_connector._prepare_dataloader(loader, shuffle=shuffle, mode=RunningStage.TRAINING)
        return loader

    def next(self, trainer: pl.Trainer, pl_module: pl.LightningModule, training_batch: Any) -> Any:
        """The next held-out batch on the device (:meth:`_to_device`), prefetched or drawn now; from wherever training
        starts, a mid-epoch resume included."""
        if self.source == "train":
            return training_batch
        if self._ready is not None:
            batch, self._ready = self._ready, None
            self._drawn += 1
            return batch
        if self._loader is None:
            self._loader = self._fetch(trainer, pl_module)
        batch = None
        if self._iterator is not None:
            batch = next(self._iterator, None)
        elif self._epoch == trainer.current_epoch:  # resumed inside this epoch's pass: skip what it drew
            self._iterator = self._new_pass(trainer)
            for _ in range(self._drawn):
                next(self._iterator, None)
            batch = next(self._iterator, None)
        if batch is None:
            self._iterator = self._new_pass(trainer)
            self._epoch, self._drawn = trainer.current_epoch, 0
            batch = next(self._iterator, None)
        if batch is None:
            raise MisconfigurationException(
                f"AutoPruneCallback: the auxiliary loader ({self.source}) yields no batch, so M cannot learn. Give it "
                "held-out data (an empty split, e.g. `aux_fraction` too small for the batch size with drop_last?)."
            )
        self._drawn += 1
        return self._to_device(trainer, batch)

    def prefetch(self, trainer: pl.Trainer) -> None:
        """Draw the batch the next :meth:`next` returns and move it to the device now (after a step's work was queued,
        so the loader runs while the device computes); within the current pass only (a pass begins in the step that
        needs it)."""
        if self.source != "train" and self._ready is None and self._iterator is not None:
            batch = next(self._iterator, None)
            if batch is not None:
                self._ready = self._to_device(trainer, batch)

    @staticmethod
    def _to_device(trainer: pl.Trainer, batch: Any) -> Any:
        """On the device, converted by the precision plugin (as Lightning converts training batches)."""
        return trainer.precision_plugin.convert_input(trainer.strategy.batch_to_device(batch))

    def _new_pass(self, trainer: pl.Trainer) -> Iterator[Any]:
        sampler = getattr(self._loader, "sampler", None)
        if callable(getattr(sampler, "set_epoch", None)):
            sampler.set_epoch(trainer.current_epoch)
        return iter(self._loader)

    def state_dict(self) -> dict[str, int]:
        """The epoch of the current pass over the loader and the batches handed out from it (a prefetched one is drawn
        again after a resume)."""
        return {"epoch": self._epoch, "drawn": self._drawn}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._epoch, self._drawn = state["epoch"], state["drawn"]
