"""The Lightning side of ``GatePruningFromScratch``, with no pruning decision in it (those are
:class:`~lightning_prune.gate_search.GatePruning`'s and :class:`~lightning_prune.gate_search.GateSearch`'s).

:class:`GatePhase` is the gate phase while it runs inside the fit: built at ``setup`` (the model widened by any
expansion, its weights frozen, the gates inserted and registered on the LightningModule, all before the strategy
wraps it), it swaps the gate optimizer in for the user's (:meth:`GatePhase.start`), and leaves the model either
pruned (:meth:`GatePhase.prune`) or as it was (:meth:`GatePhase.abort`). Also here: the channel expansion
(:class:`Expansion`).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from lightning_prune.callbacks._figures import Figures
from lightning_prune.gate_search import GatePruned, GatePruning, GateSearch, Init
from lightning_prune.gates import FrozenNetwork, GatePhaseResult, gate_scores
from lightning_prune.pruner import hook_optimizer


class Expansion:
    """The module widened by ``factor`` (its ``set_width``) for the gate phase; :meth:`restore` gives it back
    its width and weights (on any failure), :meth:`keep` makes the widened, now pruned, module the result."""

    def __init__(self, pl_module: pl.LightningModule, factor: float) -> None:
        self.pl_module = pl_module
        self.original: Optional[tuple[float, dict[str, torch.Tensor]]] = None
        if factor != 1:
            self.original = (pl_module.width, {k: v.detach().clone() for k, v in pl_module.state_dict().items()})
            pl_module.set_width(pl_module.width * factor)

    def keep(self) -> None:
        self.original = None

    def restore(self) -> None:
        if self.original is not None:
            (width, state), self.original = self.original, None
            self.pl_module.set_width(width)
            self.pl_module.load_state_dict(state)


class GatePhase:
    """The gate phase of one fit, from ``setup`` (module docstring; ``figures``: the dense model's example input and
    FLOPs) to the pruning at the end of the last gate epoch. :class:`~lightning_prune.gate_search.GatePruning` refuses
    an unreachable target before any weight changes."""

    def __init__(self, trainer: pl.Trainer, pl_module: pl.LightningModule, figures: Figures, *, expansion: float,
                 flops_ratio: float, position: str, sites: str, round_to: Optional[int], search_options: Mapping[str, Any]) -> None:
        self.expansion = Expansion(pl_module, expansion)
        try:
            self.core = GatePruning(pl_module, figures.example, figures.dense_flops, expanded=expansion != 1, flops_ratio=flops_ratio,
                                    position=position, sites=sites, round_to=round_to)
            if self.core.warning:
                rank_zero_warn(self.core.warning)
            reduce = (lambda t, op: trainer.strategy.reduce(t, reduce_op=op)) if trainer.world_size > 1 else None
            self.search: GateSearch = self.core.search(reduce=reduce, **search_options)
        except BaseException:
            self.expansion.restore()
            raise
        self.frozen = FrozenNetwork(pl_module)
        self.search.gates.attach(register=True)
        self._hook: Optional[Any] = None

    def start(self, trainer: pl.Trainer) -> None:
        """``on_fit_start`` (the module is on its device and wrapped; optimizer states load after this): the gate
        optimizer replaces the user's, their LR schedulers are set aside (``configure_optimizers`` builds fresh
        ones at the pruning), and each gate step ends with the clamp and the running sum (the callback adds the penalty's
        gradient in ``on_before_optimizer_step``)."""
        strategy = trainer.strategy
        if not trainer.lightning_module.automatic_optimization and len(strategy.optimizers) > 1:
            raise MisconfigurationException(
                f"GatePruningFromScratch: {type(trainer.lightning_module).__name__} uses manual optimization with "
                f"{len(strategy.optimizers)} optimizers; during the gate epochs `self.optimizers()` is the one gate "
                "optimizer, so its `training_step` must step one optimizer."
            )
        self.search.to(self.search.gates.device)
        strategy.optimizers = [self.search.optimizer]
        strategy.lr_scheduler_configs = []
        if self._hook is None:
            self._hook = hook_optimizer(self.search.optimizer, self.search, before_step=False)  # the clamp after each step

    def close(self) -> None:
        """Gates out (their parameter unregistered), every flag, mode and buffer of the module restored."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.search.gates.remove()
        self.frozen.restore()

    def abort(self) -> None:
        """The model as it was before ``setup``: gates out, flags and buffers back, its own width and weights."""
        self.close()
        self.expansion.restore()

    def prune(self, trainer: pl.Trainer, init: Init, seed: int) -> tuple[GatePhaseResult, GatePruned]:
        """The selected gates' structure, removed physically and initialised (``init="random"`` from ``seed``)."""
        self.close()
        result = self.search.result()
        scores = trainer.strategy.broadcast(gate_scores(result, self.core.groups), src=0)
        try:
            pruned = self.core.prune(result, scores, init, seed=seed)
        except BaseException:
            self.expansion.restore()
            raise
        self.expansion.keep()  # the widened model is now the pruned one
        return result, pruned

    def state_dict(self) -> dict[str, Any]:
        return {"search": self.search.state_dict(), "buffers": {name: b.cpu() for name, b in self.frozen.buffers.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.search.load_state_dict(state["search"])
        self.frozen.buffers = dict(state["buffers"])
