"""The callbacks' argument checks (ranges, flags, per-layer keys) and the one rule of their schedules: they must fit
the Trainer's limits (:func:`epoch_limit`, :func:`stepping_batches`, :func:`check_fits`)."""

from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple, Optional, Union

import pytorch_lightning as pl
from jsonargparse.typing import restricted_number_type
from pytorch_lightning.utilities.exceptions import MisconfigurationException

Fraction = restricted_number_type("Fraction", float, [(">=", 0.0), ("<", 1.0)], join="and")
"""A float in [0, 1): as a type hint, LightningCLI rejects an out-of-range YAML value at parse time."""


def check_range(
    name: str,
    value: Union[float, Mapping[str, float]],
    low: float = 0.0,
    high: float = 1.0,
    *,
    low_open: bool = False,
    high_open: bool = True,
    per_layer: bool = False,
) -> None:
    """``value`` must be a number in the interval from ``low`` to ``high`` (default [0, 1)); ``low_open``/``high_open``
    exclude an end. With ``per_layer`` also a non-empty mapping whose every value is such a number. The error
    names the argument."""
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if isinstance(value, Mapping) and not (per_layer and value):
        allowed = f"a number in {interval} or a non-empty mapping {{module name: number}}" if per_layer else f"a number in {interval}"
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}.")
    values = value.values() if isinstance(value, Mapping) else [value]
    for item in values:
        number = not isinstance(item, bool) and isinstance(item, (int, float)) and not math.isnan(item)
        if not (number and (item > low if low_open else item >= low) and (item < high if high_open else item <= high)):
            raise ValueError(f"`{name}` must be in {interval}, got {value!r}.")


def check_flags(**flags: Any) -> None:
    """Each value must be a bool (``1`` or ``"yes"`` is refused)."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise ValueError(f"`{name}` must be True or False, got {value!r}.")


class Limit(NamedTuple):
    """How many units (epochs or optimizer steps) a fit can run, and the Trainer setting that says so."""

    value: int
    name: str


def epoch_limit(trainer: pl.Trainer) -> Optional[Limit]:
    """The epochs this fit can start: ``max_epochs``, or fewer where ``max_steps`` ends training earlier and the
    epoch length is known (the training data is loaded: from ``on_train_start``, or earlier once Lightning loaded
    it); ``None`` without a limit and under ``fast_dev_run`` (which runs its own few batches)."""
    if trainer.fast_dev_run:
        return None
    limit = Limit(trainer.max_epochs, f"`max_epochs`={trainer.max_epochs}") if (trainer.max_epochs or -1) >= 0 else None
    batches = trainer.num_training_batches
    if trainer.max_steps >= 0 and trainer.train_dataloader is not None and 0 < batches < math.inf:
        per_epoch = math.ceil(batches / trainer.accumulate_grad_batches)
        epochs = math.ceil(trainer.max_steps / per_epoch)
        if limit is None or epochs < limit.value:
            limit = Limit(epochs, f"`max_steps`={trainer.max_steps} ({per_epoch} optimizer steps per epoch, so {epochs} epochs)")
    return limit


def check_fits(callback: str, name: str, value: Any, needed: int, limit: Optional[Limit], unit: str, why: str) -> None:
    """The one rule of the three callbacks: a schedule that cannot complete inside the Trainer's limits is refused
    before any weight changes. ``name``=``value`` needs ``needed`` ``unit``s of training (``why`` says what for); a
    ``limit`` below that raises a ``MisconfigurationException`` naming the argument, its value and the limit."""
    if limit is not None and needed > limit.value:
        raise MisconfigurationException(
            f"{callback}: `{name}`={value!r} needs {needed} {unit}s of training ({why}), but the Trainer's {limit.name} "
            f"allows {limit.value}: the schedule cannot complete. Lower `{name}` or raise the Trainer's limit."
        )


def class_names(obj: Any) -> set[str]:
    """The names of ``obj``'s class and its bases (matches under both Lightning namespaces)."""
    return {cls.__name__ for cls in type(obj).__mro__}


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
