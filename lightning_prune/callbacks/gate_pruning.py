"""``GatePruningFromScratch``: learn channel gates on random weights, meet a FLOPs target and train the
pruned network from scratch, in one ``fit`` (Wang et al., "Pruning from Scratch", AAAI 2020).

The algorithm (objective, selection, threshold search) is :class:`lightning_prune.gate_search.GateSearch`;
this module wires it to Lightning's hooks. The gate phase runs inside ``on_train_start``, as a loop of
its own over the Trainer's training data: Lightning's fit loop cannot run it, because it would step the
user's optimizers, run their callbacks and count global steps. What it takes from Lightning: the data
(``limit_*_batches``, device transfer and the module's transfer hooks), the loss (the module's own
``training_step`` under the precision plugin's autocast), the validation metric (``validation_step``'s
logs), ``log_every_n_steps`` and the loggers, and whether a progress bar is shown (a ``tqdm`` bar of its own:
Lightning's progress bar callbacks have no public API for an extra loop).
"""

from __future__ import annotations

import itertools
import math
import time
import weakref
from typing import Any, Iterator, Mapping, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from lightning_utilities.core.overrides import is_overridden
from typing_extensions import override

from lightning_prune.callbacks._module_io import ExampleInputFn, LossFn, check_function, example_input, module_loss, one_sample
from lightning_prune.callbacks._monitor import monitored_value, validation_metrics
from lightning_prune.callbacks._shared import check_range
from lightning_prune.choices import check_choice
from lightning_prune.callbacks._strategy import prepare_module
from lightning_prune.channel_search import search_threshold
from lightning_prune.flops import FlopsPredictor, count_flops
from lightning_prune.gate_search import GateSearch, Init, Mode, Select, check_target, reinitialise
from lightning_prune.gates import GatePhaseResult, GatePosition, GateSites, gate_scores, gated_groups
from lightning_prune.loggers import log_metrics, log_pruning_event
from lightning_prune.report import channel_rows, pruning_summary
from lightning_prune.structure.plans import check_round_to
from lightning_prune.structure import (
    STRUCTURE_KEY,
    ChannelGroup,
    ChannelPlan,
    apply_plan,
    find_channel_groups,
    layer_channel_ratios,
    structure_record,
)
from lightning_prune.training_state import rebuild_training_state


