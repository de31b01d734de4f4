"""``AutoPruneCallback``: pruning by auxiliary parameters (Xiao, Wang, Rajasekaran, NeurIPS 2019)."""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Iterator, Optional

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_prune.auxiliary import AUX_OPTIMIZERS, GRANULARITIES, STES, AuxiliaryParameters, AuxOptimizer, Granularity, Ste
from lightning_prune.callbacks._shared import (
    check_choice,
    check_range,
    example_input,
    find_example_input,
    optional_flop_count,
)
from lightning_prune.callbacks._strategy import prepare_module
from lightning_prune.flops import FlopCount, FlopsPredictor
from lightning_prune.loggers import log_pruning_event
from lightning_prune.report import SparsityReport, nonzero_flops, sparsity_report
from lightning_prune.structure import STRUCTURE_KEY, apply_plan, find_channel_groups
from lightning_prune.targets import select_modules
from lightning_prune.training_state import rebuild_training_state

LossFn = Callable[[pl.LightningModule, Any], torch.Tensor]


class AutoPruneCallback(pl.Callback):
    r"""AutoPrune: learn which weights to use through auxiliary parameters ``M`` (T = W ⊙ h(M), h(m) = 1[m > 0]).

    The core is :class:`lightning_prune.auxiliary.AuxiliaryParameters` (formulas there). Bi-level
    optimisation as in the paper: the model's own optimizer trains ``W`` on the training batches
    (switched-off weights get no gradient and keep their values, also through weight decay and
    momentum), and after every optimizer step (``on_train_batch_end``) the callback takes one step
    of its own optimizer on ``M`` from one held-out batch, with ``W`` untouched (no gradient reaches
    the model's parameters, BatchNorm statistics are restored). Held-out batches come from the
    ``aux_dataloader`` argument, else from ``aux_dataloader()`` of the LightningModule or the
    DataModule (``DigitsDataModule(aux_fraction=0.5)`` is the paper's 1:1 split), else — with a
    warning — from the training batch itself. The validation data is never used unless passed.
    The auxiliary loader is iterated afresh each epoch (its sampler's ``set_epoch`` is called) and
    re-requested from its source whenever Lightning reloads the training loader, so with samplers
    whose order is a function of the epoch (``DigitsDataModule``'s, ``DistributedSampler``) a run
    resumed from an end-of-epoch checkpoint repeats an uninterrupted one exactly.

    Under DDP the gradient of ``M`` is averaged over ranks before the step, so every rank holds the
    same ``M``. At the end of fit the masks are made permanent (plain weights with zeros, the same
    ``nn.Parameter`` objects); ``M`` and its optimizer leave the model. With ``granularity="channel"``
    and ``physical=True`` the switched-off channels are removed (torch-pruning, coupled groups).

    Args:
        aux_lr: learning rate of ``M`` (the paper's 1.5e-2).
        reg: coefficient of the regulariser R(M) = Σ h(M), relative to the normalised loss signal
            (:func:`~lightning_prune.auxiliary.auxiliary_gradient`). Calibrated on the digits data
            (≥10x compression of LeNet-300-100 and LeNet-5 in 40 epochs); the paper's µ = 5e-2 is
            relative to its own gradient scale and prunes ~1.2x here (README, "AutoPrune").
        ste: straight-through estimator of h: ``"leaky_relu"``, ``"linear"`` or ``"softplus"``.
        ste_slope: slope of the leaky-ReLU STE for m ≤ 0. Also how fast a switched-off weight can
            return (with direction consistency both the loss's push and the pull are scaled by it):
            0.5 lets weights switched off early in training, before the network has learned much,
            come back; 0.1 left the LeNet-5 CNN about 1 point lower on the digits data (README).
        sensitivity: sensitivity consistency (large weights are harder to switch off).
        correlation: correlation consistency (``m`` follows the weights' own growth or shrinkage).
        direction: direction consistency (the regulariser's gradient goes through the STE).
        granularity: ``"element"`` (one ``m`` per weight) or ``"channel"`` (one per output channel of
            each coupled channel group; its out-layers' weights and biases and its BatchNorms are gated).
        init: initial value of every ``m`` (positive: all weights start switched on). Well above the
            per-step noise of ``m`` (about ``aux_lr``), so that no weight switches off by chance.
        aux_optimizer: ``"sgd"`` or ``"adam"`` for ``M``.
        start_epoch: first epoch with auxiliary steps (before it the network trains dense).
        end_epoch: last epoch with auxiliary steps; later epochs fine-tune ``W`` under fixed masks.
            ``None``: the last quarter of ``max_epochs`` fine-tunes (``int(0.75 · max_epochs) − 1``;
            without ``max_epochs``, auxiliary steps until the end).
        aux_dataloader: held-out data for ``M`` (any iterable of batches).
        loss_fn: ``loss_fn(pl_module, batch) -> loss`` of a held-out batch. Default: the module's
            ``auxiliary_loss(batch)`` if it has one, else cross-entropy of ``pl_module(batch[0])``
            against ``batch[1]``.
        parameters: glob patterns of module names to prune (default: every Conv/Linear).
        exclude: glob patterns of module names never to prune.
        physical: with ``granularity="channel"``, remove the switched-off channels at the end of fit.
        verbose: print the sparsity table at the end of fit.
    """

    def __init__(
        self,
        aux_lr: float = 1.5e-2,
        reg: float = 1.25,
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
        parameters: Optional[list[str]] = None,
        exclude: Optional[list[str]] = None,
        physical: bool = False,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (("aux_lr", aux_lr), ("init", init)):
            check_range(name, value, 0.0, math.inf, low_open=True)
        for name, value in (("reg", reg), ("ste_slope", ste_slope)):
            check_range(name, value, 0.0, math.inf)
        check_choice("ste", ste, STES)
        check_choice("granularity", granularity, GRANULARITIES)
        check_choice("aux_optimizer", aux_optimizer, AUX_OPTIMIZERS)
        if isinstance(start_epoch, bool) or not isinstance(start_epoch, int) or start_epoch < 0:
            raise ValueError(f"`start_epoch` must be an integer >= 0, got {start_epoch!r}.")
        if end_epoch is not None and (isinstance(end_epoch, bool) or not isinstance(end_epoch, int) or end_epoch < start_epoch):
            raise ValueError(f"`end_epoch` must be None or an integer >= `start_epoch` ({start_epoch}), got {end_epoch!r}.")
        if physical and granularity != "channel":
            raise ValueError("`physical=True` removes channels: it needs `granularity='channel'`.")
        self.aux_lr = float(aux_lr)
        self.reg = float(reg)
        self.ste = ste
        self.ste_slope = float(ste_slope)
        self.consistency = {"sensitivity": sensitivity, "correlation": correlation, "direction": direction}
        self.granularity = granularity
        self.init = float(init)
        self.aux_optimizer = aux_optimizer
        self.start_epoch = start_epoch
        self.end_epoch = end_epoch
        self.aux_loader_argument = aux_dataloader
        self.loss_fn = loss_fn
        self.parameters = parameters
        self.exclude = exclude
        self.physical = physical
        self.verbose = verbose

        self.aux: Optional[AuxiliaryParameters] = None
        self.layers: list[str] = []
        self.source: Optional[str] = None
        self.revived = 0
        self.switched_off = 0
        self.dense_flops: Optional[int] = None
        self.flop_count: Optional[FlopCount] = None
        self.flops_predictor: Optional[Any] = None
        self.groups: list[Any] = []
        self.structure: Optional[dict[str, Any]] = None
        self._pending_optimizer: Optional[dict[str, Any]] = None
        self._loader: Optional[Iterable[Any]] = None
        self._iterator: Optional[Iterator[Any]] = None
        self._stepped = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(granularity=self.granularity, parameters=self.parameters, exclude=self.exclude)

    # ------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or (self.aux is not None and self.aux.model is pl_module):
            return
        prepare_module(trainer, pl_module, "AutoPruneCallback", physical=self.physical)
        modules = select_modules(pl_module, self.parameters, self.exclude)
        self.layers = list(modules)
        self.source = self._resolve_source(trainer, pl_module)
        # element granularity works without an example input (FLOPs are then not logged); channels need one
        inputs = example_input(trainer, pl_module) if self.granularity == "channel" else find_example_input(trainer, pl_module)
        if self.granularity == "channel":
            found = find_channel_groups(pl_module, inputs)
            self.groups = [group for group in found if any(layer in modules for layer in group.layers)]
            if not self.groups:
                raise ValueError(
                    f"`parameters`={self.parameters!r} with `exclude`={self.exclude!r} selects no prunable channel group "
                    "(the network's output layer is never channel-pruned)."
                )
            self.flops_predictor = FlopsPredictor(pl_module, inputs, found)
            self.dense_flops = self.flops_predictor.dense
        else:
            self.flop_count = optional_flop_count(pl_module, inputs)
            self.dense_flops = None if self.flop_count is None else self.flop_count.total
        self.aux = AuxiliaryParameters(
            pl_module, self.layers, self.granularity, self.groups, self.ste, self.ste_slope, self.init
        )
        self.aux.attach()

    def _resolve_source(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> str:
        if self.aux_loader_argument is not None:
            return "argument"
        for owner, name in ((pl_module, "module"), (trainer.datamodule, "datamodule")):
            if owner is not None and callable(getattr(owner, "aux_dataloader", None)) and owner.aux_dataloader() is not None:
                return name
        rank_zero_warn(
            "AutoPruneCallback: no held-out auxiliary data (no `aux_dataloader` argument, and neither the LightningModule "
            "nor the DataModule returns one from `aux_dataloader()`), so the auxiliary parameters learn from the "
            "training batches themselves instead of the paper's separate split. Pass `aux_dataloader=...` or give "
            "the DataModule a held-out split (e.g. `DigitsDataModule(aux_fraction=0.5)`)."
        )
        return "train"

    # ------------------------------------------------------------------ fit start
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.aux is None:
            return
        self.aux.to(pl_module.device)
        self.aux.build_optimizer(self.aux_optimizer, self.aux_lr)
        if self._pending_optimizer is not None:
            self.aux.optimizer.load_state_dict(self._pending_optimizer)
            self._pending_optimizer = None

    def _last_epoch(self, trainer: pl.Trainer) -> Optional[int]:
        if self.end_epoch is not None:
            return self.end_epoch
        max_epochs = trainer.max_epochs
        if max_epochs is None or max_epochs < 0:
            return None
        return max(self.start_epoch, int(0.75 * max_epochs) - 1)

    def _active(self, trainer: pl.Trainer) -> bool:
        epoch, last = trainer.current_epoch, self._last_epoch(trainer)
        return self.aux is not None and epoch >= self.start_epoch and (last is None or epoch <= last)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.revived = self.switched_off = 0
        if not self._active(trainer) or self.source == "train":
            return
        reload = trainer.reload_dataloaders_every_n_epochs
        if self._loader is None or (reload > 0 and trainer.current_epoch % reload == 0):
            self._loader = self._fetch_loader(trainer, pl_module)
        sampler = getattr(self._loader, "sampler", None)
        if callable(getattr(sampler, "set_epoch", None)):
            sampler.set_epoch(trainer.current_epoch)
        self._iterator = iter(self._loader)

    def _fetch_loader(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Iterable[Any]:
        if self.source == "argument":
            return self.aux_loader_argument
        owner = pl_module if self.source == "module" else trainer.datamodule
        return owner.aux_dataloader()

    def _next_aux_batch(self) -> Any:
        try:
            return next(self._iterator)
        except StopIteration:
            self._iterator = iter(self._loader)
            return next(self._iterator)

    # ------------------------------------------------------------------ training steps
    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        # switched-off weights keep their values only while they can still come back (M is learning)
        if self._active(trainer):
            self.aux.freeze()
            self._stepped = True

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._stepped:
            self._stepped = False
            self.aux.restore_frozen()
            self._auxiliary_step(trainer, pl_module, batch if self.source == "train" else self._next_aux_batch())

    def _auxiliary_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        """One step of ``M`` on a held-out batch; ``W``, its gradients and BatchNorm statistics stay as they are."""
        batch = trainer.strategy.batch_to_device(batch)
        buffers = {name: buffer.clone() for name, buffer in pl_module.named_buffers()}
        with torch.enable_grad(), self.aux.tracking() as tensors:
            with trainer.precision_plugin.forward_context():
                loss = self.loss_fn(pl_module, batch) if self.loss_fn is not None else _default_loss(pl_module, batch)
            grads = torch.autograd.grad(loss, tensors, allow_unused=True)
        with torch.no_grad():
            for name, buffer in pl_module.named_buffers():
                buffer.copy_(buffers[name])
        grads = [torch.zeros_like(t) if g is None else g.detach().float() for t, g in zip(tensors, grads)]
        flat = trainer.strategy.reduce(torch.cat([g.flatten() for g in grads]), reduce_op="mean")
        if not bool(torch.isfinite(flat).all()):
            bad = [key for key, g in zip(self.aux.values, grads) if not bool(torch.isfinite(g).all())]
            raise FloatingPointError(
                f"AutoPruneCallback auxiliary step (epoch {trainer.current_epoch}, global step {trainer.global_step}): "
                f"the loss gradient of the auxiliary parameters is NaN or infinite (layers {bad}, loss {float(loss):.4g}); "
                "M was not updated. Check the held-out batch, the loss and the learning rates."
            )
        loss_grads, offset = {}, 0
        for key, g in zip(self.aux.values, grads):
            loss_grads[key] = flat[offset : offset + g.numel()].view_as(g)
            offset += g.numel()
        revived, switched_off = self.aux.step(loss_grads, self.reg, **self.consistency)
        self.revived += revived
        self.switched_off += switched_off

    # ------------------------------------------------------------------ logging
    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.aux is not None:
            self._log(trainer, pl_module)

    def _flops_ratio(self, pl_module: pl.LightningModule, report: SparsityReport) -> Optional[float]:
        """Kept FLOPs (MACs) / dense: fvcore's per-layer counts × each layer's density (element), or the
        exact count of the physically pruned structure (channel)."""
        if self.dense_flops is None or not self.dense_flops:
            return None
        if self.granularity == "channel":
            return self.flops_predictor.predict(self._plan()) / self.dense_flops
        return nonzero_flops(self.flop_count, report) / self.dense_flops

    def _plan(self) -> dict[int, torch.Tensor]:
        """Kept channels of every gated group (at least the channel with the largest ``m``)."""
        plan = {}
        for group in self.groups:
            values = self.aux.values[group.root].detach().cpu()
            keep = values > 0
            if not keep.any():
                keep[int(values.argmax())] = True
            plan[group.index] = keep.nonzero().flatten()
        return plan

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> SparsityReport:
        report = sparsity_report(pl_module, self.layers)
        extra = {"revived": float(self.revived), "switched_off": float(self.switched_off)}
        if report.total.nonzero:
            extra["compression"] = report.total.total / report.total.nonzero
        flops_ratio = self._flops_ratio(pl_module, report)
        if flops_ratio is not None and self.dense_flops:
            extra["flops_macs"] = flops_ratio * self.dense_flops
        log_pruning_event(
            trainer,
            report=report,
            flops_ratio=flops_ratio,
            histograms={f"aux/{key}": value.detach() for key, value in self.aux.values.items()},
            extra=extra,
        )
        return report

    # ------------------------------------------------------------------ end of fit
    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.aux is None:
            return
        report = self._log(trainer, pl_module)
        flops_ratio = self._flops_ratio(pl_module, report)
        plan = self._plan() if self.physical else None
        self._finish()
        if plan is not None:
            self.structure = apply_plan(pl_module, self.groups, plan, example_input(trainer, pl_module))
            rebuild_training_state(trainer)  # optimizer state of the new shapes in later checkpoints
        if self.verbose and trainer.is_global_zero:
            lines = ["AutoPrune summary", str(report)]
            if report.total.nonzero:
                lines.append(f"compression (total / non-zero): {report.total.total / report.total.nonzero:.2f}x")
            if flops_ratio is not None:
                lines.append(f"FLOPs (MACs) kept: {flops_ratio:.2%} of {self.dense_flops:,}")
            rank_zero_info("\n".join(lines))

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._finish()

    def _finish(self) -> None:
        """Masks made permanent; ``M``, its optimizer and the parametrizations leave the model."""
        if self.aux is not None:
            self.aux.detach()
        self.aux = None
        self._loader = self._iterator = None

    # ------------------------------------------------------------------ checkpoints
    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.structure is not None:
            checkpoint[STRUCTURE_KEY] = self.structure

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"aux": self.aux.state_dict() if self.aux is not None else None}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = state_dict.get("aux")
        if state is None or self.aux is None:
            return
        self.aux.load_state_dict(state)
        self._pending_optimizer = state["optimizer"]


def _default_loss(pl_module: pl.LightningModule, batch: Any) -> torch.Tensor:
    """The module's ``auxiliary_loss(batch)``, else cross-entropy of ``pl_module(batch[0])`` against ``batch[1]``."""
    if callable(getattr(pl_module, "auxiliary_loss", None)):
        return pl_module.auxiliary_loss(batch)
    inputs, targets = batch[0], batch[1]
    return F.cross_entropy(pl_module(inputs), targets)
