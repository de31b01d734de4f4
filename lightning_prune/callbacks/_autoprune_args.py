"""Construction-time checks of ``AutoPruneCallback``'s arguments, and its two sets of defaults.

Each error is a ``ValueError`` naming the argument, the value and what is allowed; nothing has run yet.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, NamedTuple, Optional

from lightning_prune.auxiliary import AuxOptimizer, Ste
from lightning_prune.callbacks._checks import Limit, check_fits, check_flags, check_range
from lightning_prune.callbacks._module_io import check_function
from lightning_prune.checks import check_patterns
from lightning_prune.choices import check_choice
from lightning_prune.criteria import Granularity
from lightning_prune.schedules import LearningWindow

CALIBRATED = {"aux_lr": 1.5e-2, "reg": 1.25}
"""The defaults calibrated on the digits data (``reg`` relative to the normalised loss signal)."""
TARGET_AUX_LR = 5e-3
"""``aux_lr``'s calibrated default with ``target_sparsity`` (without ``paper_defaults``): the controller sets the pull, so
the learning rate only sets how many steps ``m`` takes to travel from ``init`` to 0, and so over how many held-out
batches the noisy loss signal is averaged before a weight switches off. A third of 1.5e-2 (three times as many):
LeNet-300-100 at 50x on MNIST-5k, 30 epochs, seeds 0-2, 92.80 -> 93.51 (dense 94.40)."""
PAPER = {"aux_lr": 1.5e-2, "reg": 5e-2}
"""The paper's numbers for all its models: auxiliary learning rate 1.5e-2, µ = 5e-2 (no normalisation)."""


def check_loader(name: str, value: Any) -> None:
    """``None`` or a re-iterable collection of batches (a DataLoader, a list of batches, ...): it is read afresh every
    epoch, so a one-pass iterator (a generator, ``iter(...)``) is refused."""
    if value is not None and (isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable)):
        raise ValueError(f"`{name}` must be None or an iterable of batches (e.g. a DataLoader), got {value!r}.")
    if value is not None and iter(value) is value:
        raise ValueError(
            f"`{name}` must be re-iterable (a DataLoader or a list of batches: it is read afresh every epoch), got the "
            f"one-pass iterator {value!r}."
        )


def check_window_fits(start_epoch: int, end_epoch: Optional[int], limit: Optional[Limit]) -> None:
    """``M`` must learn in at least one epoch, and an explicit ``end_epoch`` must leave at least one epoch after it
    to fine-tune ``W`` under fixed masks (``MisconfigurationException`` naming the argument and the limit)."""
    check_fits("AutoPruneCallback", "start_epoch", start_epoch, start_epoch + 1, limit, "epoch", f"M first learns in epoch {start_epoch}")
    if end_epoch is not None:
        why = f"M learns through epoch {end_epoch}, and the weights are fine-tuned under fixed masks after it"
        check_fits("AutoPruneCallback", "end_epoch", end_epoch, end_epoch + 2, limit, "epoch", why)


class Rates(NamedTuple):
    """What the auxiliary step uses: ``M``'s learning rate, the pull's coefficient, the normalisation."""

    aux_lr: float
    reg: float
    normalize: bool


def resolve_rates(paper_defaults: bool, aux_lr: Optional[float], reg: Optional[float], target: Optional[float] = None) -> Rates:
    """``aux_lr``/``reg`` left at ``None`` take the calibrated defaults (``aux_lr``: :data:`TARGET_AUX_LR` with a
    ``target`` sparsity), or the paper's with ``paper_defaults`` (which also turns the loss-signal normalisation off).
    With ``paper_defaults=True`` an explicit value other than the paper's is refused, naming both arguments (as
    Lightning refuses contradicting arguments)."""
    check_flags(paper_defaults=paper_defaults)
    chosen = {"aux_lr": aux_lr, "reg": reg}
    for name, value in chosen.items():
        if value is not None:
            check_range(name, value, 0.0, math.inf, low_open=name == "aux_lr")
    defaults = PAPER if paper_defaults else CALIBRATED if target is None else {**CALIBRATED, "aux_lr": TARGET_AUX_LR}
    if paper_defaults:
        for name, value in chosen.items():
            if value is not None and value != PAPER[name]:
                raise ValueError(
                    f"`{name}`={value!r} contradicts `paper_defaults`=True, which sets `{name}`={PAPER[name]!r}: "
                    f"leave `{name}` unset (None) or pass `paper_defaults`=False."
                )
    return Rates(*(float(defaults[name] if value is None else value) for name, value in chosen.items()), not paper_defaults)


def resolve_init(paper_defaults: bool, init: Optional[float]) -> float:
    """``init`` left at ``None``: the calibrated 1.0, or 1e-2 with ``paper_defaults``: the paper's unnormalised pull
    moves ``m`` by ``aux_lr · µ`` = 7.5e-4 per step, so from 1.0 no weight is switched off within a run."""
    return float(init) if init is not None else (PAPER_INIT if paper_defaults else 1.0)


PAPER_INIT = 1e-2
"""``M``'s initial value with ``paper_defaults`` (the paper's is not known)."""


def check_arguments(a: Mapping[str, Any]) -> Rates:
    """Validate the arguments of ``AutoPruneCallback.__init__`` (by name); the rates the step will use."""
    value = a["target_sparsity"]
    number = not isinstance(value, bool) and isinstance(value, (int, float)) and not math.isnan(value)
    if value is not None and not (number and 0.0 < value < 1.0):
        raise ValueError(f"`target_sparsity` must be None or a number in (0, 1) (the fraction to switch off), got {value!r}.")
    rates = resolve_rates(a["paper_defaults"], a["aux_lr"], a["reg"], a["target_sparsity"])
    if a["init"] is not None:
        check_range("init", a["init"], 0.0, math.inf, low_open=True)
    check_range("ste_slope", a["ste_slope"], 0.0, math.inf)
    check_choice("ste", a["ste"], Ste)
    check_choice("granularity", a["granularity"], Granularity)
    check_choice("aux_optimizer", a["aux_optimizer"], AuxOptimizer)
    check_flags(**{name: a[name] for name in ("sensitivity", "correlation", "direction", "physical", "verbose")})
    LearningWindow(a["start_epoch"], a["end_epoch"])  # checks both epochs
    check_loader("aux_dataloader", a["aux_dataloader"])
    check_function("loss_fn", a["loss_fn"], 2, "loss_fn(pl_module, batch) -> loss")
    check_function("example_input_fn", a["example_input_fn"], 1, "example_input_fn(batch) -> model input")
    check_patterns("parameters", a["parameters"])
    check_patterns("exclude", a["exclude"])
    if a["physical"] and a["granularity"] != "channel":
        raise ValueError(f"`physical=True` removes channels: it needs `granularity='channel'`, got {a['granularity']!r}.")
    return rates
