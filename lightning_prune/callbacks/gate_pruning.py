"""``GatePruningFromScratch``: learn channel gates on random weights, meet a FLOPs target and train the
pruned network from scratch, in one ``fit`` (Wang et al., "Pruning from Scratch", AAAI 2020).

Hook wiring only: the decisions are :class:`~lightning_prune.gate_search.GatePruning` (groups, gated groups,
target check, threshold, removal, initialisation) and :class:`~lightning_prune.gate_search.GateSearch`
(objective, selection); the gate phase's loop over the Trainer's data, the expansion, the setup checks and
the report are ``callbacks/_gate_phase.py``.
"""

from __future__ import annotations

import time
import weakref
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from typing_extensions import override

from lightning_prune.callbacks._gate_args import check_arguments, check_gate_phase_fits
from lightning_prune.callbacks._gate_phase import (
    Expansion,
    averaging_callbacks,
    changed_arguments,
    check_fit,
    check_single_instance,
    log_structure,
    run_gate_phase,
)
from lightning_prune.callbacks._module_io import ExampleInputFn, LossFn, check_function, check_loss_source, example_input
from lightning_prune.callbacks._shared import epoch_limit
from lightning_prune.callbacks._strategy import prepare_module
from lightning_prune.flops import count_flops
from lightning_prune.gate_search import GatePruning, Init, Mode, Select
from lightning_prune.gates import GatePosition, GateSites, gate_scores
from lightning_prune.structure import STRUCTURE_KEY, ChannelGroup, ChannelPlan, structure_record
from lightning_prune.training_state import rebuild_training_state, reshape_on_load

_ARGUMENTS = ("flops_ratio", "gate_ratio", "gamma", "l1", "gate_epochs", "gate_lr", "gate_position", "gate_sites",
              "round_to", "select", "gate_val_every", "monitor", "mode", "init", "budget_training", "expansion")
"""The arguments that decide the structure and its training budget (kept in checkpoints)."""
_STATE = ("pruned", "snapshot", "threshold", "reached_flops_ratio", "budget_epochs", "gate_seconds")
"""What survives a checkpoint besides the plan and the gates."""


