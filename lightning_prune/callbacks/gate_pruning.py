"""``GatePruningFromScratch``: learn channel gates on random weights, meet a FLOPs target and train the
pruned network from scratch, in one ``fit`` (Wang et al., "Pruning from Scratch", AAAI 2020).

Hook wiring only: the decisions are :class:`~lightning_prune.gate_search.GatePruning` (groups, gated groups,
target check, threshold, removal, initialisation) and :class:`~lightning_prune.gate_search.GateSearch`
(objective, penalty gradient, selection); the running gate phase (gates in, weights frozen, the gate optimizer
swapped in, the way back) and the expansion are ``callbacks/_gate_phase.py``, the checks ``callbacks/_gate_checks.py``.
"""

from __future__ import annotations

import time
import weakref
from typing import Any, Mapping, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lightning_prune.callbacks._checks import epoch_limit
from lightning_prune.callbacks._figures import Figures
from lightning_prune.callbacks._gate_checks import averaging_callbacks, check_arguments, check_fit, check_gate_phase_fits
from lightning_prune.callbacks._gate_phase import GatePhase
from lightning_prune.callbacks._module_io import ExampleInputFn, check_function
from lightning_prune.callbacks.base import PruningCallback
from lightning_prune.gate_search import GatePruned, Init, Mode, Select
from lightning_prune.gates import GATE_PARAMETER, GatePhaseResult, GatePosition, GateSites
from lightning_prune.loggers import log_metrics
from lightning_prune.report import channel_rows
from lightning_prune.structure import ChannelPlan, layer_channel_ratios, structure_record
from lightning_prune.training_state import rebuild_training_state, reshape_to_state_dict

_STATE = ("snapshot", "threshold", "reached_flops_ratio", "budget_epochs", "gate_seconds", "seed", "monitor_key")
"""What survives a checkpoint besides the arguments, the plan, the gates and a running gate phase."""
_NO_KEY = ""
"""``monitor_key`` when the first validation logged no key ending in ``loss``: nothing to select on."""


