"""``AutoPruneCallback``: AutoPrune-style pruning by auxiliary parameters (experimental; after Xiao, Wang,
Rajasekaran, NeurIPS 2019)."""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lightning_prune.auxiliary import (
    AuxiliaryParameters,
    AuxOptimizer,
    LearningWindow,
    Ste,
)
from lightning_prune.callbacks._autoprune_args import resolve_rates
from lightning_prune.callbacks._held_out import (
    HeldOutBatches,
    check_flags,
    check_loader,
)
from lightning_prune.callbacks._module_io import (
    ExampleInputFn,
    LossFn,
    ModelArgs,
    check_function,
    example_input,
    module_loss,
    one_sample,
)
from lightning_prune.callbacks._shared import check_range, optional_flop_count
from lightning_prune.choices import check_choice
from lightning_prune.criteria import Granularity
from lightning_prune.callbacks._strategy import prepare_module
from lightning_prune.checks import check_patterns
from lightning_prune.flops import FlopCount, FlopsPredictor
from lightning_prune.loggers import log_pruning_event
from lightning_prune.report import SparsityReport, nonzero_flops, pruning_summary, sparsity_report
from lightning_prune.structure import STRUCTURE_KEY, apply_plan, find_channel_groups
from lightning_prune.targets import select_modules
from lightning_prune.training_state import rebuild_training_state


