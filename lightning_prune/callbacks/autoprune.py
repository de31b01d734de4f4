"""``AutoPruneCallback``: AutoPrune-style pruning by auxiliary parameters (experimental; after Xiao, Wang,
Rajasekaran, NeurIPS 2019)."""

from __future__ import annotations

from functools import partial
from typing import Any, Iterable, Mapping, Optional

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_warn
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lightning_prune.auxiliary import AuxiliaryParameters, AuxOptimizer, PullController, Ste
from lightning_prune.callbacks._autoprune_args import check_arguments, check_window_fits, resolve_init
from lightning_prune.callbacks._checks import epoch_limit
from lightning_prune.callbacks._figures import Figures
from lightning_prune.callbacks._held_out import HeldOutBatches
from lightning_prune.callbacks._module_io import ExampleInputFn, LossFn, check_loss_source, module_loss
from lightning_prune.callbacks.base import PruningCallback
from lightning_prune.criteria import Granularity
from lightning_prune.masks import MaskSet
from lightning_prune.pruner import hook_optimizer
from lightning_prune.report import SparsityReport
from lightning_prune.schedules import LearningWindow
from lightning_prune.structure import StructureRecord, apply_plan, find_channel_groups, structure_record
from lightning_prune.targets import select_modules
from lightning_prune.training_state import rebuild_training_state


