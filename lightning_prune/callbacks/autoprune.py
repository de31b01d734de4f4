"""``AutoPruneCallback``: AutoPrune-style pruning by auxiliary parameters (experimental; after Xiao, Wang,
Rajasekaran, NeurIPS 2019)."""

from __future__ import annotations

from typing import Any, Iterable, Optional

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_warn
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lightning_prune.auxiliary import AuxiliaryParameters, AuxOptimizer, LearningWindow, Ste
from lightning_prune.callbacks._autoprune_args import check_arguments, check_window_fits
from lightning_prune.callbacks._autoprune_report import AutoPruneFigures
from lightning_prune.callbacks._held_out import HeldOutBatches
from lightning_prune.callbacks._module_io import ExampleInputFn, LossFn, check_loss_source, module_loss
from lightning_prune.callbacks._shared import epoch_limit
from lightning_prune.callbacks._strategy import prepare_module
from lightning_prune.criteria import Granularity
from lightning_prune.structure import STRUCTURE_KEY, apply_plan
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
        start_epoch: first epoch with auxiliary steps (before the Trainer's last epoch).
        end_epoch: last epoch with auxiliary steps; later epochs fine-tune ``W`` under fixed masks, so at least one
            epoch must follow it inside ``max_epochs`` (and the epochs ``max_steps`` allows), else ``fit`` is refused
            at the start. ``None``: the first 75% of ``max_epochs`` (and of ``max_steps`` when set) learn ``M``.
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
        arguments = {name: value for name, value in locals().items() if name not in ("self", "__class__")}
        rates = check_arguments(arguments)
        self.__dict__.update(arguments)
        self.aux_lr, self.reg, self.normalize = rates
        self.consistency = {"sensitivity": sensitivity, "correlation": correlation, "direction": direction}
        self.window = LearningWindow(start_epoch, end_epoch)
        self.aux: Optional[AuxiliaryParameters] = None
        self.structure: Optional[dict[str, Any]] = None
        self._hooks: list[Any] = []
        self._reset()

    def _reset(self) -> None:
        """Per-fit state (a reused instance starts clean)."""
        self.layers: list[str] = []
        self.held_out: Optional[HeldOutBatches] = None
        self.figures: Optional[AutoPruneFigures] = None
        self._trainer: Optional[pl.Trainer] = None
        self._stepped, self._fine_tuned = False, False

    @property
    def source(self) -> Optional[str]:
        """Where held-out batches come from: ``"argument"``, ``"module"``, ``"datamodule"`` or ``"train"``."""
        return None if self.held_out is None else self.held_out.source

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """``M`` attached before the strategy wraps (DDP) or moves the model; groups and FLOPs on one sample."""
        if stage != "fit":
            return
        prepare_module(trainer, pl_module, "AutoPruneCallback", physical=self.physical)
        if sum(isinstance(callback, AutoPruneCallback) for callback in trainer.callbacks) > 1:
            raise MisconfigurationException("Only one AutoPruneCallback per Trainer: two would gate the same weights twice.")
        check_window_fits(self.start_epoch, self.end_epoch, epoch_limit(trainer))
        check_loss_source("AutoPruneCallback", pl_module, self.loss_fn)
        self._finish()
        self._reset()
        self.layers = list(select_modules(pl_module, self.parameters, self.exclude))
        self.held_out = HeldOutBatches(trainer, pl_module, self.aux_dataloader)
        problem = self.window.problem(trainer.max_epochs, trainer.max_steps)
        if problem is not None:
            rank_zero_warn(f"AutoPruneCallback: {problem}, so the weights are never fine-tuned under fixed masks.")
        selection = f"`parameters`={self.parameters!r} with `exclude`={self.exclude!r}"
        self.figures = AutoPruneFigures(trainer, pl_module, self.layers, self.granularity, self.example_input_fn, selection)
        self.aux = AuxiliaryParameters(pl_module, self.layers, self.granularity, self.figures.groups, self.ste, self.ste_slope, self.init)
        self.aux.attach()

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """``M`` on the model's device, its optimizer, and hooks around every optimizer step (manual ones too)."""
        if self.aux is None:
            return
        check_window_fits(self.start_epoch, self.end_epoch, epoch_limit(trainer))  # max_steps: the epoch length is known now
        self.aux.to(pl_module.device)
        self.aux.build_optimizer(self.aux_optimizer, self.aux_lr)
        for optimizer in trainer.optimizers:
            self._hooks += [optimizer.register_step_pre_hook(self._before_step), optimizer.register_step_post_hook(self._after_step)]
        self._trainer, self.figures.checked_step = trainer, trainer.global_step

    def _learning(self) -> bool:
        trainer = self._trainer
        return trainer is not None and self.window.learning(trainer.current_epoch, trainer.global_step, trainer.max_epochs, trainer.max_steps)

    def _before_step(self, *_: Any) -> None:
        if self._learning():
            self.aux.freeze()

    def _after_step(self, *_: Any) -> None:
        if self._learning():
            self.aux.restore_frozen()
            self._stepped = True

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.held_out is not None:
            self.held_out.new_epoch(trainer)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        """One auxiliary step on one held-out batch after each batch with an optimizer step of ``W``."""
        if not self._stepped:
            self._fine_tuned = self._fine_tuned or (self.aux is not None and not self._learning())
            return
        self._stepped = False
        held_out = self.held_out.next(trainer, pl_module, batch)
        loss = lambda: module_loss(trainer, pl_module, held_out, self.loss_fn, batch_idx)  # noqa: E731
        self.aux.learn(loss, self.reg, reduce=self._reduce, normalize=self.normalize, **self.consistency)

    def _reduce(self, grad: Any) -> Any:
        """The loss signal of ``M`` averaged over ranks, so every rank holds the same ``M``."""
        return self._trainer.strategy.reduce(grad, reduce_op="mean")

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.aux is not None and self.aux.optimizer is not None:
            self.figures.log(trainer, pl_module, self.aux)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Last figures, the masks made permanent, channels removed (``physical``), the summary."""
        if self.aux is None or self.aux.optimizer is None:
            self._finish()
            return
        report, flops_ratio = self.figures.log(trainer, pl_module, self.aux)
        plan = self.aux.plan() if self.physical else None
        self._finish()
        if plan is not None:
            self.structure = apply_plan(pl_module, self.figures.groups, plan, self.figures.example)
            rebuild_training_state(trainer)  # optimizer state of the new shapes in later checkpoints
        notes = [] if self._fine_tuned else ["training ended before the fine-tuning phase (no step under fixed masks)"]
        if notes:
            rank_zero_warn(f"AutoPruneCallback: {notes[0]}; see `end_epoch`, `max_epochs`, `max_steps`.")
        if self.verbose:
            self.figures.summary(trainer, report, flops_ratio, notes)

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

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.structure is not None:
            checkpoint[STRUCTURE_KEY] = self.structure

    @override
    def state_dict(self) -> dict[str, Any]:
        """Under the class name alone: a changed argument cannot hide the state, a mismatch is refused on load."""
        return {"aux": None if self.aux is None else self.aux.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loaded into the core at once (``M`` exists since ``setup``; ``fit`` restores callbacks after it)."""
        if self.aux is not None and state_dict.get("aux") is not None:
            self.aux.load_state_dict(state_dict["aux"])
