"""``IterativeMagnitude``: magnitude pruning on a schedule (Han et al. 2015; Distiller; Zhu & Gupta's AGP).

Hook wiring only: the decisions are :class:`~lightning_prune.magnitude.MagnitudePruner`'s, the timing is
:class:`~lightning_prune.schedules.PruningSchedule`'s.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping, Optional, Union

import pytorch_lightning as pl
from jsonargparse.typing import NonNegativeInt, PositiveInt
from pytorch_lightning.utilities import rank_zero_warn
from typing_extensions import override

from lightning_prune.callbacks import _magnitude_schedule as timing
from lightning_prune.callbacks._checks import Fraction, class_names
from lightning_prune.callbacks._figures import Figures
from lightning_prune.callbacks._magnitude_schedule import LayerCap, PerLayer, Sensitivity
from lightning_prune.callbacks._module_io import ExampleInputFn
from lightning_prune.callbacks.base import PruningCallback
from lightning_prune.criteria import ChannelNorm, Criterion, Granularity, Scope
from lightning_prune.magnitude import Broadcast, ChannelMagnitude, MagnitudePruner, distributed_broadcast
from lightning_prune.masks import MaskSet
from lightning_prune.pruner import hook_optimizer
from lightning_prune.report import sparsity_report
from lightning_prune.schedules import Interval, PruningSchedule, ScheduleKind
from lightning_prune.targets import select_modules
from lightning_prune.training_state import rebuild_training_state


class IterativeMagnitude(PruningCallback):
    r"""Prune Conv/Linear weights by magnitude on a one-shot, iterative or AGP schedule.

    At each pruning event the weights with the lowest importance are masked so that the pruned
    fraction equals ``fraction(t) · sparsity`` *exactly* (absolute targets, never compounded; see
    ``lightning_prune.magnitude``). Masked weights are written as zeros, their gradients are zeroed
    before every optimizer step and the zeros are re-written after it.

    Example::

        import pytorch_lightning as pl
        from lightning_prune import DigitsDataModule, ImageClassifier, IterativeMagnitude

        pruning = IterativeMagnitude(sparsity=0.9, schedule="agp", start_epoch=1, end_epoch=3, frequency=1)
        trainer = pl.Trainer(max_epochs=5, callbacks=[pruning], logger=False, enable_checkpointing=False)
        trainer.fit(ImageClassifier("lenet300100"), DigitsDataModule())  # 90% of the weights are now zero

    Args:
        sparsity: final fraction of exactly-zero weights among the pruned weights, in [0, 1); with
            ``scope="layer"`` also a mapping ``{module name: sparsity}`` (unnamed layers: 0).
        schedule: ``"one_shot"``, ``"iterative"`` (equal steps) or ``"agp"`` (Zhu & Gupta's cubic schedule).
        start_epoch: first pruning event (at the start of that epoch, or before that optimizer step). Every event
            must come before the Trainer's end (``max_epochs``, ``max_steps``), else ``fit`` is refused at the start.
        end_epoch: last event; ``None`` = halfway between ``start_epoch`` and the Trainer's end
            (``max_epochs``, or with ``interval="step"`` ``max_steps`` or all steps of ``max_epochs``). Must come before that end.
        frequency: epochs (steps) between events; ``end_epoch - start_epoch`` must be a multiple. With
            ``end_epoch=None`` a ``frequency`` > 1 must leave room for a second event before halfway to the end.
        interval: ``"epoch"`` or ``"step"``: the unit of ``start_epoch``/``end_epoch``/``frequency``
            (optimizer steps, ``trainer.global_step``; Zhu & Gupta prune every Δt steps).
        initial_sparsity: AGP's s_i in [0, sparsity]: with s_i > 0 the event at ``start_epoch`` (t0) prunes to s_i and
            every later one to s_f + (s_i - s_f)(1 - (t - t0)/(nΔt))^3, per layer toward its own s_f.
        scope: ``"global"`` (one threshold) or ``"layer"`` (each layer to the same sparsity).
        criterion: ``"magnitude"`` (|w|) or ``"sensitivity"`` (drop |w| < s·σ of the dense layer).
        sensitivity: ``s`` of the sensitivity criterion: one number or ``{module name: s}``.
        granularity: ``"element"`` or ``"channel"`` (whole channels of coupled groups by ``channel_norm``).
        channel_norm: ``"l1"`` or ``"l2"``.
        parameters: glob patterns of module names to prune (default: every Conv/Linear).
        exclude: glob patterns of module names never to prune.
        max_layer_sparsity: per-layer floor: no layer (channel group) holds more zeros than this
            fraction, and below 1 each keeps at least one weight (channel). 1.0 lifts it; a layer
            emptied then is warned about.
        rewind: ``None``, ``"init"`` (lottery ticket) or an epoch ``k <= start_epoch``.
        make_permanent: at the end of fit drop the masks (the zeros stay).
        physical: with ``granularity="channel"``, remove the zeroed channels at the end of fit.
        hidden: also prune the hidden (residual-stream) width of a transformer or ConvNeXt (one group through its
            embeddings, norms and block projections), ranked with the heads and channels; needs ``physical=True``.
            While masked, each norm normalises over the kept channels only (forward hooks), as the pruned model does.
        monitor: metric compared dense vs pruned in the final summary.
        example_input_fn: ``example_input_fn(batch)`` -> the model's input, when neither
            ``example_input_array`` nor the batch's first tensor / the whole batch is (FLOPs, channels).
        name: tells two instances in one Trainer apart (their checkpoint state key); two instances need two
            distinct names.
        verbose: print the summary table at the end of fit.

    Raises:
        ValueError: in ``__init__``, an argument out of its range or inconsistent with another (the message
            names both and what is allowed); at ``setup``, a ``sparsity`` the per-layer floor
            ``max_layer_sparsity`` cannot hold. Raised before any weight changes.
        MisconfigurationException: at the start of ``fit``, a schedule that cannot complete inside the Trainer's
            ``max_epochs``/``max_steps`` (naming the argument and the limit); at ``setup``, a second instance with the
            same ``name`` added after the Trainer was built, a sharded strategy (FSDP, DeepSpeed), a ``torch.compile``d
            module, ``physical=True`` under a spawn-based strategy without ``reshape_on_load``, or channel
            pruning without an example input; on resume, state saved under several other keys (pass the
            ``name`` it was saved with).
    """

    duplicate_hint = "give each a distinct `name=` (e.g. `IterativeMagnitude(..., name=\"encoder\")`), which keeps their checkpoint states apart."

    def __init__(
        self,
        sparsity: PerLayer = 0.5,
        schedule: ScheduleKind = "agp",
        start_epoch: NonNegativeInt = 0,
        end_epoch: Optional[NonNegativeInt] = None,
        frequency: PositiveInt = 1,
        interval: Interval = "epoch",
        initial_sparsity: Fraction = 0.0,
        scope: Scope = "global",
        criterion: Criterion = "magnitude",
        sensitivity: Optional[Sensitivity] = None,
        granularity: Granularity = "element",
        channel_norm: ChannelNorm = "l1",
        parameters: Optional[list[str]] = None,
        exclude: Optional[list[str]] = None,
        max_layer_sparsity: LayerCap = 0.99,
        rewind: Union[Literal["init"], int, None] = None,
        make_permanent: bool = True,
        physical: bool = False,
        hidden: bool = False,
        monitor: Optional[str] = "val/acc",
        example_input_fn: Optional[ExampleInputFn] = None,
        name: Optional[str] = None,
        verbose: bool = True,
    ) -> None:
        timing.check_arguments(locals())
        super().__init__(locals())
        self.schedule: Optional[PruningSchedule] = None
        self.pruner: Optional[MagnitudePruner] = None
        self.layers: list[str] = []
        self.figures = Figures("IterativeMagnitude", monitor=monitor)
        self.last_event = -1  # the last event run (in the schedule's unit)
        self._hooks: list[Any] = []
        self._broadcast: Optional[Broadcast] = None

    @property
    def masks(self) -> Optional[MaskSet]:
        """The masks being enforced (``None`` before the first event and once made permanent)."""
        return self.pruner.masks if self.pruner is not None and self.pruner.masks else None

    def _setup_fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.layers = list(select_modules(pl_module, self.parameters, self.exclude))
        timing.check_layer_keys(self.arguments, self.layers)
        self.schedule = timing.resolve_schedule(self.arguments, trainer)
        self.figures = Figures("IterativeMagnitude", self.layers, self.monitor, self.figures.dense_score)
        if self.pruner is None or self.pruner.model is not pl_module:
            self.pruner = MagnitudePruner(pl_module, self.layers, self.sparsity, self.scope, self.criterion, self.sensitivity, self.max_layer_sparsity)
            self.last_event = -1

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.rewind == "init" and self.pruner.rewind_state is None:
            self.pruner.remember()

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The schedule checked against ``max_steps`` too (the epoch length is known now, before any step); the
        example input (the first training batch is loaded now): dense FLOPs, channel groups; how decisions reach
        every rank (the process group exists by now); the masks' hooks on every optimizer (``hook_optimizer``)."""
        timing.check_schedule_fits(self.arguments, timing.schedule_limit(self.arguments, trainer), self.schedule.last_event)
        self._broadcast = distributed_broadcast()
        channel = self.granularity == "channel"
        self.figures.measure(trainer, pl_module, self.example_input_fn, required=channel)
        if channel:
            if self.pruner.channels is None:  # unless it has them from an earlier fit
                self.pruner.channels = ChannelMagnitude.for_model(pl_module, self.figures.example, self.layers, self.channel_norm, self.max_layer_sparsity, self.hidden)
            self.figures.predict_with(pl_module, self.pruner.channels.groups)
            self.pruner.hook_norms()  # a resumed hidden plan's norms, before the first step
        if any("EarlyStopping" in class_names(callback) for callback in trainer.callbacks):  # the Trainer's limits are refused
            rank_zero_warn(f"IterativeMagnitude: EarlyStopping may end training before the last pruning event ({self.interval} {self.schedule.last_event}); the summary says if it did.")
        self._unhook()
        self._hooks = [hook_optimizer(optimizer, self.pruner, before_step=False) for optimizer in trainer.optimizers]

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        """No gradient at a masked weight, before Lightning clips the gradients (the zeros are re-written after the
        step by the optimizer hook)."""
        if self._hooks:
            self.pruner.before_step()

    def _unhook(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._unhook()  # the user's optimizers are left without the masks' hooks
        self.teardown(trainer, pl_module, "fit")

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.pruner is not None:
            self.pruner.unhook_norms()  # the user's norms normalise over all their channels again

    def _event(self, trainer: pl.Trainer, pl_module: pl.LightningModule, time: int) -> None:
        if self.rewind == time and self.pruner.rewind_state is None:  # lottery ticket at epoch (step) k
            self.pruner.remember()
        target = self.schedule.target(time, self.pruner.final)
        if target is None or time <= self.last_event:  # a resumed run does not repeat an event
            return
        if self.last_event < 0 and self.monitor in trainer.callback_metrics:  # the dense model's score, before the first event
            self.figures.dense_score = float(trainer.callback_metrics[self.monitor])
        self.pruner.update(target, self._broadcast)
        self.last_event = time
        self.pruner.masks.apply_to_optimizer_state(trainer.optimizers)
        for layer in self.pruner.emptied_layers():
            rank_zero_warn(f"IterativeMagnitude: every weight of {layer!r} is pruned (`max_layer_sparsity`={self.max_layer_sparsity}); the layer outputs only its bias.")
        self.figures.log(trainer, pl_module, self.pruner.plan, channel_ratios=self.pruner.channel_ratios(),
                         extra={"target_sparsity": self.pruner.target_sparsity(target)})

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.interval == "epoch":
            self._event(trainer, pl_module, trainer.current_epoch)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.interval == "step":
            self._event(trainer, pl_module, trainer.global_step)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._unhook()
        if self.pruner is None:
            return
        report = sparsity_report(pl_module, self.layers)
        notes = []
        if self.last_event < self.schedule.last_event:
            notes.append(f"schedule incomplete: training ended before the last pruning event ({self.interval} {self.schedule.last_event}); sparsity {report.sparsity:.4f} instead of the final target")
            rank_zero_warn(f"IterativeMagnitude: {notes[-1]}.")
        if not self.masks:
            return
        flops = self.figures.flops(self.pruner.plan)
        if self.make_permanent:
            self.structure = self.pruner.finalize(self.figures.example if self.physical else None) or self.structure
            if self.physical:
                rebuild_training_state(trainer)  # optimizer state of the new shapes in later checkpoints
            self.pruner = None
        if self.verbose:
            self.figures.summary(trainer, pl_module, report, flops, notes=notes, removed=self.physical)

    def _core_state(self) -> dict[str, Any]:
        state = self.pruner.state_dict() if self.pruner is not None else {}
        return {**state, "last_event": self.last_event, "dense_score": self.figures.dense_score}

    def _load_core_state(self, state: Mapping[str, Any]) -> None:
        self.figures.dense_score = state["dense_score"]
        self.last_event = int(state.get("last_event", state.get("last_event_epoch", -1)))  # the events that ran stay done
        if self.pruner is not None and "masks" in state:
            self.pruner.load_state_dict(state)

    def _changed_consequence(self) -> str:
        return "the saved masks are kept and the new settings apply from the next pruning event"
