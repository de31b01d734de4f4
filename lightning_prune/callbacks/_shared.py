"""What the callbacks' hooks share: argument checks and the FLOPs count used for reports."""

from __future__ import annotations

import math
from typing import Any, Collection, Mapping, Optional, Union

import pytorch_lightning as pl
from jsonargparse.typing import restricted_number_type
from pytorch_lightning.utilities import rank_zero_warn

from lightning_prune.flops import FlopCount, count_flops
from lightning_prune.structure import ExampleInput

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
) -> None:
    """``value`` (or every value of a mapping) must be a number in the interval from ``low`` to ``high``
    (default [0, 1)); ``low_open``/``high_open`` exclude an end. The error names the argument."""
    values = value.values() if isinstance(value, Mapping) else [value]
    for item in values:
        number = not isinstance(item, bool) and isinstance(item, (int, float)) and not math.isnan(item)
        if not (number and (item > low if low_open else item >= low) and (item < high if high_open else item <= high)):
            interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
            raise ValueError(f"`{name}` must be in {interval}, got {value!r}.")


def check_flags(**flags: Any) -> None:
    """Each value must be a bool (``1`` or ``"yes"`` is refused)."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise ValueError(f"`{name}` must be True or False, got {value!r}.")


def check_keys(name: str, mapping: Mapping[str, Any], known: Collection[str]) -> None:
    """Every key of a per-layer mapping must name a selected layer."""
    unknown = sorted(set(mapping) - set(known))
    if unknown:
        raise ValueError(f"`{name}` names unknown layers {unknown}; the pruned layers are {sorted(known)}.")


def optional_flop_count(pl_module: pl.LightningModule, example: Optional[ExampleInput]) -> Optional[FlopCount]:
    """fvcore's count for reports, or ``None`` when there is no example input or fvcore cannot trace the
    model: element pruning does not need FLOPs, so a tracing failure warns instead of stopping the run."""
    if example is None:
        return None
    try:
        return count_flops(pl_module, example)
    except Exception as error:  # noqa: BLE001 - any tracing failure only costs the FLOPs figures
        rank_zero_warn(f"FLOPs are not reported: fvcore could not trace the model on its example input ({error}).")
        return None