class GatePruningFromScratch(pl.Callback):
    r"""Pruning from Scratch: find a channel structure on the random initialisation, then train it.

    At the start of training (``on_train_start``, inside the same ``fit``):

    1. **Gate phase** (:class:`~lightning_prune.gate_search.GateSearch`, which holds the objective
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

    Args:
        flops_ratio: FLOPs of the pruned model / FLOPs of the dense (unexpanded) model, in (0, 1].
        gate_ratio: ``r``, the target mean gate ‖Λ‖₁/C, in (0, 1) (paper: 0.2 on CIFAR, 0.5 on ImageNet).
        gamma: ``γ``, weight of the ratio term (paper: 0.5 on CIFAR, 0.05 on ImageNet).
        l1: weight of an extra plain L1 term ``‖Λ‖₁`` (0: off).
        gate_epochs: passes over the training data in the gate phase (paper: 10 on CIFAR; 1 under ``fast_dev_run``).
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
        check_range("flops_ratio", flops_ratio, 0.0, 1.0, low_open=True, high_open=False)
        check_range("gate_ratio", gate_ratio, 0.0, 1.0, low_open=True, high_open=True)
        check_range("gamma", gamma, 0.0, math.inf, low_open=False, high_open=True)
        check_range("l1", l1, 0.0, math.inf, low_open=False, high_open=True)
        check_range("gate_lr", gate_lr, 0.0, math.inf, low_open=True, high_open=True)
        check_range("expansion", expansion, 1.0, math.inf, low_open=False, high_open=True)
        _check_int("gate_epochs", gate_epochs, 0)
        if gate_val_every is not None:
            _check_int("gate_val_every", gate_val_every, 1)
        check_choice("gate_position", gate_position, GatePosition)
        check_choice("gate_sites", gate_sites, GateSites)
        check_round_to(round_to)
        check_choice("select", select, Select)
        check_choice("mode", mode, Mode)
        check_choice("init", init, Init)
        if monitor is not None and not (isinstance(monitor, str) and monitor):
            raise ValueError(f"`monitor` must be None or the name of a logged validation metric (a non-empty str), got {monitor!r}.")
        for name, value in (("budget_training", budget_training), ("verbose", verbose)):
            if not isinstance(value, bool):
                raise ValueError(f"`{name}` must be True or False, got {value!r}.")
        check_function("loss_fn", loss_fn, 2, "loss_fn(pl_module, batch) -> loss")
        check_function("example_input_fn", example_input_fn, 1, "example_input_fn(batch) -> model input")
        self.flops_ratio, self.gate_ratio, self.gamma, self.l1 = flops_ratio, gate_ratio, gamma, l1
        self.gate_epochs, self.gate_lr, self.gate_position, self.gate_sites = gate_epochs, gate_lr, gate_position, gate_sites
        self.select, self.gate_val_every, self.monitor, self.mode = select, gate_val_every, monitor, mode
        self.init, self.budget_training, self.expansion, self.round_to = init, budget_training, expansion, round_to
        self.loss_fn, self.example_input_fn, self.verbose = loss_fn, example_input_fn, verbose
        self._reset()

    def _reset(self) -> None:
        """A fresh state: nothing chosen yet (also when the instance is reused on another model)."""
        self._groups: list[ChannelGroup] = []
        self._gated: list[ChannelGroup] = []
        self._predictor: Optional[FlopsPredictor] = None
        self._dense_flops = self._dense_params = 0
        self._original: Optional[tuple[float, dict[str, torch.Tensor]]] = None  # (width, state) before expansion
        self._model: Optional[weakref.ref] = None  # the module this instance pruned
        # Survives checkpoints.
        self.pruned = False
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

    def _arguments(self) -> dict[str, Any]:
        """The arguments that decide the structure and its training budget."""
        names = ("flops_ratio", "gate_ratio", "gamma", "l1", "gate_epochs", "gate_lr", "gate_position", "gate_sites", "round_to", "select",
                 "gate_val_every", "monitor", "mode", "init", "budget_training", "expansion")
        return {name: getattr(self, name) for name in names}

    # ------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        prepare_module(trainer, pl_module, "GatePruningFromScratch", physical=True)
        others = [cb for cb in trainer.callbacks if isinstance(cb, GatePruningFromScratch) and cb is not self]
        if others:
            raise MisconfigurationException(
                f"The Trainer has {len(others) + 1} GatePruningFromScratch callbacks; one gate phase chooses one structure, "
                "so give it one (the second would search a model the first already pruned)."
            )
        if self.pruned and (self._model is None or self._model() is not pl_module):
            self._reset()  # reused for another model: search afresh (a checkpoint's structure still restores)
        if self.pruned:
            return
        if self.budget_training and (trainer.max_epochs is None or trainer.max_epochs < 1):
            raise ValueError(
                f"`budget_training=True` scales the Trainer's `max_epochs`, which must be a positive number, got {trainer.max_epochs!r}."
            )
        if self.budget_training and trainer.max_steps not in (None, -1):
            rank_zero_warn(
                f"`budget_training=True` trains for round(max_epochs / flops_ratio) epochs, but `max_steps`={trainer.max_steps} "
                "may end training first: the pruned network would get less than the dense model's training budget."
            )
        if self.budget_training and _averaging_callbacks(trainer):
            raise MisconfigurationException(
                "`budget_training=True` changes `max_epochs` after StochasticWeightAveraging fixed its schedule on it: "
                "set the Trainer's `max_epochs` to the budget yourself, or drop one of the two."
            )
        if self.expansion != 1 and not (callable(getattr(pl_module, "set_width", None)) and hasattr(pl_module, "width")):
            raise ValueError(
                f"`expansion`={self.expansion} needs a LightningModule that can rebuild itself wider: define a `width` "
                f"attribute and `set_width(width: float)` (as `ImageClassifier` does); {type(pl_module).__name__} has not."
            )

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Resuming (``fit(ckpt_path=...)``): the model was already reshaped while loading (the pre-hook
        :func:`~lightning_prune.training_state.reshape_on_load` installed in ``setup``); a checkpoint that
        holds a structure means it was chosen: no gate phase, no expansion to undo."""
        if STRUCTURE_KEY in checkpoint:
            self.pruned, self._original = True, None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.pruned and self.budget_epochs is not None:  # resumed with budget training: its epoch count
            trainer.fit_loop.max_epochs = self.budget_epochs

    def _restore_width(self, pl_module: pl.LightningModule) -> None:
        """Undo the expansion: the user's model back at its width with its own weights."""
        if self._original is not None:
            width, state = self._original
            self._original = None
            pl_module.set_width(width)
            pl_module.load_state_dict(state)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_width(pl_module)

    # ------------------------------------------------------------------ gate phase and pruning
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.pruned:
            self._model = weakref.ref(pl_module)
            return
        try:  # an error or Ctrl-C anywhere before the plan is applied leaves the user's model as it was
            x = self._prepare(trainer, pl_module)
            started = time.perf_counter()
            result = self._gate_phase(trainer, pl_module)
            self.gate_seconds = time.perf_counter() - started
            self._prune(trainer, pl_module, result, x)
        finally:
            self._restore_width(pl_module)

    def _prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[Any, ...]:
        """Dense FLOPs (per sample), then the expansion, channel groups and FLOPs predictor; refuses an
        unreachable target or a model without a gateable channel before any weight changes."""
        x = one_sample(example_input(trainer, pl_module, self.example_input_fn))
        dense_count = count_flops(pl_module, x)
        self._dense_flops = dense_count.total
        self._dense_params = sum(p.numel() for p in pl_module.parameters())
        if self.expansion != 1:
            self._original = (pl_module.width, {k: v.detach().clone() for k, v in pl_module.state_dict().items()})
            pl_module.set_width(pl_module.width * self.expansion)
        self._groups = find_channel_groups(pl_module, x)
        self._predictor = FlopsPredictor(pl_module, x, self._groups, dense_count if self.expansion == 1 else None)
        self._gated = gated_groups(pl_module, self._groups, x, self.gate_sites)
        warning = check_target(pl_module, self._groups, self._gated, self.gate_position, self._predictor, self._dense_flops, self.flops_ratio, self.round_to)
        if warning:
            rank_zero_warn(warning)
        return x

    def _gate_phase(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> GatePhaseResult:
        val_loader = trainer.val_dataloaders
        if isinstance(val_loader, (list, tuple)):
            val_loader = val_loader[0] if val_loader else None
        validate = self.select == "best_val" and val_loader is not None and is_overridden("validation_step", pl_module, parent=_lightning_module_base(pl_module))
        if self.select == "best_val" and not validate:
            rank_zero_warn("GatePruningFromScratch: no validation data or `validation_step`, so the last gates are kept.")
        val_limit = _limit((trainer.num_val_batches or [math.inf])[0])

        def reduce(tensor: torch.Tensor, op: str) -> torch.Tensor:
            return trainer.strategy.reduce(tensor, reduce_op=op) if trainer.world_size > 1 else tensor

        search = GateSearch(
            pl_module, self._groups, position=self.gate_position, gated=self._gated, lr=self.gate_lr, gamma=self.gamma,
            gate_ratio=self.gate_ratio, l1=self.l1, mode=self.mode, reduce=reduce,
        )
        limit = _limit(trainer.num_training_batches)
        bar = _progress_bar(trainer, None if limit is None else (1 if trainer.fast_dev_run else self.gate_epochs) * limit)

        def log(metrics: dict[str, float]) -> None:
            log_metrics(trainer, {**metrics, "gate/step": float(search.steps)})
            if bar is not None and "gate/loss" in metrics:
                bar.set_postfix(loss=f"{metrics['gate/loss']:.3f}", mean_gate=f"{metrics['gate/mean']:.3f}")

        def batches() -> Iterator[Any]:
            loaders = trainer.train_dataloader
            if isinstance(loaders, (Mapping, list, tuple)):  # several loaders: one combined batch per step, as Lightning's fit loop
                loaders = (batch for batch, _, _ in pl.utilities.CombinedLoader(loaders, "max_size_cycle"))
            for batch in itertools.islice(loaders, limit):
                yield trainer.precision_plugin.convert_input(trainer.strategy.batch_to_device(batch))

        try:
            result = search.run(
                batches,
                lambda batch, index: module_loss(trainer, pl_module, batch, self.loss_fn, index),
                epochs=1 if trainer.fast_dev_run else self.gate_epochs,
                log_every=max(1, trainer.log_every_n_steps),
                validate=(lambda: monitored_value(validation_metrics(trainer, pl_module, val_loader, val_limit), self.monitor)) if validate else None,
                val_every=self.gate_val_every,
                log=log,
                on_step=None if bar is None else (lambda: bar.update(1)),
            )
        finally:
            if bar is not None:
                bar.close()
            for module in pl_module.modules():  # torchmetrics metrics saw the gate batches
                if module is not pl_module and all(callable(getattr(module, n, None)) for n in ("compute", "reset", "update")):
                    module.reset()
        self.snapshot = {"monitor": self.monitor}
        return result

    def _prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule, result: GatePhaseResult, x: tuple[Any, ...]) -> None:
        scores = trainer.strategy.broadcast(gate_scores(result, self._groups), src=0)
        target = min(1.0, self.flops_ratio * self._dense_flops / self._predictor.dense)
        found = search_threshold(scores, target, self._predictor, round_to=self.round_to)
        apply_plan(pl_module, self._groups, found.plan, x)
        self._original = None  # the widened model is now the pruned one: nothing to restore
        if self.init == "random":
            reinitialise(pl_module)
        self.pruned, self._model = True, weakref.ref(pl_module)
        for callback in _averaging_callbacks(trainer):
            callback.setup(trainer, pl_module, "fit")  # its average starts from the pruned model, as it would have from the dense one
        self.plan = {index: keep.cpu() for index, keep in found.plan.items()}
        self.gates = result.gates
        self.snapshot.update(selected=result.selected, step=result.step, steps=result.steps, metric=result.metric)
        self.threshold = float(torch.cat([result.gates[g][found.plan[g].cpu()] for g in result.gates]).min())
        self.reached_flops_ratio = found.flops / self._dense_flops
        if self.budget_training:
            self.budget_epochs = max(1, round(trainer.max_epochs / self.flops_ratio))
            trainer.fit_loop.max_epochs = self.budget_epochs
        # No optimizer step has run yet: configure_optimizers builds fresh optimizers and schedulers
        # (for the possibly longer budget) on the new parameters.
        rebuild_training_state(trainer, fresh=True)
        self._log_structure(trainer, pl_module, result)

    def _log_structure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, result: GatePhaseResult) -> None:
        ratios = layer_channel_ratios(self._groups, self.plan)
        params = sum(p.numel() for p in pl_module.parameters())
        extra = {
            "flops_macs": self.reached_flops_ratio * self._dense_flops,
            "dense_flops_macs": float(self._dense_flops),
            "params_ratio": params / self._dense_params,
            "threshold": self.threshold,
            "gate_phase_seconds": self.gate_seconds,
            "gate_snapshot_step": float(result.step),
        }
        if self.budget_epochs is not None:
            extra["max_epochs"] = float(self.budget_epochs)
        log_pruning_event(
            trainer,
            flops_ratio=self.reached_flops_ratio,
            channel_ratios=ratios,
            histograms={"gates": torch.cat(list(result.gates.values()))},
            extra=extra,
        )
        if self.verbose and trainer.is_global_zero:
            snapshot = f"gate snapshot: {result.selected} at gate step {result.step}/{result.steps}"
            facts = [snapshot + (f" (monitored {result.metric:.4f})" if result.metric is not None else "")]
            if self.budget_epochs is not None:
                facts.append(f"budget training: max_epochs -> {self.budget_epochs}")
            flops = (self._dense_flops, round(self.reached_flops_ratio * self._dense_flops))
            rank_zero_info(pruning_summary("GatePruningFromScratch structure", channels=channel_rows(self._groups, self.plan),
                                           parameters=(self._dense_params, params), flops=flops, facts=facts, kept="remaining"))

    # ------------------------------------------------------------------ checkpoints
    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.pruned:
            checkpoint[STRUCTURE_KEY] = structure_record(pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "pruned": self.pruned,
            "plan": {index: keep.tolist() for index, keep in self.plan.items()},
            "gates": {index: gate.clone() for index, gate in self.gates.items()},
            "snapshot": dict(self.snapshot),
            "threshold": self.threshold,
            "reached_flops_ratio": self.reached_flops_ratio,
            "budget_epochs": self.budget_epochs,
            "gate_seconds": self.gate_seconds,
            "arguments": self._arguments(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.pruned = state_dict["pruned"]
        self.plan = {int(index): torch.tensor(keep, dtype=torch.long) for index, keep in state_dict["plan"].items()}
        self.gates = {int(index): gate for index, gate in state_dict["gates"].items()}
        self.snapshot = dict(state_dict["snapshot"])
        self.threshold = state_dict["threshold"]
        self.reached_flops_ratio = state_dict["reached_flops_ratio"]
        self.budget_epochs = state_dict["budget_epochs"]
        self.gate_seconds = state_dict["gate_seconds"]
        changed = {k: v for k, v in state_dict.get("arguments", {}).items() if self._arguments().get(k, v) != v}
        if self.pruned and changed:
            rank_zero_warn(
                "GatePruningFromScratch: resuming the structure this checkpoint chose with "
                + ", ".join(f"{k}={v!r}" for k, v in changed.items())
                + "; the gate phase is not run again, so the current "
                + ", ".join(f"{k}={self._arguments()[k]!r}" for k in changed)
                + " does not apply (the checkpoint's structure and training budget do). Start a new run to use them."
            )


def _averaging_callbacks(trainer: pl.Trainer) -> list[pl.callbacks.StochasticWeightAveraging]:
    return [callback for callback in trainer.callbacks if isinstance(callback, pl.callbacks.StochasticWeightAveraging)]


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}.")


def _limit(value: float) -> Optional[int]:
    return None if value == math.inf else int(value)


def _progress_bar(trainer: pl.Trainer, total: Optional[int]) -> Optional[Any]:
    """A ``tqdm`` bar on global rank zero when the Trainer shows a progress bar."""
    if trainer.progress_bar_callback is None or not trainer.is_global_zero:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="Gate phase (pruning from scratch)", leave=False, dynamic_ncols=True)


def _lightning_module_base(pl_module: Any) -> type:
    """The ``LightningModule`` class ``pl_module`` derives from, of either Lightning namespace."""
    return next(c for c in type(pl_module).__mro__ if c.__name__ == "LightningModule" and c.__module__.endswith("core.module"))
