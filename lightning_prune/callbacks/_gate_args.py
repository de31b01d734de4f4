"""Construction-time checks of every ``GatePruningFromScratch`` argument: type, range and choice.

Each error is a ``ValueError`` naming the argument, the value and what is allowed; nothing has run yet.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

from lightning_prune.callbacks._checks import Limit, check_fits, check_flags, check_range
from lightning_prune.choices import check_choice
from lightning_prune.gate_search import Init, Mode, Select
from lightning_prune.gates import GatePosition, GateSites
from lightning_prune.structure.plans import check_round_to


def check_arguments(a: Mapping[str, Any]) -> None:
    """Validate the arguments of ``GatePruningFromScratch.__init__`` (by name; the two functions are checked
    by ``_module_io.check_function``)."""
    check_range("flops_ratio", a["flops_ratio"], 0.0, 1.0, low_open=True, high_open=False)
    check_range("gate_ratio", a["gate_ratio"], 0.0, 1.0, low_open=True, high_open=True)
    check_range("gamma", a["gamma"], 0.0, math.inf, low_open=False, high_open=True)
    check_range("l1", a["l1"], 0.0, math.inf, low_open=False, high_open=True)
    check_range("gate_lr", a["gate_lr"], 0.0, math.inf, low_open=True, high_open=True)
    check_range("expansion", a["expansion"], 1.0, math.inf, low_open=False, high_open=True)
    value = a["gate_epochs"]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`gate_epochs` must be an integer >= 1, got {value!r}.")
    check_choice("gate_position", a["gate_position"], GatePosition)
    check_choice("gate_sites", a["gate_sites"], GateSites)
    check_choice("select", a["select"], Select)
    check_choice("mode", a["mode"], Mode)
    check_choice("init", a["init"], Init)
    check_round_to(a["round_to"])
    monitor = a["monitor"]
    if monitor is not None and not (isinstance(monitor, str) and monitor):
        raise ValueError(f"`monitor` must be None or the name of a logged validation metric (a non-empty str), got {monitor!r}.")
    check_flags(budget_training=a["budget_training"], verbose=a["verbose"])


def check_gate_phase_fits(gate_epochs: int, limit: Optional[Limit]) -> None:
    """The gate epochs are the fit's first epochs: they must leave at least one epoch of the Trainer's limit to
    train the pruned network (``MisconfigurationException`` naming ``gate_epochs`` and the limit)."""
    check_fits("GatePruningFromScratch", "gate_epochs", gate_epochs, gate_epochs + 1, limit, "epoch",
               "the gate epochs, then at least one epoch to train the pruned network")