class AutoPruneCallback(PruningCallback):
    r"""AutoPrune-style pruning (experimental): learn which weights to use through auxiliary parameters ``M``.

    A documented reconstruction of AutoPrune (Xiao, Wang, Rajasekaran, NeurIPS 2019), not the paper's
    exact method: its R(M) and its consistency rules are not public in reach (``PAPERS.md``).

    - From the paper: T = W ⊙ h(M), h(m) = 1[m > 0], so switched-off weights keep their values; the
      straight-through estimators of h (linear, leaky ReLU, softplus); bi-level updates, ``W`` on the
      training batches and ``M`` on a held-out split; µ = 5e-2 and the auxiliary learning rate 1.5e-2
      (``paper_defaults=True``, for comparison).
    - Our reconstruction and calibration: the loss signal's normalisation by its mean over the network
      (µ then is relative to it), R(M) = Σ h(M), the three consistency rules as implemented in
      ``lightning_prune.auxiliary.auxiliary_gradient`` (correlation: the signal per unit of ‖w‖;
      sensitivity: the pull weighted by 1/(1 + ‖w‖/mean‖w‖); direction: the pull through the STE), and
      the defaults (``reg=1.25``, ``ste_slope=0.5``, ``init=1.0``, calibrated on the digits data).

    The algorithm is ``lightning_prune.auxiliary.AuxiliaryParameters``; this callback wires it into
    the Trainer. The model's optimizers train ``W`` on the training batches (around every optimizer
    step, manual optimization included, switched-off weights keep their values), and after each
    training batch with an optimizer step, ``M`` takes one step from one held-out batch. Its loss is the
    module's own ``training_step`` on that batch (its returned loss or ``loss`` of a returned dict,
    logging silenced; metrics the step updates see the held-out batch — pass ``loss_fn`` where that
    matters), or ``loss_fn(pl_module, batch)``. Held-out batches come from ``aux_dataloader``, else
    ``aux_dataloader()`` of the module or the DataModule (``DigitsDataModule(aux_fraction=0.5)`` is the
    paper's 1:1 split), else — with a warning — the training batch itself. Under DDP the held-out
    loader is sharded per rank and the gradient of ``M`` is averaged over ranks, so every rank holds the
    same ``M``: one all-reduce per auxiliary step, of one value per entry of ``M`` (per channel with
    ``granularity="channel"``; per weight with ``"element"``, as DDP's own reduce of the weights' gradients),
    and none in the fine-tune phase.

    ``M`` is created in ``setup``, before the strategy wraps the model (DDP), from an example input:
    ``example_input_array``/``datamodule.example_input()``, else the first training batch
    (``example_input_fn(batch)`` picks the input; it then comes first). Channel groups and FLOPs
    (multiply-adds per sample) are taken on it. When the learning window closes (the first batch after
    ``end_epoch``), ``M`` is fixed: the switched-off weights are zeroed, the gating ``W ⊙ h(M)`` leaves the
    model and a :class:`lightning_prune.masks.MaskSet` keeps the zeros (two fused multiplies per step, as
    ``IterativeMagnitude``'s masks: a fine-tune step costs what a dense one does plus those two); checkpoints
    from then on hold the masks. At the end of fit the masks are made permanent; ``M`` leaves the model;
    with ``granularity="channel"`` and ``physical=True`` switched-off channels are removed.

    Example::

        import pytorch_lightning as pl
        from lightning_prune import AutoPruneCallback, DigitsDataModule, ImageClassifier

        pruning = AutoPruneCallback()  # M learns in the first 75% of the epochs, W fine-tunes after
        trainer = pl.Trainer(max_epochs=4, callbacks=[pruning], logger=False, enable_checkpointing=False)
        trainer.fit(ImageClassifier("lenet300100"), DigitsDataModule(aux_fraction=0.5))  # 1:1 held-out split

    Args:
        aux_lr: learning rate of ``M``. ``None``: 1.5e-2, the paper's; with ``target_sparsity`` (and without
            ``paper_defaults``) 5e-3: the controller sets the pull, and a lower rate averages the loss signal over
            more held-out batches before a weight switches off (LeNet-300-100 at 50x on MNIST-5k: +0.7 points).
        reg: coefficient µ of the regulariser R(M) = Σ h(M), relative to the normalised loss signal.
            ``None``: the calibrated 1.25, or the paper's 5e-2 with ``paper_defaults``.
        paper_defaults: use the paper's numbers for comparison: µ = 5e-2, auxiliary learning rate 1.5e-2 and
            no loss-signal normalisation. They replace only what is left at ``None``: an explicit
            ``aux_lr`` or ``reg`` other than the paper's is a ``ValueError`` naming both arguments.
        ste: straight-through estimator of h: ``"leaky_relu"``, ``"linear"`` or ``"softplus"``.
        ste_slope: slope of the leaky-ReLU STE for m ≤ 0 (how fast a switched-off weight can return).
        sensitivity: the pull weighted by 1/(1 + ‖w‖/mean‖w‖), so large weights are harder to switch off
            (our reading of the paper's sensitivity consistency).
        correlation: the loss signal divided by ‖w‖ (our reading of correlation consistency).
        direction: the pull taken through the same STE as the loss (our reading of direction consistency).
        granularity: ``"element"`` or ``"channel"`` (one ``m`` per channel of each coupled group, and one per
            attention head of a covered layout, ``lightning_prune.structure.HEAD_LAYOUTS``: it gates the head's q/k/v
            outputs, so a head switched off outputs 0, as removed; at least one channel of every group is kept,
            with a warning when that floor was needed).
        init: initial value of every ``m``. ``None``: the calibrated 1.0, or 1e-2 with ``paper_defaults`` (the paper's
            value is not known; from 1.0 its pull, ``aux_lr · µ`` = 7.5e-4 per step on the unnormalised signal, would
            need over a thousand steps to switch a weight off, so ``paper_defaults`` pruned nothing).
        aux_optimizer: ``"sgd"`` or ``"adam"`` for ``M``.
        start_epoch: first epoch with auxiliary steps (before the Trainer's last epoch).
        end_epoch: last epoch with auxiliary steps; later epochs fine-tune ``W`` under fixed masks (no gating), so at
            least one epoch must follow it inside ``max_epochs`` (and the epochs ``max_steps`` allows), else ``fit`` is
            refused at the start. ``None``: the first 75% of ``max_epochs`` (and of ``max_steps`` when set) learn ``M``.
        aux_dataloader: held-out data for ``M`` (any iterable of batches).
        loss_fn: ``loss_fn(pl_module, batch) -> loss`` of a held-out batch (default: ``training_step``).
        example_input_fn: ``example_input_fn(batch) -> model input`` for the first training batch.
        parameters: glob patterns of module names to prune (default: every Conv/Linear).
        exclude: glob patterns of module names never to prune.
        physical: with ``granularity="channel"``, remove the switched-off channels at the end of fit.
        verbose: print the sparsity table at the end of fit.
        target_sparsity: the fraction of ``M``'s entries (weights; channels with ``granularity="channel"``) to
            switch off by the end of the learning window, in (0, 1). ``reg`` (or its default) is then only
            µ's starting value: ``lightning_prune.auxiliary.PullController`` raises and lowers µ after
            every auxiliary step, on the device, along an AGP curve to the target (it lands within ±1%; the
            summary says where). Needs an end of the window (``end_epoch``, ``max_epochs`` or ``max_steps``).
            ``None``: µ stays as given, and a run that switched off under 5% by the end of its window is warned
            about.

    Raises:
        ValueError: in ``__init__``, an argument out of its range, ``physical=True`` without
            ``granularity="channel"``, or an ``aux_lr``/``reg`` that contradicts ``paper_defaults=True``; on
            resume, a checkpoint whose auxiliary parameters belong to another ``granularity`` or other layers.
        MisconfigurationException: at the start of ``fit``, a ``start_epoch``/``end_epoch`` that leaves no
            fine-tuning epoch inside the Trainer's limits, a ``target_sparsity`` without an end of the window, a
            second instance in the Trainer, a sharded strategy, a ``torch.compile``d module, a spawn-based strategy
            without ``reshape_on_load``, a held-out loader that yields no batch, manual optimization without
            ``loss_fn``; during fit, a ``training_step`` that returns no loss (pass ``loss_fn``) or a ``loss_fn``
            whose loss has no gradient.
        FloatingPointError: at an epoch's end, when the gradient of ``M`` was NaN or infinite on some step
            (``M`` skipped those steps).
    """

    duplicate_hint = "Only one AutoPruneCallback per Trainer: two would gate the same weights twice."

    def __init__(
        self,
        aux_lr: Optional[float] = None,
        reg: Optional[float] = None,
        paper_defaults: bool = False,
        ste: Ste = "leaky_relu",
        ste_slope: float = 0.5,
        sensitivity: bool = True,
        correlation: bool = True,
        direction: bool = True,
        granularity: Granularity = "element",
        init: Optional[float] = None,
        aux_optimizer: AuxOptimizer = "sgd",
        start_epoch: int = 0,
        end_epoch: Optional[int] = None,
        aux_dataloader: Optional[Iterable[Any]] = None,
        loss_fn: Optional[LossFn] = None,
        example_input_fn: Optional[ExampleInputFn] = None,
        parameters: Optional[list[str]] = None,
        exclude: Optional[list[str]] = None,
        physical: bool = False,
        verbose: bool = True,
        target_sparsity: Optional[float] = None,
    ) -> None:
        super().__init__(locals())
        self.aux_lr, self.reg, self.normalize = check_arguments(self.arguments)
        self.init = resolve_init(paper_defaults, init)
        self.consistency = {"sensitivity": sensitivity, "correlation": correlation, "direction": direction}
        self.window = LearningWindow(start_epoch, end_epoch)
        self.aux: Optional[AuxiliaryParameters] = None
        self.masks: Optional[MaskSet] = None
        """The fine-tune phase's masks (``M`` fixed, the gating removed), ``None`` while ``M`` learns."""
        self.controller: Optional[PullController] = None
        self._hooks: list[Any] = []
        self._reset()

    def _reset(self) -> None:
        """Per-fit state (a reused instance starts clean)."""
        self.layers: list[str] = []
        self.held_out: Optional[HeldOutBatches] = None
        self.figures: Optional[Figures] = None
        self._checked_step = 0  # the global step up to which the core's counters were read
        self._gated_shapes: Optional[StructureRecord] = None
        self._trainer: Optional[pl.Trainer] = None
        self._stepped, self._fine_tuned, self._window_checked = False, False, False
        self.switched_off: Optional[float] = None
        """The fraction of ``M``'s entries switched off when it stopped learning."""
        self.landed: Optional[float] = None
        """With ``target_sparsity``: the fraction the controller had switched off before the final correction."""

    @property
    def source(self) -> Optional[str]:
        """Where held-out batches come from: ``"argument"``, ``"module"``, ``"datamodule"`` or ``"train"``."""
        return None if self.held_out is None else self.held_out.source

    def _setup_fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """``M`` attached before the strategy wraps (DDP) or moves the model; groups and FLOPs on one sample."""
        check_window_fits(self.start_epoch, self.end_epoch, epoch_limit(trainer))
        check_loss_source("AutoPruneCallback", pl_module, self.loss_fn)
        self._finish()
        self._reset()
        self.layers = list(select_modules(pl_module, self.parameters, self.exclude))
        self.held_out = HeldOutBatches(trainer, pl_module, self.aux_dataloader)
        problem = self.window.problem(trainer.max_epochs, trainer.max_steps)
        if self.target_sparsity is not None and self.window.progress(0, 0.0, 0, trainer.max_epochs, trainer.max_steps) is None:
            raise MisconfigurationException(
                f"`target_sparsity`={self.target_sparsity!r} is reached by the end of the learning window, and this run's has "
                "none: give `end_epoch`, or the Trainer's `max_epochs` or `max_steps`."
            )
        if problem is not None:
            rank_zero_warn(f"AutoPruneCallback: {problem}, so the weights are never fine-tuned under fixed masks.")
        self._gate(trainer, pl_module)

    def _gate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Channel groups (the groups touching ``layers``, attention heads included: a head's switch gates its q/k/v
        rows) and FLOPs on one sample, and ``M`` attached, for the model's current shapes."""
        channel = self.granularity == "channel"
        self.figures = Figures("AutoPruneCallback", self.layers)
        self.figures.measure(trainer, pl_module, self.example_input_fn, required=channel)
        selected = []
        if channel:
            found = find_channel_groups(pl_module, self.figures.example, heads=True)
            selected = [group for group in found if any(layer in self.layers for layer in group.layers)]
            if not selected:
                raise ValueError(f"`parameters`={self.parameters!r} with `exclude`={self.exclude!r} selects no prunable channel "
                                 "group (the network's output layer is never channel-pruned).")
            self.figures.predict_with(pl_module, found)
        self.aux = AuxiliaryParameters(pl_module, self.layers, self.granularity, selected, self.ste, self.ste_slope, self.init)
        self.aux.prepare()
        self._gated_shapes = structure_record(pl_module)
        self.controller = None if self.target_sparsity is None else PullController(self.target_sparsity, self.reg)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """``M`` on the model's device, its optimizer, and hooks around every optimizer step (manual ones too)."""
        if self.aux is None:
            return
        check_window_fits(self.start_epoch, self.end_epoch, epoch_limit(trainer))  # max_steps: the epoch length is known now
        self.aux.to(pl_module.device)
        if self.masks is None:
            self.aux.build_optimizer(self.aux_optimizer, self.aux_lr)
        for optimizer in trainer.optimizers:
            self._hooks.append(hook_optimizer(optimizer, self, before_step=False))
        self._trainer, self._checked_step = trainer, trainer.global_step

    def _learning(self) -> bool:
        trainer = self._trainer
        return trainer is not None and self.window.learning(trainer.current_epoch, trainer.global_step, trainer.max_epochs, trainer.max_steps)

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self._hooks:
            self.before_step()

    def before_step(self) -> None:
        """Before each optimizer step of ``W`` (``on_before_optimizer_step``, before Lightning clips): while ``M`` learns,
        ``W`` saved; in the fine-tune phase, no gradient (so no momentum or Adam moment) at a masked weight."""
        if self.masks is not None:
            self.masks.apply_to_grads()
        elif self._learning():
            self.aux.before_step()

    def after_step(self) -> None:
        """After it: the switched-off weights' values back (or the masked zeros), and one auxiliary step due."""
        if self.masks is not None:
            self.masks.apply_to_weights()
        elif self._learning():
            self.aux.after_step()
            self._stepped = True

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        """At the first batch after the learning window: the masks fixed (:meth:`_fix_masks`)."""
        if self.masks is None and self.aux is not None and self._trainer is not None and self.window.closed(
            trainer.current_epoch, trainer.global_step, trainer.max_epochs, trainer.max_steps
        ):
            self._fine_tuned = True
            self._close_window()
            self._fix_masks(trainer.optimizers)

    def _fix_masks(self, optimizers: Iterable[Any], masks: Optional[dict[str, Any]] = None) -> None:
        """The fine-tune phase at the cost of fixed masks: the keep-masks of ``M`` (or ``masks``, a checkpoint's) go to a
        :class:`MaskSet` (two fused multiplies per step), the gating ``W ⊙ h(M)`` leaves the model with the switched-off
        weights zeroed, and so does the optimizers' state there. ``M`` stays, detached, for the figures and the plan."""
        masks = self.aux.parameter_masks() if masks is None else masks
        self.aux.finalize()
        self.masks = MaskSet(self.aux.model)
        self.masks.update(masks)
        self.masks.apply_to_optimizer_state(optimizers)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.held_out is not None:
            self.held_out.new_epoch(trainer)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        """One auxiliary step on one held-out batch after each batch with an optimizer step of ``W``."""
        if not self._stepped:
            return
        self._stepped = False
        held_out = self.held_out.next(trainer, pl_module, batch)
        loss = lambda: module_loss(trainer, pl_module, held_out, self.loss_fn, batch_idx)  # noqa: E731
        reduce = partial(trainer.strategy.reduce, reduce_op="mean")  # M's loss signal averaged: every rank holds the same M
        learn = lambda reg: self.aux.learn(loss, reg, reduce=reduce, normalize=self.normalize, **self.consistency)  # noqa: E731
        batches = trainer.num_training_batches
        if self.controller is None:
            learn(self.reg)
        else:
            within = (batch_idx + 1) / batches if 0 < batches < float("inf") else 0.0
            progress = self.window.progress(trainer.current_epoch, within, trainer.global_step, trainer.max_epochs, trainer.max_steps)
            self.controller.step(self.aux, progress, learn)
        if batch_idx + 1 < batches and self._learning():  # the next step's held-out batch, while the device computes
            self.held_out.prefetch(trainer)

    def _close_window(self) -> None:
        """Once, when ``M`` stops learning (or at the end of fit): with a target, the final correction (if the window's
        last step did not make it); no host read (:meth:`_report_window` reads at the next epoch's end)."""
        if self._window_checked or self.aux is None:
            return
        self._window_checked = True
        if self.controller is not None:
            self.controller.settle(self.aux)

    def _report_window(self) -> None:
        """Once the window has closed, one host read: the fraction switched off and where the controller had landed; a
        run without a target that switched off under 5% is warned about, naming the arguments that ask for more."""
        if not self._window_checked or self.switched_off is not None or self.aux is None:
            return
        if self.controller is not None and self.controller.landed is not None:
            self.landed = float(self.controller.landed)
        self.switched_off = float(self.aux.switched_off_fraction())
        if self.target_sparsity is None and self.switched_off < 0.05:
            rank_zero_warn(
                f"AutoPruneCallback: M switched off only {self.switched_off:.2%} of the {self.granularity}s by the end of "
                "its learning window. Pass `target_sparsity` (e.g. 0.9) to reach a chosen sparsity, or raise `reg`."
            )

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.aux is not None and self._trainer is not None:
            self._report_window()
            self._log(trainer, pl_module)

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[SparsityReport, Optional[int]]:
        """Read the core's counters once (a skipped non-finite step stops the run) and log the event: sparsity, FLOPs
        (of the channel plan's physically pruned model; for element pruning the dense count, with what a sparse
        kernel would run beside it), the entries revived and switched off, the histograms of ``M``."""
        where = f"between global steps {self._checked_step} and {trainer.global_step} (epoch {trainer.current_epoch})"
        counts, self._checked_step = self.aux.take_counts(raise_nonfinite=where), trainer.global_step
        if counts["collapsed"]:
            rank_zero_warn("AutoPruneCallback: every channel of a channel group would have been switched off (a constant "
                           "output); the channel with the largest m was kept. Lower `reg` or `aux_lr` if this repeats.")
        return self.figures.log(
            trainer, pl_module, self.aux.plan() if self.figures.predictor is not None else None,
            histograms={f"aux/{key}": value.detach() for key, value in self.aux.values.items()},
            extra={"revived": float(counts["revived"]), "switched_off": float(counts["switched_off"])},
        )

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Last figures, the masks made permanent, channels removed (``physical``), the summary."""
        if self.aux is None or self._trainer is None:
            self._finish()
            return
        self._close_window()
        self._report_window()
        report, flops = self._log(trainer, pl_module)
        plan = self.aux.plan() if self.physical else None
        self._finish()
        if plan is not None:
            self.structure = apply_plan(pl_module, self.figures.groups, plan, self.figures.example)
            rebuild_training_state(trainer)  # optimizer state of the new shapes in later checkpoints
        notes = [] if self._fine_tuned else ["training ended before the fine-tuning phase (no step under fixed masks)"]
        if notes:
            rank_zero_warn(f"AutoPruneCallback: {notes[0]}; see `end_epoch`, `max_epochs`, `max_steps`.")
        if self.landed is not None:
            notes.append(f"target_sparsity {self.target_sparsity:.2%}: the controller of µ switched off {self.landed:.2%} of the "
                         f"{self.granularity}s, the final correction {self.switched_off:.2%}")
        if self.verbose:
            self.figures.summary(trainer, pl_module, report, flops, notes=notes, removed=self.physical)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._finish()

    def _finish(self) -> None:
        """Masks made permanent; ``M``, its optimizer, the optimizer hooks and the parametrizations (or the fine-tune
        phase's masks) leave the model."""
        for handle in self._hooks:
            handle.remove()
        self._hooks, self._trainer = [], None
        if self.aux is not None:
            self.aux.finalize()
        self.aux, self.masks = None, None

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Resuming from a checkpoint of a physically pruned model (e.g. one saved after fit): the model was
        reshaped while loading, under gates built in ``setup`` for its old shapes; they are built again for
        the new shapes before ``M``'s state loads."""
        if self.aux is not None and structure_record(pl_module) != self._gated_shapes:
            self.aux.finalize(permanent=False)
            self._gate(trainer, pl_module)
        super().on_load_checkpoint(trainer, pl_module, checkpoint)

    def _core_state(self) -> dict[str, Any]:
        state = {"aux": None if self.aux is None else self.aux.state_dict()}
        state["masks"] = None if self.masks is None else self.masks.state_dict()  # the fine-tune phase's
        state["held_out"] = None if self.held_out is None else self.held_out.state_dict()
        if self.controller is not None:
            state["controller"] = self.controller.state_dict()
        return state

    def _load_core_state(self, state: Mapping[str, Any]) -> None:
        """Loaded into the core at once (``M`` exists since ``setup``; ``fit`` restores callbacks after it); a mismatch
        of ``granularity`` or layers is refused."""
        if self.aux is not None and state.get("aux") is not None:
            self.aux.load_state_dict(state["aux"])
        if self.aux is not None and state.get("masks") is not None:  # saved in the fine-tune phase: it goes on
            self._window_checked = self._fine_tuned = True
            self._fix_masks((), state["masks"])  # the optimizers, restored later, hold zeros there already
        if self.held_out is not None and state.get("held_out") is not None:
            self.held_out.load_state_dict(state["held_out"])  # where a mid-epoch resume goes on drawing
        if self.controller is not None and state.get("controller") is not None:
            self.controller.load_state_dict(state["controller"])

    def _changed_consequence(self) -> str:
        return "the checkpoint's auxiliary parameters (or fixed masks) are kept and the new settings apply from here on"