class GatePruningFromScratch(pl.Callback):
    r"""Pruning from Scratch: find a channel structure on the random initialisation, then train it.

    At the start of training (``on_train_start``, inside the same ``fit``):

    1. **Gate phase** (``lightning_prune.gate_search.GateSearch``, which holds the objective
       ``task loss + γ(‖Λ‖₁/C − r)² + l1‖Λ‖₁``). One gate per prunable channel of the ``gate_sites``
       groups (coupled channels share one) multiplies the channel's output at ``gate_position``; with every weight frozen at
       its random initialisation only the gates learn, for ``gate_epochs`` passes over the training
       data. The task loss is the module's own ``training_step`` loss (its returned tensor or the
       ``loss`` of a returned dict, logging silenced), or ``loss_fn(pl_module, batch)``: any batch
       structure and any task. Metrics the module updates in ``training_step`` see the gate batches;
       torchmetrics metrics of the module are reset after the phase.
    2. **Selection** (``select="best_val"``): after each gate epoch (or every ``gate_val_every`` gate
       steps) the module's ``validation_step`` runs on the validation data with its ``self.log``
       calls captured (aggregated as Lightning does, see ``callbacks/_monitor.py``); ``monitor``
       names the logged key (default: the first key ending in ``loss``) and ``mode`` whether lower or
       higher is better. The best snapshot whose fraction of non-zero gates is ``<= gate_ratio`` is
       kept, else the last gates; without validation data, the last gates.
    3. **Threshold**: one global threshold over all gates for the largest structure whose fvcore
       FLOPs (multiply-adds per sample) are at most ``flops_ratio`` × the dense (unexpanded) model's.
    4. **Prune and re-initialise**: the structure is built physically; with ``init="random"`` the whole
       network is freshly initialised (PyTorch's default initialisation of every module with
       ``reset_parameters``, pruned or not), as the authors' ``train_pruned.py`` builds the pruned
       configuration anew; the optimizers and schedulers of ``configure_optimizers`` are re-created on the new
       parameters; the Trainer trains the pruned network (``budget_training``: ``round(max_epochs / flops_ratio)`` epochs)
       on its training data, the data the gates learned on. The authors learn the gates on 45k of
       CIFAR-10's training images (the other 5k select the snapshot) and train the pruned network on all
       50k; in one ``fit`` both phases read the Trainer's training and validation data, so the DataModule's
       split holds for both (the example config keeps 5k for validation throughout).

    Logged: ``gate/loss``, ``gate/task_loss``, ``gate/mean``, ``gate/nonzero_fraction`` and ``gate/step``
    every ``log_every_n_steps`` gate steps and at each gate epoch's end; ``gate/<monitor>`` after each
    validation; then ``prune/flops_ratio``, ``prune/flops_macs`` (per sample), ``prune/params_ratio``,
    ``prune/threshold``, the channel-ratio vector and a gate histogram. Checkpoints written afterwards
    hold the structure: ``fit(ckpt_path=...)`` reshapes the model and never re-runs the gate phase.
    Anything that fails or is interrupted during the gate phase (an error, Ctrl-C) leaves the model as
    it was, at its own width and weights. One instance per Trainer; reusing an instance for a ``fit`` of
    another model starts afresh.

    Channel expansion: with ``expansion != 1`` the gates are learned on the network widened by that
    factor while the FLOPs target stays relative to the unwidened model; the LightningModule must
    define ``width`` and ``set_width(width: float)`` (as ``ImageClassifier`` does).

    Example::

        import pytorch_lightning as pl
        from lightning_prune import DigitsDataModule, GatePruningFromScratch, ImageClassifier

        pruning = GatePruningFromScratch(flops_ratio=0.5, gate_epochs=1)
        trainer = pl.Trainer(max_epochs=2, callbacks=[pruning], logger=False, enable_checkpointing=False)
        trainer.fit(ImageClassifier("vgg_small"), DigitsDataModule())  # at most half the dense FLOPs

    Args:
        flops_ratio: FLOPs of the pruned model / FLOPs of the dense (unexpanded) model, in (0, 1].
        gate_ratio: ``r``, the target mean gate ‖Λ‖₁/C, in (0, 1) (paper: 0.2 on CIFAR, 0.5 on ImageNet).
        gamma: ``γ``, weight of the ratio term (paper: 0.5 on CIFAR, 0.05 on ImageNet).
        l1: weight of an extra plain L1 term ``‖Λ‖₁`` (0: off).
        gate_epochs: passes over the training data in the gate phase (paper: 10 on CIFAR; 1 under ``fast_dev_run``);
            at most the epochs the Trainer allows the fit (``max_epochs``, or those ``max_steps`` allows), else ``fit``
            is refused at the start.
        gate_lr: Adam learning rate of the gates.
        gate_sites: ``"inner"`` (the authors' placement, the paper setting: only channels that go from one
            layer through a nonlinearity into one layer, i.e. a residual block's inner channels and every
            conv-BN-ReLU of a plain net; the stem and the residual stream stay unpruned, see
            ``gates.inner_groups``) or ``"all"`` (every coupled group). Default ``"all"``: it works on any
            model whose groups are found (also one without inner groups) and lets the target cut the stream.
        round_to: keep each group's channel count a multiple of this (e.g. 8 or 16 for tensor cores; as
            Torch-Pruning's ``round_to``), or the whole group where it is smaller; the threshold search
            counts the rounded structure, so the FLOPs target still holds. ``None``: any count.
        gate_position: ``"bn"`` (after BatchNorm, before the activation: the authors'), ``"conv"``
            (on the Conv/Linear output: for layers without BatchNorm) or ``"bn_weight"`` (the
            BatchNorm scale is the gate).
        select: ``"best_val"`` (the authors' snapshot rule on ``monitor``) or ``"last"``.
        gate_val_every: validate every this many gate steps instead of once per gate epoch.
        monitor: the key ``validation_step`` logs that selects the snapshot (default: the first key
            ending in ``loss``).
        mode: ``"min"`` (lower ``monitor`` is better) or ``"max"``.
        init: ``"random"`` (the whole pruned network freshly initialised, the authors') or
            ``"inherit"`` (the surviving random weights stay).
        budget_training: "Scratch-B": train for ``round(max_epochs / flops_ratio)`` epochs.
        expansion: channel expansion factor (>= 1) of the network the gates are learned on.
        loss_fn: ``loss_fn(pl_module, batch)`` -> scalar task loss, instead of ``training_step``.
        example_input_fn: ``example_input_fn(batch)`` -> the model's input, when neither
            ``example_input_array`` nor the batch's first tensor (or the whole batch) is it.
        verbose: print the table of kept channels.

    Raises:
        ValueError: in ``__init__``, an argument out of its range; at ``setup`` or train start, before any
            weight changes: ``expansion != 1`` for a module without ``width``/``set_width``, no channel to
            gate at ``gate_position`` (try ``"conv"``), or an unreachable ``flops_ratio``.
        MisconfigurationException: ``gate_epochs`` beyond the Trainer's ``max_epochs`` (or the epochs ``max_steps``
            allows), a second instance in the Trainer, a sharded strategy, a ``torch.compile``d module, a
            spawn-based strategy without ``reshape_on_load``, no example input, manual optimization without
            ``loss_fn``, a ``training_step`` that returns no loss (pass ``loss_fn``), a ``loss_fn`` whose loss has
            no gradient, a ``monitor`` the ``validation_step`` does not log, or
            ``budget_training`` with ``StochasticWeightAveraging``.
        NonFiniteGateLoss: the gate loss became NaN or infinite; the model is left as it was.
    """

    def __init__(
        self,
        flops_ratio: float = 0.5,
        gate_ratio: float = 0.2,
        gamma: float = 0.5,
        l1: float = 0.0,
        gate_epochs: int = 10,
        gate_lr: float = 0.01,
        gate_position: GatePosition = "bn",
        gate_sites: GateSites = "all",
        round_to: Optional[int] = None,
        select: Select = "best_val",
        gate_val_every: Optional[int] = None,
        monitor: Optional[str] = None,
        mode: Mode = "min",
        init: Init = "random",
        budget_training: bool = False,
        expansion: float = 1.0,
        loss_fn: Optional[LossFn] = None,
        example_input_fn: Optional[ExampleInputFn] = None,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        given = dict(locals())
        arguments = {name: given[name] for name in (*_ARGUMENTS, "verbose")}
        check_arguments(arguments)
        check_function("loss_fn", loss_fn, 2, "loss_fn(pl_module, batch) -> loss")
        check_function("example_input_fn", example_input_fn, 1, "example_input_fn(batch) -> model input")
        for name in _ARGUMENTS:
            setattr(self, name, arguments[name])
        self.loss_fn, self.example_input_fn, self.verbose = loss_fn, example_input_fn, verbose
        self._reset()

    def _reset(self) -> None:
        """A fresh state: nothing chosen yet (also when the instance is reused on another model)."""
        self._groups: list[ChannelGroup] = []
        self._model: Optional[weakref.ref] = None  # the module this instance pruned
        self.pruned = False  # this and the rest survive checkpoints
        self.plan: ChannelPlan = {}
        self.gates: dict[int, torch.Tensor] = {}
        self.snapshot: dict[str, Any] = {}
        self.threshold: Optional[float] = None
        self.reached_flops_ratio: Optional[float] = None
        self.budget_epochs: Optional[int] = None
        self.gate_seconds: Optional[float] = None

    @property
    def state_key(self) -> str:
        """The class name alone (one instance per Trainer; Lightning refuses a second at ``Trainer(...)``, ``setup``
        one appended later): a resume with changed arguments still finds the chosen structure's state, and
        :meth:`load_state_dict` warns about the arguments that no longer apply."""
        return type(self).__qualname__

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Other stages than ``fit``: the module reshapes itself to a pruned checkpoint while it loads."""
        if stage != "fit":
            reshape_on_load(pl_module)
            return
        prepare_module(trainer, pl_module, "GatePruningFromScratch", physical=True)
        check_single_instance(trainer, self)
        if self.pruned and (self._model is None or self._model() is not pl_module):
            self._reset()  # reused for another model: search afresh (a checkpoint's structure still restores)
        if not self.pruned:
            check_fit(trainer, pl_module, self.budget_training, self.expansion)
            check_gate_phase_fits(self.gate_epochs, epoch_limit(trainer))
            check_loss_source("GatePruningFromScratch", pl_module, self.loss_fn)

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Resuming (``fit(ckpt_path=...)``): the model was already reshaped while loading (the pre-hook
        :func:`~lightning_prune.training_state.reshape_on_load` installed in ``setup``); a checkpoint that
        holds a structure means it was chosen: no gate phase."""
        self.pruned = self.pruned or STRUCTURE_KEY in checkpoint

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.pruned and self.budget_epochs is not None:  # resumed with budget training: its epoch count
            trainer.fit_loop.max_epochs = self.budget_epochs

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.pruned:
            check_gate_phase_fits(self.gate_epochs, epoch_limit(trainer))  # max_steps: the epoch length is known now
            self._search_and_prune(trainer, pl_module)
        self._model = weakref.ref(pl_module)

    def _search_and_prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Gate phase, threshold and removal; an error or Ctrl-C anywhere before the removal leaves the user's
        model as it was (its width and weights)."""
        x = example_input(trainer, pl_module, self.example_input_fn).first_sample()
        dense, dense_params = count_flops(pl_module, x), sum(p.numel() for p in pl_module.parameters())
        expansion = Expansion(pl_module, self.expansion)
        try:
            core = GatePruning(pl_module, x, dense, expanded=self.expansion != 1, flops_ratio=self.flops_ratio,
                               position=self.gate_position, sites=self.gate_sites, round_to=self.round_to)
            if core.warning:
                rank_zero_warn(core.warning)
            reduce = (lambda t, op: trainer.strategy.reduce(t, reduce_op=op)) if trainer.world_size > 1 else None
            search = core.search(lr=self.gate_lr, gamma=self.gamma, gate_ratio=self.gate_ratio, l1=self.l1, mode=self.mode, reduce=reduce)
            started = time.perf_counter()
            result = run_gate_phase(trainer, pl_module, search, epochs=self.gate_epochs, validate=self.select == "best_val",
                                    monitor=self.monitor, val_every=self.gate_val_every, loss_fn=self.loss_fn)
            self.gate_seconds = time.perf_counter() - started
            pruned = core.prune(result, trainer.strategy.broadcast(gate_scores(result, core.groups), src=0), self.init)
            expansion.keep()  # the widened model is now the pruned one
        finally:
            expansion.restore()
        self.pruned, self._groups, self.plan, self.gates = True, core.groups, pruned.plan, pruned.gates
        self.threshold, self.reached_flops_ratio = pruned.threshold, pruned.flops_ratio
        self.snapshot = dict(monitor=self.monitor, selected=result.selected, step=result.step, steps=result.steps, metric=result.metric)
        for callback in averaging_callbacks(trainer):
            callback.setup(trainer, pl_module, "fit")  # its average starts from the pruned model, as it would have from the dense one
        if self.budget_training:
            self.budget_epochs = trainer.fit_loop.max_epochs = max(1, round(trainer.max_epochs / self.flops_ratio))
        # No optimizer step has run yet: configure_optimizers builds fresh optimizers and schedulers
        # (for the possibly longer budget) on the new parameters.
        rebuild_training_state(trainer, fresh=True)
        log_structure(trainer, pl_module, core.groups, pruned, result, dense_flops=dense.total, dense_params=dense_params,
                      seconds=self.gate_seconds, budget_epochs=self.budget_epochs, verbose=self.verbose)

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.pruned:
            checkpoint[STRUCTURE_KEY] = structure_record(pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        plan, gates = {i: keep.tolist() for i, keep in self.plan.items()}, {i: gate.clone() for i, gate in self.gates.items()}
        arguments = {name: getattr(self, name) for name in _ARGUMENTS}
        return {**{name: getattr(self, name) for name in _STATE}, "plan": plan, "gates": gates, "arguments": arguments}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for name in _STATE:
            setattr(self, name, state_dict[name])
        self.plan = {int(index): torch.tensor(keep, dtype=torch.long) for index, keep in state_dict["plan"].items()}
        self.gates = {int(index): gate for index, gate in state_dict["gates"].items()}
        warning = changed_arguments(state_dict.get("arguments", {}), {name: getattr(self, name) for name in _ARGUMENTS})
        if self.pruned and warning:
            rank_zero_warn(warning)