class GatePruningFromScratch(PruningCallback):
    r"""Pruning from Scratch: find a channel structure on the random initialisation, then train it.

    The first ``gate_epochs`` epochs of the ``fit`` are the gate phase; the pruned network trains for the rest:

    1. **Gate phase** (``lightning_prune.gate_search.GateSearch``, which holds the objective
       ``task loss + γ(‖Λ‖₁/C − r)² + l1‖Λ‖₁``). At ``setup``, before the strategy wraps the module, one gate
       per prunable channel of the ``gate_sites`` groups (coupled channels share one) is inserted at
       ``gate_position`` and every weight is frozen at its random initialisation; the gates are one parameter
       registered on the LightningModule (``pruning_gates``: DDP reduces its gradient, checkpoints hold it).
       At ``on_fit_start`` an Adam over the gates (``gate_lr``) replaces the optimizers of
       ``configure_optimizers`` (their LR schedulers are set aside). Each gate step is an ordinary Lightning
       training step of the module's own ``training_step`` (automatic, or manual optimization stepping
       ``self.optimizers()``): gradient accumulation, clipping, precision and every other callback apply. The
       penalty's gradient is added to the gates' once the step's gradients are complete (Torch-Pruning's
       ``regularize()``), and the gates are clamped to [0, 1] after each optimizer step (``hook_optimizer``).
    2. **Selection** (``select="best_val"``): after each of Lightning's validations during the gate epochs
       (``val_check_interval``, ``check_val_every_n_epoch``), ``trainer.callback_metrics[monitor]`` (averaged
       over processes) feeds the snapshot rule; ``monitor`` names the logged key (default: the first key the
       first validation logged ending in ``loss``) and ``mode`` whether lower or higher is better. The best
       snapshot whose fraction of non-zero gates is ``<= gate_ratio`` is kept, else the last gates; without
       validation, the last gates.
    3. **Threshold** (at the end of the last gate epoch, after its validation): one global threshold over all
       gates for the largest structure whose fvcore FLOPs (multiply-adds per sample) are at most
       ``flops_ratio`` × the dense (unexpanded) model's.
    4. **Prune and re-initialise**: the gates are taken out and the structure is built physically; with
       ``init="random"`` the whole network is freshly initialised (PyTorch's default initialisation of every
       module with ``reset_parameters``, pruned or not; drawn from a seed kept in the callback's state, so a
       resumed run draws the same weights), as the authors' ``train_pruned.py`` builds the pruned configuration
       anew; the optimizers and schedulers of ``configure_optimizers`` are created afresh on the new parameters
       (epoch-interval schedulers first step after the pruned network's first epoch; a ``ReduceLROnPlateau`` also
       sees the last gate epoch's validation); the Trainer trains the pruned network for the remaining
       ``max_epochs - gate_epochs`` epochs (``budget_training``: ``gate_epochs + round((max_epochs - gate_epochs) /
       flops_ratio)`` epochs in all) on its training data, the data the gates
       learned on. The authors learn the gates on 45k of CIFAR-10's training images (the other 5k select the
       snapshot) and train the pruned network on all 50k; in one ``fit`` both phases read the Trainer's
       training and validation data, so the DataModule's split holds for both.

    Logged through Lightning during the gate epochs (``log_every_n_steps``, no host synchronisation per step):
    ``gate/loss``, ``gate/task_loss``, ``gate/mean``, ``gate/nonzero_fraction``; ``gate/<monitor>`` after each
    validation; then ``prune/flops_ratio``, ``prune/flops_macs`` (per sample), ``prune/params_ratio``,
    ``prune/threshold``, the channel-ratio vector and a gate histogram. A checkpoint written at any step of
    the gate phase resumes it to the uninterrupted result; one written afterwards holds the structure:
    ``fit(ckpt_path=...)`` takes the gates inserted at ``setup`` out and reshapes the model before its weights
    load. Anything that fails or is interrupted during the gate phase (an error, Ctrl-C, a non-finite gate
    loss, training stopped early) leaves the model as it was, at its own width and weights. One instance per
    Trainer; reusing an instance for a ``fit`` of another model starts afresh.

    Channel expansion: with ``expansion != 1`` the gates are learned on the network widened by that
    factor while the FLOPs target stays relative to the unwidened model; the LightningModule must
    define ``width`` and ``set_width(width: float)`` (as ``ImageClassifier`` does).

    Example::

        import pytorch_lightning as pl
        from lightning_prune import DigitsDataModule, GatePruningFromScratch, ImageClassifier

        pruning = GatePruningFromScratch(flops_ratio=0.5, gate_epochs=1)
        trainer = pl.Trainer(max_epochs=3, callbacks=[pruning], logger=False, enable_checkpointing=False)
        trainer.fit(ImageClassifier("vgg_small"), DigitsDataModule())  # 1 gate epoch, 2 of the pruned net (<= half the FLOPs)

    Args:
        flops_ratio: FLOPs of the pruned model / FLOPs of the dense (unexpanded) model, in (0, 1].
        gate_ratio: ``r``, the target mean gate ‖Λ‖₁/C, in (0, 1) (paper: 0.2 on CIFAR, 0.5 on ImageNet).
        gamma: ``γ``, weight of the ratio term (paper: 0.5 on CIFAR, 0.05 on ImageNet).
        l1: weight of an extra plain L1 term ``‖Λ‖₁`` (0: off).
        gate_epochs: the first epochs of the fit, spent learning the gates (paper: 10 on CIFAR; 1 under
            ``fast_dev_run``); they count in ``max_epochs`` and must leave at least one epoch of the Trainer's limit
            (``max_epochs``, or those ``max_steps`` allows) to train the pruned network, else ``fit`` is refused at the start.
        gate_lr: Adam learning rate of the gates.
        gate_sites: ``"inner"`` (the authors' placement, the paper setting: only channels that go from one
            layer through a nonlinearity into one layer, i.e. a residual block's inner channels and every
            conv-BN-ReLU of a plain net; the stem and the residual stream stay unpruned, see
            ``gates.inner_groups``) or ``"all"`` (every coupled group). Default ``"all"``: it works on any
            model whose groups are found (also one without inner groups) and lets the target cut the stream.
        round_to: keep each group's channel count a multiple of this (e.g. 8 or 16 for tensor cores; as
            Torch-Pruning's ``round_to``), or the whole group where it is smaller; the threshold search
            counts the rounded structure, so the FLOPs target still holds. ``None``: any count.
        gate_position: ``"bn"`` (after BatchNorm, before the activation: the authors'; on a model where no
            gated group has a BatchNorm, such as a transformer, the layer outputs, with a warning), ``"conv"``
            (on the Conv/Linear output) or ``"bn_weight"`` (the BatchNorm scale is the gate).
        select: ``"best_val"`` (the authors' snapshot rule on ``monitor``) or ``"last"``.
        monitor: the key ``validation_step`` logs that selects the snapshot (default: the first key
            ending in ``loss``).
        mode: ``"min"`` (lower ``monitor`` is better) or ``"max"``.
        init: ``"random"`` (the whole pruned network freshly initialised, the authors') or
            ``"inherit"`` (the surviving random weights stay).
        budget_training: "Scratch-B": train the pruned network for ``round((max_epochs - gate_epochs) / flops_ratio)``
            epochs after the gate epochs.
        expansion: channel expansion factor (>= 1) of the network the gates are learned on.
        example_input_fn: ``example_input_fn(batch)`` -> the model's input, when neither
            ``example_input_array`` nor the batch's first tensor (or the whole batch) is it.
        verbose: print the table of kept channels.

    Raises:
        ValueError: in ``__init__``, an argument out of its range; at ``setup`` or train start, before any
            weight changes: ``expansion != 1`` for a module without ``width``/``set_width``, no channel to
            gate at ``gate_position``, or an unreachable ``flops_ratio``.
        MisconfigurationException: ``gate_epochs`` beyond the Trainer's ``max_epochs`` (or the epochs ``max_steps``
            allows), a second instance in the Trainer, a sharded strategy, a ``torch.compile``d module, a
            spawn-based strategy without ``reshape_on_load``, no example input, manual optimization with several
            optimizers, a ``monitor`` the validation does not log, ``budget_training`` with
            ``StochasticWeightAveraging`` or an average that starts inside the gate epochs, or a resume from a
            checkpoint that holds neither gates nor a structure.
        NonFiniteGateLoss: the gate loss became NaN or infinite; the model is left as it was.
    """

    physical = True
    duplicate_hint = ("one gate phase chooses one structure, so give it one (the second would search a model the first "
                      "already pruned).")

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
        monitor: Optional[str] = None,
        mode: Mode = "min",
        init: Init = "random",
        budget_training: bool = False,
        expansion: float = 1.0,
        example_input_fn: Optional[ExampleInputFn] = None,
        verbose: bool = True,
    ) -> None:
        check_arguments(locals())
        check_function("example_input_fn", example_input_fn, 1, "example_input_fn(batch) -> model input")
        super().__init__(locals())
        self._reset()

    def _reset(self) -> None:
        """A fresh state: nothing chosen yet (also when the instance is reused on another model)."""
        self._model: Optional[weakref.ref] = None  # the module this instance pruned
        self._phase: Optional[GatePhase] = None  # the running gate phase
        self._load_hook: Optional[Any] = None
        self._validated_keys: set[str] = set()
        self._started: Optional[float] = None
        self.figures = Figures("GatePruningFromScratch")
        self.structure = None  # this and the rest survive checkpoints
        self.plan: ChannelPlan = {}
        self.gates: dict[int, torch.Tensor] = {}
        self.snapshot: dict[str, Any] = {}
        self.threshold: Optional[float] = None
        self.reached_flops_ratio: Optional[float] = None
        self.budget_epochs: Optional[int] = None
        self.gate_seconds: Optional[float] = None
        self.seed: Optional[int] = None  # of init="random" at the pruning (Lightning does not checkpoint the global RNG)
        self.monitor_key: Optional[str] = None  # the key the snapshot rule reads (`monitor`, or found at the first validation)

    @property
    def pruned(self) -> bool:
        """Whether the structure is chosen (by this fit, or by the checkpoint it resumed)."""
        return self.structure is not None

    def _gate_epochs(self, trainer: pl.Trainer) -> int:
        return 1 if trainer.fast_dev_run else self.gate_epochs

    def _setup_fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Unless this instance already pruned this module: the gate phase's model, widened, frozen and gated before
        the strategy wraps it."""
        if self.pruned and (self._model is None or self._model() is not pl_module):
            self._reset()  # reused for another model: search afresh (a checkpoint's structure still restores)
        if self.pruned:
            return
        check_fit(trainer, pl_module, self.budget_training, self.expansion, self._gate_epochs(trainer))
        check_gate_phase_fits(self.gate_epochs, epoch_limit(trainer))
        self.figures.measure(trainer, pl_module, self.example_input_fn, required=True)
        options = dict(lr=self.gate_lr, gamma=self.gamma, gate_ratio=self.gate_ratio, l1=self.l1, mode=self.mode)
        self._phase = GatePhase(trainer, pl_module, self.figures, expansion=self.expansion, flops_ratio=self.flops_ratio,
                                position=self.gate_position, sites=self.gate_sites, round_to=self.round_to, search_options=options)
        self.seed = int(trainer.strategy.broadcast(int(torch.randint(2**62, ())), src=0))
        self.monitor_key = self.monitor
        if self.budget_training:  # the gate epochs, then the pruned network's epochs scaled by 1 / flops_ratio
            gate_epochs = self._gate_epochs(trainer)
            self.budget_epochs = gate_epochs + max(1, round((trainer.max_epochs - gate_epochs) / self.flops_ratio))
            trainer.fit_loop.max_epochs = self.budget_epochs
        self._model = weakref.ref(pl_module)
        if self._load_hook is None:
            self._load_hook = pl_module.register_load_state_dict_pre_hook(self._before_model_load)

    def _before_model_load(self, module: torch.nn.Module, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
        """Load-state-dict pre-hook of the LightningModule: a state dict without gates (a checkpoint written after
        the pruning, ``fit(ckpt_path=...)``) takes the gates inserted at ``setup`` out first, then reshapes the
        module to its shapes; one with gates (written during the gate phase) loads into the gated module."""
        if self._phase is None or module is not (self._model and self._model()) or f"{prefix}{GATE_PARAMETER}" in state_dict:
            return
        phase, self._phase = self._phase, None
        phase.abort()
        reshape_to_state_dict(module, state_dict, prefix)

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Resuming (``fit(ckpt_path=...)``): a checkpoint that holds a structure means it was chosen: no gate phase;
        one written during the gate phase continues it (the module loaded its gates)."""
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
        if not self.pruned and self._phase is None and self._model is not None:
            raise MisconfigurationException(
                "GatePruningFromScratch: the checkpoint to resume holds neither gates nor a pruned structure (it was not "
                "written by a fit with this callback), so the gate phase cannot continue from it. Load its weights into "
                "the module and start a new `fit` without `ckpt_path`."
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.pruned and self.budget_epochs is not None:  # resumed with budget training: its epoch count
            trainer.fit_loop.max_epochs = self.budget_epochs
        if self._phase is not None:
            self._phase.start(trainer)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._phase is not None:
            check_gate_phase_fits(self.gate_epochs, epoch_limit(trainer))  # max_steps: the epoch length is known now
            self._started = time.perf_counter()

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        """The penalty's gradient added to the gates' (after AMP's unscale, before Lightning clips the gradients)."""
        if self._phase is not None:
            self._phase.search.before_step()

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        """The non-finite flag of each batch's loss (on the device); the gate metrics as 0-dim device tensors
        (``self.log``, no host synchronisation) only on the steps Lightning writes to its loggers."""
        if self._phase is None:
            return
        search = self._phase.search
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        task = None
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            task = loss.detach().reshape(()).float() * (trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1)
        search.flag_nonfinite(task if task is not None else search.gates.parameter.detach())  # no loss (manual): the gates
        if not trainer._logger_connector.should_update_logs:  # Lightning keeps only the last step value between log steps
            return
        gates = search.gates.parameter.detach()
        metrics = {"gate/mean": gates.abs().mean(), "gate/nonzero_fraction": search.gates.nonzero_fraction()}
        if task is not None:
            metrics.update({"gate/loss": task + search.penalty(gates), "gate/task_loss": task})
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._validated_keys = set(trainer.callback_metrics)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Lightning's validation of the current gates feeds the snapshot rule (``monitor``/``mode``)."""
        if self._phase is None or trainer.sanity_checking or self.select != "best_val":
            return
        metrics = trainer.callback_metrics
        logged = [key for key in metrics if key not in self._validated_keys and not key.startswith("gate/")]
        if self.monitor_key is None:  # the first validation: the first key it logged ending in "loss"
            self.monitor_key = next((key for key in logged if key.lower().endswith("loss")), _NO_KEY)
            if self.monitor_key == _NO_KEY:
                rank_zero_warn(
                    f"GatePruningFromScratch: the validation logged no key ending in 'loss' ({sorted(logged)}), so the last "
                    "gates are kept; pass `monitor=` one of the logged keys (and `mode=`) to select a snapshot."
                )
        if self.monitor_key == _NO_KEY:
            return
        if self.monitor_key not in metrics:
            raise MisconfigurationException(
                f"`monitor`={self.monitor!r} was not logged by the LightningModule's validation during the gate phase; it "
                f"logged {sorted(logged)}. Pass `monitor=` one of those (and `mode='min'` or 'max'), or `select='last'`."
            )
        value = trainer.strategy.reduce(torch.as_tensor(metrics[self.monitor_key], dtype=torch.float, device=pl_module.device), reduce_op="mean")
        value = float(value)  # one host read per validation
        self._phase.search.validated(value)
        log_metrics(trainer, {f"gate/{self.monitor_key}": value})

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Each gate epoch's end: the finiteness check (one host read). The last one's: threshold, removal and
        re-initialisation; then the user's optimizers and schedulers, fresh, on the pruned network."""
        if self._phase is None:
            return
        self._phase.search.check_finite()
        if trainer.current_epoch + 1 < self._gate_epochs(trainer):
            return
        phase, self._phase = self._phase, None
        if self.select == "best_val" and phase.search.last_metric is None and self.monitor_key != _NO_KEY:
            rank_zero_warn("GatePruningFromScratch: no validation ran during the gate epochs, so the last gates are kept.")
        result, pruned = phase.prune(trainer, self.init, self.seed)
        self.gate_seconds = None if self._started is None else time.perf_counter() - self._started
        self.structure, self.plan, self.gates = structure_record(pl_module), pruned.plan, pruned.gates
        self.figures.groups = phase.core.groups  # the plan's group indices are positions in it
        self.threshold, self.reached_flops_ratio = pruned.threshold, pruned.flops_ratio
        self.snapshot = dict(monitor=self.monitor, selected=result.selected, step=result.step, steps=result.steps, metric=result.metric)
        for callback in averaging_callbacks(trainer):
            callback.setup(trainer, pl_module, "fit")  # its average model: a copy of the pruned network
        rebuild_training_state(trainer, fresh=True)  # Lightning stepped this epoch's epoch-interval schedulers already
        self._report(trainer, pl_module, result, pruned)

    def _report(self, trainer: pl.Trainer, pl_module: pl.LightningModule, result: GatePhaseResult, pruned: GatePruned) -> None:
        """The chosen structure to the loggers (``prune/*``, the channel-ratio vector, a gate histogram) and, with
        ``verbose``, the table of kept channels."""
        groups, dense = self.figures.groups, self.figures.dense_flops.total
        flops = round(pruned.flops_ratio * dense)  # the predictor's exact count (ratio = count / dense)
        extra = {"dense_flops_macs": float(dense), "threshold": pruned.threshold, "gate_snapshot_step": float(result.step),
                 "params_ratio": sum(p.numel() for p in pl_module.parameters()) / self.figures.dense_parameters}
        if self.gate_seconds is not None:
            extra["gate_phase_seconds"] = self.gate_seconds
        if self.budget_epochs is not None:
            extra["max_epochs"] = float(self.budget_epochs)
        self.figures.log(trainer, pl_module, flops=flops, channel_ratios=layer_channel_ratios(groups, pruned.plan),
                         histograms={"gates": torch.cat(list(result.gates.values()))}, extra=extra)
        if self.verbose:
            snapshot = f"gate snapshot: {result.selected} at gate step {result.step}/{result.steps}"
            facts = [snapshot + (f" (monitored {result.metric:.4f})" if result.metric is not None else "")]
            if self.budget_epochs is not None:
                facts.append(f"budget training: max_epochs -> {self.budget_epochs}")
            self.figures.summary(trainer, pl_module, None, flops, removed=True, facts=facts,
                                 channels=channel_rows(groups, pruned.plan), kept="remaining")

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """An error or Ctrl-C during the gate phase leaves the model as it was."""
        if self._phase is not None:
            phase, self._phase = self._phase, None
            phase.abort()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._phase is not None:  # the fit ended inside the gate phase (early stopping, a time limit)
            phase, self._phase = self._phase, None
            phase.abort()
            rank_zero_warn(
                f"GatePruningFromScratch: training stopped during the gate phase (epoch {trainer.current_epoch} of "
                f"`gate_epochs`={self.gate_epochs}); the gates were removed and the model left as it was. A checkpoint "
                "written during the gate phase resumes it."
            )
        if self._load_hook is not None and stage == "fit":
            self._load_hook.remove()
            self._load_hook = None

    def _core_state(self) -> dict[str, Any]:
        plan, gates = {i: keep.tolist() for i, keep in self.plan.items()}, {i: gate.clone() for i, gate in self.gates.items()}
        phase = None if self._phase is None else self._phase.state_dict()
        return {**{name: getattr(self, name) for name in _STATE}, "plan": plan, "gates": gates, "phase": phase}

    def _load_core_state(self, state: Mapping[str, Any]) -> None:
        for name in _STATE:
            setattr(self, name, state.get(name))
        self.plan = {int(index): torch.tensor(keep, dtype=torch.long) for index, keep in state["plan"].items()}
        self.gates = {int(index): gate for index, gate in state["gates"].items()}
        if self._phase is not None and state.get("phase") is not None:
            self._phase.load_state_dict(state["phase"])

    def _changed_consequence(self) -> Optional[str]:
        if not self.pruned:
            return None
        return ("the gate phase is not run again, so the current values do not apply (the checkpoint's structure and "
                "training budget do). Start a new run to use them")