class AutoPruneCallback(pl.Callback):
    r"""AutoPrune-style pruning (experimental): learn which weights to use through auxiliary parameters ``M``.

    A documented reconstruction of AutoPrune (Xiao, Wang, Rajasekaran, NeurIPS 2019), not the paper's
    exact method: its R(M) and its consistency rules are not public in reach (``PAPERS.md``).

    - From the paper: T = W ⊙ h(M), h(m) = 1[m > 0], so switched-off weights keep their values; the
      straight-through estimators of h (linear, leaky ReLU, softplus); bi-level updates, ``W`` on the
      training batches and ``M`` on a held-out split; µ = 5e-2 and the auxiliary learning rate 1.5e-2
      (``paper_defaults=True``, for comparison).
    - Our reconstruction and calibration: the loss signal's normalisation by its mean over the network
      (µ then is relative to it), R(M) = Σ h(M), the three consistency rules as implemented in
      :func:`lightning_prune.auxiliary.auxiliary_gradient` (correlation: the signal per unit of ‖w‖;
      sensitivity: the pull weighted by 1/(1 + ‖w‖/mean‖w‖); direction: the pull through the STE), and
      the defaults (``reg=1.25``, ``ste_slope=0.5``, ``init=1.0``, calibrated on the digits data).

    The algorithm is :class:`lightning_prune.auxiliary.AuxiliaryParameters`; this callback wires it into
    the Trainer. The model's optimizers train ``W`` on the training batches (around every optimizer
    step, manual optimization included, switched-off weights keep their values), and after each
    training batch with an optimizer step, ``M`` takes one step from one held-out batch. Its loss is the
    module's own ``training_step`` on that batch (its returned loss or ``loss`` of a returned dict,
    logging silenced; metrics the step updates see the held-out batch — pass ``loss_fn`` where that
    matters), or ``loss_fn(pl_module, batch)``. Held-out batches come from ``aux_dataloader``, else
    ``aux_dataloader()`` of the module or the DataModule (``DigitsDataModule(aux_fraction=0.5)`` is the
    paper's 1:1 split), else — with a warning — the training batch itself. Under DDP the held-out
    loader is sharded per rank and the gradient of ``M`` is averaged over ranks, so every rank holds the
    same ``M``.

    ``M`` is created in ``setup``, before the strategy wraps the model (DDP), from an example input:
    ``example_input_array``/``datamodule.example_input()``, else the first training batch
    (``example_input_fn(batch)`` picks the input; it then comes first). Channel groups and FLOPs
    (multiply-adds per sample) are taken on it. At the end of fit the masks are made permanent; ``M``
    leaves the model; with ``granularity="channel"`` and ``physical=True`` switched-off channels are
    removed.

    Args:
        aux_lr: learning rate of ``M``. ``None``: 1.5e-2, the paper's (with either set of defaults).
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
        granularity: ``"element"`` or ``"channel"`` (one ``m`` per channel of each coupled group; at
            least one channel of every group is kept, with a warning when that floor was needed).
        init: initial value of every ``m``.
        aux_optimizer: ``"sgd"`` or ``"adam"`` for ``M``.
        start_epoch: first epoch with auxiliary steps.
        end_epoch: last epoch with auxiliary steps; later epochs fine-tune ``W`` under fixed masks.
            ``None``: the first 75% of ``max_epochs`` (and of ``max_steps`` when set) learn ``M``.
        aux_dataloader: held-out data for ``M`` (any iterable of batches).
        loss_fn: ``loss_fn(pl_module, batch) -> loss`` of a held-out batch (default: ``training_step``).
        example_input_fn: ``example_input_fn(batch) -> model input`` for the first training batch.
        parameters: glob patterns of module names to prune (default: every Conv/Linear).
        exclude: glob patterns of module names never to prune.
        physical: with ``granularity="channel"``, remove the switched-off channels at the end of fit.
        verbose: print the sparsity table at the end of fit.
    """

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
        init: float = 1.0,
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
    ) -> None:
        super().__init__()
        rates = resolve_rates(paper_defaults, aux_lr, reg)
        check_range("init", init, 0.0, math.inf, low_open=True)
        check_range("ste_slope", ste_slope, 0.0, math.inf)
        check_choice("ste", ste, Ste)
        check_choice("granularity", granularity, Granularity)
        check_choice("aux_optimizer", aux_optimizer, AuxOptimizer)
        check_flags(sensitivity=sensitivity, correlation=correlation, direction=direction, physical=physical, verbose=verbose)
        if isinstance(start_epoch, bool) or not isinstance(start_epoch, int) or start_epoch < 0:
            raise ValueError(f"`start_epoch` must be an integer >= 0, got {start_epoch!r}.")
        if end_epoch is not None and (isinstance(end_epoch, bool) or not isinstance(end_epoch, int) or end_epoch < start_epoch):
            raise ValueError(f"`end_epoch` must be None or an integer >= `start_epoch` ({start_epoch}), got {end_epoch!r}.")
        check_loader("aux_dataloader", aux_dataloader)
        check_function("loss_fn", loss_fn, 2, "loss_fn(pl_module, batch) -> loss")
        check_function("example_input_fn", example_input_fn, 1, "example_input_fn(batch) -> model input")
        check_patterns("parameters", parameters)
        check_patterns("exclude", exclude)
        if physical and granularity != "channel":
            raise ValueError("`physical=True` removes channels: it needs `granularity='channel'`.")
        self.aux_lr, self.reg, self.normalize = rates
        self.paper_defaults, self.ste, self.ste_slope = paper_defaults, ste, float(ste_slope)
        self.consistency = {"sensitivity": sensitivity, "correlation": correlation, "direction": direction}
        self.granularity, self.init, self.aux_optimizer = granularity, float(init), aux_optimizer
        self.window = LearningWindow(start_epoch, end_epoch)
        self.aux_loader_argument, self.loss_fn, self.example_input_fn = aux_dataloader, loss_fn, example_input_fn
        self.parameters, self.exclude, self.physical, self.verbose = parameters, exclude, physical, verbose
        self.aux: Optional[AuxiliaryParameters] = None
        self.structure: Optional[dict[str, Any]] = None
        self._hooks: list[Any] = []
        self._reset()

    def _reset(self) -> None:
        """Per-fit state (a reused instance starts clean)."""
        self.layers: list[str] = []
        self.held_out: Optional[HeldOutBatches] = None
        self.groups: list[Any] = []
        self.example: Optional[ModelArgs] = None
        self.dense_flops: Optional[int] = None
        self.flop_count: Optional[FlopCount] = None
        self.flops_predictor: Optional[FlopsPredictor] = None
        self.counts: dict[str, Any] = {"revived": 0, "switched_off": 0}
        self._pending: Optional[dict[str, Any]] = None
        self._trainer: Optional[pl.Trainer] = None
        self._stepped, self._fine_tune_steps, self._checked_step = False, 0, 0

    @property
    def source(self) -> Optional[str]:
        """Where held-out batches come from: ``"argument"``, ``"module"``, ``"datamodule"`` or ``"train"``."""
        return None if self.held_out is None else self.held_out.source

    # ------------------------------------------------------------------ setup: M attached before the DDP wrap
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        prepare_module(trainer, pl_module, "AutoPruneCallback", physical=self.physical)
        if sum(isinstance(callback, AutoPruneCallback) for callback in trainer.callbacks) > 1:
            raise MisconfigurationException("Only one AutoPruneCallback per Trainer: two would gate the same weights twice.")
        self._finish()
        self._reset()
        self.layers = list(select_modules(pl_module, self.parameters, self.exclude))
        self.held_out = HeldOutBatches(trainer, pl_module, self.aux_loader_argument)
        problem = self.window.problem(trainer.max_epochs, trainer.max_steps)
        if problem is not None:
            rank_zero_warn(f"AutoPruneCallback: {problem}, so the weights are never fine-tuned under fixed masks.")
        try:
            example = example_input(trainer, pl_module, self.example_input_fn)
        except MisconfigurationException as error:
            if self.granularity == "channel":
                raise
            rank_zero_warn(f"AutoPruneCallback: FLOPs are not reported ({error}).")
            example = None
        self._create(pl_module, example)  # on the module's current device: the strategy moves the model later

    def _create(self, pl_module: pl.LightningModule, example: Optional[ModelArgs]) -> None:
        """Channel groups / FLOPs counts on ``example`` (per sample), then ``M`` attached to the model."""
        self.example, sample = example, None if example is None else one_sample(example)
        if self.granularity == "channel":
            found = find_channel_groups(pl_module, sample)
            self.groups = [group for group in found if any(layer in self.layers for layer in group.layers)]
            if not self.groups:
                raise ValueError(
                    f"`parameters`={self.parameters!r} with `exclude`={self.exclude!r} selects no prunable channel group "
                    "(the network's output layer is never channel-pruned)."
                )
            self.flops_predictor = FlopsPredictor(pl_module, sample, found)
            self.dense_flops = self.flops_predictor.dense
        elif sample is not None:
            self.flop_count = optional_flop_count(pl_module, sample)
            self.dense_flops = None if self.flop_count is None else self.flop_count.total
        self.aux = AuxiliaryParameters(pl_module, self.layers, self.granularity, self.groups, self.ste, self.ste_slope, self.init)
        self.aux.attach()

    # ------------------------------------------------------------------ train start: M on the device, optimizer hooks
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.aux is None:
            return
        self.aux.to(pl_module.device)
        if self._pending is not None:
            self.aux.load_state_dict(self._pending)
            self._pending = None
        self.aux.build_optimizer(self.aux_optimizer, self.aux_lr)
        for optimizer in trainer.optimizers:  # every optimizer step, manual optimization included
            self._hooks += [optimizer.register_step_pre_hook(self._before_step), optimizer.register_step_post_hook(self._after_step)]
        self._trainer, self._checked_step = trainer, trainer.global_step

    def _learning(self) -> bool:
        trainer = self._trainer
        return trainer is not None and self.window.learning(trainer.current_epoch, trainer.global_step, trainer.max_epochs, trainer.max_steps)

    def _before_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._learning():
            self.aux.freeze()

    def _after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._learning():
            self.aux.restore_frozen()
            self._stepped = True

    # ------------------------------------------------------------------ the auxiliary step, once per batch with an optimizer step
    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.held_out is not None:
            self.held_out.new_epoch(trainer)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._stepped:
            self._fine_tune_steps += self.aux is not None and not self._learning()
            return
        self._stepped = False
        held_out = self.held_out.next(trainer, pl_module, batch)
        self.aux.learn(
            lambda: module_loss(trainer, pl_module, held_out, self.loss_fn, batch_idx),
            self.reg,
            reduce=lambda grad: trainer.strategy.reduce(grad, reduce_op="mean"),
            normalize=self.normalize,
            **self.consistency,
        )

    def _read_counts(self, trainer: pl.Trainer) -> None:
        """Device counters read once (per epoch / at the end); a skipped non-finite step stops the run."""
        counts = self.aux.take_counts()
        first, self._checked_step = self._checked_step, trainer.global_step
        if counts["nonfinite"]:
            raise FloatingPointError(
                f"AutoPruneCallback auxiliary step between global steps {first} and {trainer.global_step} (epoch "
                f"{trainer.current_epoch}): the loss gradient of the auxiliary parameters was NaN or infinite; M was not "
                "updated on those steps. Check the held-out batches, the loss and the learning rates."
            )
        if counts["collapsed"]:
            rank_zero_warn(
                "AutoPruneCallback: every channel of a channel group would have been switched off (a constant output); "
                "the channel with the largest m was kept. Lower `reg` or `aux_lr` if this repeats."
            )
        self.counts = counts

    # ------------------------------------------------------------------ logging
    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.aux is not None and self.aux.optimizer is not None:
            self._read_counts(trainer)
            self._log(trainer, pl_module)

    def _flops_ratio(self, report: SparsityReport) -> Optional[float]:
        """Kept / dense multiply-adds per sample: fvcore's per-layer counts × each layer's density
        (element), or the exact count of the physically pruned structure (channel)."""
        if not self.dense_flops:
            return None
        if self.granularity == "channel":
            return self.flops_predictor.predict(self._plan()) / self.dense_flops
        return nonzero_flops(self.flop_count, report) / self.dense_flops

    def _plan(self) -> dict[int, torch.Tensor]:
        """Kept channels of every gated group (the core's floor keeps at least one)."""
        return {group.index: (self.aux.values[group.root].detach() > 0).nonzero().flatten().cpu() for group in self.groups}

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[SparsityReport, Optional[float]]:
        report = sparsity_report(pl_module, self.layers)
        extra = {"revived": float(self.counts["revived"]), "switched_off": float(self.counts["switched_off"])}
        if report.total.nonzero:
            extra["compression"] = report.total.total / report.total.nonzero
        flops_ratio = self._flops_ratio(report)
        if flops_ratio is not None:
            extra["flops_macs"] = flops_ratio * self.dense_flops
        histograms = {f"aux/{key}": value.detach() for key, value in self.aux.values.items()}
        log_pruning_event(trainer, report=report, flops_ratio=flops_ratio, histograms=histograms, extra=extra)
        return report, flops_ratio

    # ------------------------------------------------------------------ end of fit
    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.aux is None or self.aux.optimizer is None:
            self._finish()
            return
        self._read_counts(trainer)
        report, flops_ratio = self._log(trainer, pl_module)
        plan = self._plan() if self.physical else None
        self._finish()
        if plan is not None:
            self.structure = apply_plan(pl_module, self.groups, plan, self.example)
            rebuild_training_state(trainer)  # optimizer state of the new shapes in later checkpoints
        notes = []
        if self._fine_tune_steps == 0:
            notes.append("training ended before the fine-tuning phase (no step under fixed masks)")
            rank_zero_warn(f"AutoPruneCallback: {notes[-1]}; see `end_epoch`, `max_epochs`, `max_steps`.")
        if self.verbose and trainer.is_global_zero:
            flops = None if flops_ratio is None else (self.dense_flops, round(flops_ratio * self.dense_flops))
            rank_zero_info(pruning_summary("AutoPrune summary", report, flops=flops, notes=notes))

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._finish()

    def _finish(self) -> None:
        """Masks made permanent; ``M``, its optimizer, the optimizer hooks and the parametrizations leave the model."""
        for handle in self._hooks:
            handle.remove()
        self._hooks, self._trainer = [], None
        if self.aux is not None:
            self.aux.detach()
        self.aux = None

    # ------------------------------------------------------------------ checkpoints (state key: the class name)
    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.structure is not None:
            checkpoint[STRUCTURE_KEY] = self.structure

    @override
    def state_dict(self) -> dict[str, Any]:
        """Under the class name alone: a changed argument cannot hide the state, a mismatch is refused on load."""
        return {"aux": self.aux.state_dict() if self.aux is not None and self._pending is None else self._pending}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Kept until ``M`` exists on the device (``on_train_start``), then loaded there."""
        self._pending = state_dict.get("aux")
