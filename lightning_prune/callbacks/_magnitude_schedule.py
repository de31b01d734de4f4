"""``IterativeMagnitude``'s schedule: the construction-time checks of its arguments (type, range, combination) and
the schedule they give on a Trainer (resolved against its limits, refused where it cannot complete).

Each error is a ``ValueError`` naming the argument, the value and what is allowed, raised before any weight changes.
"""

from __future__ import annotations

import math
from typing import Any, Collection, Mapping, Optional, Union

import pytorch_lightning as pl
from jsonargparse.typing import NonNegativeFloat, restricted_number_type
from pytorch_lightning.utilities import rank_zero_info

from lightning_prune.callbacks._checks import (
    Fraction, Limit, check_fits, check_flags, check_range, epoch_limit, stepping_batches,
)
from lightning_prune.callbacks._module_io import check_function
from lightning_prune.checks import check_patterns
from lightning_prune.choices import check_choice
from lightning_prune.criteria import ChannelNorm, Criterion, Granularity, Scope
from lightning_prune.schedules import Interval, PruningSchedule, ScheduleKind, check_initial_below

PerLayer = Union[Fraction, dict[str, Fraction]]
Sensitivity = Union[NonNegativeFloat, dict[str, NonNegativeFloat]]
LayerCap = restricted_number_type("LayerCap", float, [(">", 0.0), ("<=", 1.0)], join="and")
"""A float in (0, 1]: LightningCLI rejects an out-of-range YAML value at parse time."""


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"`{name}` must be {allowed}, got {value!r}.")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_per_layer(name: str, value: Any, high: float, high_open: bool) -> None:
    if isinstance(value, Mapping) and not all(isinstance(key, str) for key in value):
        _fail(name, value, "a number or a mapping {module name: number}")
    check_range(name, value, 0.0, high, high_open=high_open, per_layer=True)


def check_arguments(a: Mapping[str, Any]) -> None:
    """Validate the arguments of ``IterativeMagnitude.__init__`` (by name)."""
    _check_per_layer("sparsity", a["sparsity"], 1.0, True)
    check_choice("schedule", a["schedule"], ScheduleKind)
    check_choice("interval", a["interval"], Interval)
    check_choice("scope", a["scope"], Scope)
    check_choice("criterion", a["criterion"], Criterion)
    check_choice("granularity", a["granularity"], Granularity)
    check_choice("channel_norm", a["channel_norm"], ChannelNorm)
    if not _is_int(a["start_epoch"]) or a["start_epoch"] < 0:
        _fail("start_epoch", a["start_epoch"], "an integer >= 0")
    if a["end_epoch"] is not None and not _is_int(a["end_epoch"]):
        _fail("end_epoch", a["end_epoch"], "None or an integer")
    if not _is_int(a["frequency"]) or a["frequency"] < 1:
        _fail("frequency", a["frequency"], "an integer >= 1")
    end = a["start_epoch"] + a["frequency"] if a["end_epoch"] is None else a["end_epoch"]  # None: resolved at setup
    PruningSchedule(a["schedule"], a["start_epoch"], end, a["frequency"], a["initial_sparsity"])
    if a["initial_sparsity"] > 0 and a["criterion"] == "sensitivity":  # AGP's s_i is a sparsity, which this criterion has not
        raise ValueError(f"`initial_sparsity` ({a['initial_sparsity']}) is a sparsity: it needs `criterion`='magnitude', got 'sensitivity'.")
    check_initial_below(a["initial_sparsity"], a["sparsity"])
    check_function("example_input_fn", a["example_input_fn"], 1, "example_input_fn(batch)")
    for name in ("parameters", "exclude"):
        check_patterns(name, a[name])
    if isinstance(a["max_layer_sparsity"], bool) or not isinstance(a["max_layer_sparsity"], (int, float)):
        _fail("max_layer_sparsity", a["max_layer_sparsity"], "a number in (0, 1]")
    check_range("max_layer_sparsity", a["max_layer_sparsity"], 0.0, 1.0, low_open=True, high_open=False)
    check_flags(**{name: a[name] for name in ("make_permanent", "physical", "hidden", "verbose")})
    for name in ("monitor", "name"):
        if a[name] is not None and (not isinstance(a[name], str) or not a[name]):
            _fail(name, a[name], "None or a non-empty string")
    rewind = a["rewind"]
    if rewind is not None and rewind != "init" and not (_is_int(rewind) and 0 <= rewind <= a["start_epoch"]):
        _fail("rewind", rewind, f"None, 'init' or an epoch in [0, start_epoch={a['start_epoch']}]")
    if isinstance(a["sparsity"], Mapping):
        if a["scope"] != "layer":
            raise ValueError(f"A per-layer `sparsity` mapping needs `scope`='layer', got {a['scope']!r}.")
    elif a["scope"] == "global" and a["criterion"] == "magnitude" and a["sparsity"] > a["max_layer_sparsity"]:
        raise ValueError(f"`max_layer_sparsity` ({a['max_layer_sparsity']}) must be at least `sparsity` ({a['sparsity']}).")
    values = a["sparsity"].values() if isinstance(a["sparsity"], Mapping) else [a["sparsity"]]
    if a["scope"] == "layer" and max(values, default=0.0) > a["max_layer_sparsity"]:
        raise ValueError(f"`max_layer_sparsity` ({a['max_layer_sparsity']}) is below a per-layer `sparsity` ({a['sparsity']!r}).")
    if a["criterion"] == "sensitivity":
        if a["sensitivity"] is None:
            raise ValueError("`criterion`='sensitivity' needs `sensitivity` (s of the threshold λ = s·σ), got None.")
        _check_per_layer("sensitivity", a["sensitivity"], float("inf"), True)
        if a["granularity"] != "element":
            raise ValueError(f"`criterion`='sensitivity' thresholds single weights: `granularity` must be 'element', got {a['granularity']!r}.")
    elif a["sensitivity"] is not None:
        raise ValueError(f"`sensitivity` is only used with `criterion`='sensitivity', got `criterion`={a['criterion']!r}.")
    if a["physical"] and a["granularity"] != "channel":
        raise ValueError(f"`physical`=True removes channels: it needs `granularity`='channel', got {a['granularity']!r}.")
    if a["physical"] and not a["make_permanent"]:
        raise ValueError("`physical`=True needs `make_permanent`=True.")
    if a["hidden"] and not a["physical"]:  # a norm over zeroed channels differs from the pruned norm once its hooks go
        raise ValueError("`hidden`=True removes the hidden width: it needs `physical`=True (and `granularity`='channel'), got `physical`=False.")


