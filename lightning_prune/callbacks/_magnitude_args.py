"""Construction-time checks of every ``IterativeMagnitude`` argument: type, range and combination.

Each error is a ``ValueError`` naming the argument, the value and what is allowed; nothing has run yet.
"""

from __future__ import annotations

from typing import Any, Mapping

from lightning_prune.callbacks._shared import check_range
from lightning_prune.checks import check_patterns
from lightning_prune.choices import check_choice
from lightning_prune.criteria import ChannelNorm, Criterion, Granularity, Scope
from lightning_prune.schedules import Interval, PruningSchedule, ScheduleKind


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"`{name}` must be {allowed}, got {value!r}.")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_per_layer(name: str, value: Any, high: float, high_open: bool) -> None:
    if isinstance(value, Mapping) and not all(isinstance(key, str) for key in value):
        _fail(name, value, "a number or a mapping {module name: number}")
    check_range(name, value, 0.0, high, high_open=high_open)


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
    PruningSchedule(a["schedule"], a["start_epoch"], a["start_epoch"] if a["end_epoch"] is None else a["end_epoch"], a["frequency"])
    for name in ("parameters", "exclude"):
        check_patterns(name, a[name])
    if isinstance(a["max_layer_sparsity"], bool) or not isinstance(a["max_layer_sparsity"], (int, float)):
        _fail("max_layer_sparsity", a["max_layer_sparsity"], "a number in (0, 1]")
    check_range("max_layer_sparsity", a["max_layer_sparsity"], 0.0, 1.0, low_open=True, high_open=False)
    for name in ("make_permanent", "physical", "verbose"):
        if not isinstance(a[name], bool):
            _fail(name, a[name], "True or False")
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
