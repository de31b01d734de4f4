"""``GatePruningFromScratch``'s checks: every argument at construction (type, range and choice; a ``ValueError``
naming the argument, the value and what is allowed), and the fit at ``setup`` (:func:`check_fit`) and train start
(:func:`check_gate_phase_fits`), before any weight changes."""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_warn
from pytorch_lightning.utilities.exceptions import MisconfigurationException

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


def check_fit(trainer: pl.Trainer, pl_module: pl.LightningModule, budget_training: bool, expansion: float, gate_epochs: int) -> None:
    """What ``setup`` refuses before a gate phase: a budget without a finite ``max_epochs`` or after
    StochasticWeightAveraging fixed its schedule, an average that would start inside the gate epochs, and an
    expansion the module cannot make."""
    if budget_training and (trainer.max_epochs is None or trainer.max_epochs < 1):
        raise ValueError(
            f"`budget_training=True` scales the Trainer's `max_epochs`, which must be a positive number, got {trainer.max_epochs!r}."
        )
    if budget_training and trainer.max_steps not in (None, -1):
        rank_zero_warn(
            f"`budget_training=True` trains for gate_epochs + round((max_epochs - gate_epochs) / flops_ratio) epochs, but "
            f"`max_steps`={trainer.max_steps} may end training first: the pruned network would get less than its budget."
        )
    if budget_training and averaging_callbacks(trainer):
        raise MisconfigurationException(
            "`budget_training=True` changes `max_epochs` after StochasticWeightAveraging fixed its schedule on it: "
            "set the Trainer's `max_epochs` to the budget yourself, or drop one of the two."
        )
    for swa in averaging_callbacks(trainer):
        start = swa._swa_epoch_start
        first = max((int(trainer.max_epochs * start) if isinstance(start, float) else int(start)) - 1, 0)  # as SWA counts it
        if first < gate_epochs:
            raise MisconfigurationException(
                f"StochasticWeightAveraging would start averaging at epoch {first}, inside the {gate_epochs} gate epochs of "
                "GatePruningFromScratch (the gate epochs are the fit's first epochs, and the weights there are the random "
                f"ones the gates learn on): set its `swa_epoch_start` to at least {gate_epochs + 1}."
            )
    if expansion != 1 and not (callable(getattr(pl_module, "set_width", None)) and hasattr(pl_module, "width")):
        raise ValueError(
            f"`expansion`={expansion} needs a LightningModule that can rebuild itself wider: define a `width` "
            f"attribute and `set_width(width: float)` (as `ImageClassifier` does); {type(pl_module).__name__} has not."
        )


def averaging_callbacks(trainer: pl.Trainer) -> list[pl.callbacks.StochasticWeightAveraging]:
    return [callback for callback in trainer.callbacks if isinstance(callback, pl.callbacks.StochasticWeightAveraging)]