def check_layer_keys(a: Mapping[str, Any], layers: Collection[str]) -> None:
    """Every key of a per-layer ``sparsity`` or ``sensitivity`` mapping must name a selected layer (at setup)."""
    for name in ("sparsity", "sensitivity"):
        unknown = sorted(set(a[name]) - set(layers)) if isinstance(a[name], Mapping) else []
        if unknown:
            raise ValueError(f"`{name}` names unknown layers {unknown}; the pruned layers are {sorted(layers)}.")


def schedule_limit(a: Mapping[str, Any], trainer: pl.Trainer) -> Optional[Limit]:
    """The Trainer's end in the schedule's unit: epochs (:func:`~lightning_prune.callbacks._checks.epoch_limit`), or
    with ``interval="step"`` optimizer steps (``max_steps``, else ``max_epochs`` × steps per epoch); ``None``: none."""
    if a["interval"] == "epoch" or trainer.fast_dev_run:
        return epoch_limit(trainer)
    if trainer.max_steps >= 0:
        return Limit(trainer.max_steps, f"`max_steps`={trainer.max_steps}")
    if trainer.max_epochs in (None, -1):
        return None
    steps = stepping_batches(trainer)
    return Limit(int(steps), f"`max_epochs`={trainer.max_epochs} ({int(steps)} optimizer steps)") if steps < math.inf else None


def check_schedule_fits(a: Mapping[str, Any], limit: Optional[Limit], last_event: Optional[int] = None) -> None:
    """Refuse a schedule whose events do not all come before the Trainer's end (``MisconfigurationException`` naming
    the argument): the first at ``start_epoch``, the last at ``end_epoch`` (or ``last_event``, the resolved one), and
    with ``end_epoch=None`` (halfway to the end) a second event ``frequency`` after the first when ``frequency`` > 1."""
    unit, start, end = a["interval"], a["start_epoch"], a["end_epoch"] if last_event is None else last_event
    check_fits("IterativeMagnitude", "start_epoch", start, start + 1, limit, unit, f"its first pruning event is at {unit} {start}")
    if end is not None:
        why = f"its last pruning event, to the final `sparsity`, is at {unit} {end}"
        check_fits("IterativeMagnitude", "end_epoch", a["end_epoch"], end + 1, limit, unit, why)
    elif a["schedule"] != "one_shot" and a["frequency"] > 1:
        why = f"`end_epoch`=None ends the schedule halfway to the Trainer's end, and its second event is at {unit} {start + a['frequency']}"
        check_fits("IterativeMagnitude", "frequency", a["frequency"], start + 2 * a["frequency"], limit, unit, why)


def resolve_schedule(a: Mapping[str, Any], trainer: pl.Trainer) -> PruningSchedule:
    """The schedule in this fit's unit; ``end_epoch=None`` ends halfway to the Trainer's end (``max_epochs``, or with
    ``interval="step"`` the optimizer steps of the fit: ``max_steps`` or ``max_epochs`` × steps per epoch).
    ``fast_dev_run`` prunes once, to the final target, at the start. A schedule that cannot complete before that
    end is refused (:func:`check_schedule_fits`)."""
    if trainer.fast_dev_run:
        rank_zero_info("IterativeMagnitude: fast_dev_run prunes once, to the final target, at the start.")
        return PruningSchedule("one_shot", 0, 0)
    limit = schedule_limit(a, trainer)
    check_schedule_fits(a, limit)
    unbounded = "max_epochs" if a["interval"] == "epoch" else "max_steps"
    return PruningSchedule.before_limit(a["schedule"], a["start_epoch"], a["end_epoch"], a["frequency"], a["initial_sparsity"],
                                        None if limit is None else limit.value, unbounded)
