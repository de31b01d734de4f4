"""Construction-time checks of ``AutoPruneCallback``'s arguments, and its two sets of defaults.

Each error is a ``ValueError`` naming the argument, the value and what is allowed; nothing has run yet.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

from lightning_prune.callbacks._shared import check_range

CALIBRATED = {"aux_lr": 1.5e-2, "reg": 1.25}
"""The defaults calibrated on the digits data (``reg`` relative to the normalised loss signal)."""
PAPER = {"aux_lr": 1.5e-2, "reg": 5e-2}
"""The paper's numbers for all its models: auxiliary learning rate 1.5e-2, µ = 5e-2 (no normalisation)."""


class Rates(NamedTuple):
    """What the auxiliary step uses: ``M``'s learning rate, the pull's coefficient, the normalisation."""

    aux_lr: float
    reg: float
    normalize: bool


def resolve_rates(paper_defaults: bool, aux_lr: Optional[float], reg: Optional[float]) -> Rates:
    """``aux_lr``/``reg`` left at ``None`` take the calibrated defaults, or the paper's with ``paper_defaults``
    (which also turns the loss-signal normalisation off). With ``paper_defaults=True`` an explicit value
    other than the paper's is refused, naming both arguments (as Lightning refuses contradicting arguments)."""
    if not isinstance(paper_defaults, bool):
        raise ValueError(f"`paper_defaults` must be True or False, got {paper_defaults!r}.")
    chosen = {"aux_lr": aux_lr, "reg": reg}
    for name, value in chosen.items():
        if value is not None:
            check_range(name, value, 0.0, math.inf, low_open=name == "aux_lr")
    defaults = PAPER if paper_defaults else CALIBRATED
    if paper_defaults:
        for name, value in chosen.items():
            if value is not None and value != PAPER[name]:
                raise ValueError(
                    f"`{name}`={value!r} contradicts `paper_defaults`=True, which sets `{name}`={PAPER[name]!r}: "
                    f"leave `{name}` unset (None) or pass `paper_defaults`=False."
                )
    return Rates(*(float(defaults[name] if value is None else value) for name, value in chosen.items()), not paper_defaults)
