"""``IterativeMagnitude``: magnitude pruning on a schedule (Han et al. 2015; Distiller; Zhu & Gupta's AGP)."""

from __future__ import annotations

from typing import Any, Literal, Mapping, Optional, Union

import pytorch_lightning as pl
import torch
from jsonargparse.typing import NonNegativeFloat
from pytorch_lightning.utilities import rank_zero_info
from typing_extensions import override

from lightning_prune import criteria
from lightning_prune.callbacks._channels import ChannelPruning
from lightning_prune.callbacks._strategy import prepare_module
from lightning_prune.callbacks._shared import (
    Fraction,
    check_choice,
    check_range,
    check_keys,
    example_input,
    find_example_input,
    optional_flop_count,
)
from lightning_prune.flops import FlopCount
from lightning_prune.loggers import log_pruning_event
from lightning_prune.masks import MaskSet
from lightning_prune.report import SparsityReport, nonzero_flops, pruning_summary, sparsity_report
from lightning_prune.schedules import SCHEDULES, PruningSchedule, ScheduleKind
from lightning_prune.structure import STRUCTURE_KEY, StructureRecord
from lightning_prune.targets import select_modules, weight_names
from lightning_prune.training_state import rebuild_training_state

PerLayer = Union[Fraction, dict[str, Fraction]]
Sensitivity = Union[NonNegativeFloat, dict[str, NonNegativeFloat]]


class IterativeMagnitude(pl.Callback):
    r"""Prune Conv/Linear weights by magnitude on a one-shot, iterative or AGP schedule.

    At each pruning event (the start of an epoch of the schedule) the weights with the lowest
    importance are masked so that the pruned fraction equals ``fraction(epoch) · sparsity``
    *exactly* (absolute targets, never compounded). Masked weights are written as zeros, their
    gradients are zeroed before every optimizer step and the zeros are re-written after it, so
    they stay exactly zero through momentum, weight decay, AMP and gradient accumulation.

    Args:
        sparsity: final fraction of exactly-zero weights among the pruned weights, in [0, 1);
            with ``scope="layer"`` also a mapping ``{module name: sparsity}`` (unnamed layers: 0).
        schedule: ``"one_shot"`` (prune once at ``start_epoch``, then fine-tune), ``"iterative"``
            (equal steps) or ``"agp"`` (Zhu & Gupta's cubic schedule).
        start_epoch: first pruning epoch (pruning happens at the start of the epoch).
        end_epoch: last pruning epoch; ``None`` = halfway between ``start_epoch`` and the end of
            training (one-shot: ``start_epoch``). Must be before ``max_epochs``.
        frequency: epochs between pruning events; ``end_epoch - start_epoch`` must be a multiple.
        scope: ``"global"`` (one threshold over all pruned weights) or ``"layer"`` (each layer to
            the same sparsity, Distiller's Level pruner).
        criterion: ``"magnitude"`` (|w|) or ``"sensitivity"`` (Distiller's Sensitivity pruner:
            drop |w| < λ_l = s_l·σ_l with σ_l the std of the dense layer; the schedule scales s).
        sensitivity: ``s`` of the sensitivity criterion: one number or ``{module name: s}``.
        granularity: ``"element"`` (single weights) or ``"channel"`` (whole output channels of
            coupled channel groups ranked by ``channel_norm``; the network's outputs never go).
        channel_norm: ``"l1"`` or ``"l2"`` norm of a channel's weights.
        parameters: glob patterns of module names to prune (default: every Conv/Linear).
        exclude: glob patterns of module names never to prune.
        rewind: ``None``; ``"init"`` (lottery ticket: surviving weights back to their initial
            values after each pruning event) or an epoch ``k <= start_epoch`` (rewind to epoch k).
        make_permanent: at the end of fit drop the masks (the weights keep their zeros); ``False``
            keeps enforcing the masks in a further ``fit``.
        physical: with ``granularity="channel"``, remove the zeroed channels at the end of fit.
        monitor: metric compared dense vs pruned in the final summary.
        verbose: print the summary table at the end of fit.
    """

    def __init__(
        self,
        sparsity: PerLayer = 0.5,
        schedule: ScheduleKind = "agp",
        start_epoch: int = 0,
        end_epoch: Optional[int] = None,
        frequency: int = 1,
        scope: Literal["global", "layer"] = "global",
        criterion: Literal["magnitude", "sensitivity"] = "magnitude",
        sensitivity: Optional[Sensitivity] = None,
        granularity: Literal["element", "channel"] = "element",
        channel_norm: Literal["l1", "l2"] = "l1",
        parameters: Optional[list[str]] = None,
        exclude: Optional[list[str]] = None,
        rewind: Union[Literal["init"], int, None] = None,
        make_permanent: bool = True,
        physical: bool = False,
        monitor: Optional[str] = "val/acc",
        verbose: bool = True,
    ) -> None:
        super().__init__()
        check_range("sparsity", sparsity)
        check_choice("schedule", schedule, SCHEDULES)
        check_choice("scope", scope, ("global", "layer"))
        check_choice("criterion", criterion, ("magnitude", "sensitivity"))
        check_choice("granularity", granularity, ("element", "channel"))
        check_choice("channel_norm", channel_norm, ("l1", "l2"))
        if isinstance(sparsity, Mapping) and scope != "layer":
            raise ValueError(f"A per-layer `sparsity` mapping needs `scope`='layer', got {scope!r}.")
        if criterion == "sensitivity":
            if sensitivity is None:
                raise ValueError("`criterion`='sensitivity' needs `sensitivity` (s of the threshold λ = s·σ), got None.")
            check_range("sensitivity", sensitivity, 0.0, float("inf"))
            if granularity != "element":
                raise ValueError(f"`criterion`='sensitivity' thresholds single weights: `granularity` must be 'element', got {granularity!r}.")
        elif sensitivity is not None:
            raise ValueError(f"`sensitivity` is only used with `criterion`='sensitivity', got `criterion`={criterion!r}.")
        if end_epoch is not None:
            PruningSchedule(schedule, start_epoch, end_epoch, frequency)  # validates the combination
        elif start_epoch < 0 or frequency < 1:
            PruningSchedule(schedule, start_epoch, max(start_epoch, 0), frequency)
        if rewind is not None and rewind != "init" and (isinstance(rewind, bool) or not isinstance(rewind, int) or not 0 <= rewind <= start_epoch):
            raise ValueError(f"`rewind` must be None, 'init' or an epoch in [0, start_epoch={start_epoch}], got {rewind!r}.")
        if physical and granularity != "channel":
            raise ValueError(f"`physical`=True removes channels: it needs `granularity`='channel', got {granularity!r}.")
        if physical and not make_permanent:
            raise ValueError("`physical`=True needs `make_permanent`=True.")
        self.sparsity = sparsity
        self.schedule_kind = schedule
        self.start_epoch = start_epoch
        self.end_epoch = end_epoch
        self.frequency = frequency
        self.scope = scope
        self.criterion = criterion
        self.sensitivity = sensitivity
        self.granularity = granularity
        self.channel_norm = channel_norm
        self.parameters = parameters
        self.exclude = exclude
        self.rewind = rewind
        self.make_permanent = make_permanent
        self.physical = physical
        self.monitor = monitor
        self.verbose = verbose

        self.schedule: Optional[PruningSchedule] = None
        self.masks: Optional[MaskSet] = None
        self.layers: list[str] = []
        self.last_event_epoch = -1
        self.sigmas: dict[str, float] = {}
        self.rewind_state: Optional[dict[str, torch.Tensor]] = None
        self.dense_score: Optional[float] = None
        self.channels: Optional[ChannelPruning] = None  # set up for granularity="channel"
        self.example: Optional[torch.Tensor] = None
        self.dense_flops: Optional[FlopCount] = None
        self.dense_parameters = 0
        self.structure: Optional[StructureRecord] = None
        self._stepped = False  # an optimizer step ran since the zeros were last written

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            sparsity=self.sparsity, schedule=self.schedule_kind, granularity=self.granularity, parameters=self.parameters
        )

    # ------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        prepare_module(trainer, pl_module, "IterativeMagnitude", physical=self.physical)
        self.schedule = PruningSchedule(self.schedule_kind, self.start_epoch, self._resolve_end_epoch(trainer), self.frequency)
        modules = select_modules(pl_module, self.parameters, self.exclude)
        self.layers = list(modules)
        for name, value in (("sparsity", self.sparsity), ("sensitivity", self.sensitivity)):
            if isinstance(value, Mapping):
                check_keys(name, value, self.layers)
        # channel pruning traces the model (an example input is required); element pruning only reports FLOPs
        self.example = (example_input if self.granularity == "channel" else find_example_input)(trainer, pl_module)
        # shapes are dense until the end of fit, so these are the dense reference even when resuming
        self.dense_parameters = sum(p.numel() for p in pl_module.parameters())
        self.dense_flops = optional_flop_count(pl_module, self.example)
        if self.granularity == "channel":
            self.channels = ChannelPruning(pl_module, self.example, modules, self.channel_norm, self.dense_flops)
        if self.masks is None or self.masks.model is not pl_module:
            self.masks = MaskSet(pl_module)

    def _resolve_end_epoch(self, trainer: pl.Trainer) -> int:
        max_epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs >= 0 else None
        end = self.end_epoch
        if end is None:
            if self.schedule_kind == "one_shot" or max_epochs is None:
                end = self.start_epoch
            else:
                span = max(0, (max_epochs - self.start_epoch) // 2)
                end = self.start_epoch + span - span % self.frequency
        if max_epochs is not None and end >= max_epochs:
            raise ValueError(
                f"`end_epoch` ({end}) must be before the Trainer's `max_epochs` ({max_epochs}), "
                "or the final `sparsity` is never reached."
            )
        return end

    # ------------------------------------------------------------------ schedule
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.rewind == "init" and self.rewind_state is None:
            self.rewind_state = _snapshot(pl_module)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if self.rewind == epoch and self.rewind_state is None:
            self.rewind_state = _snapshot(pl_module)
        fraction = self.schedule.fraction(epoch)
        if fraction is None or epoch <= self.last_event_epoch:
            return
        if self.last_event_epoch < 0 and self.monitor in trainer.callback_metrics:
            self.dense_score = float(trainer.callback_metrics[self.monitor])
        masks = trainer.strategy.broadcast(self._compute_masks(pl_module, fraction), src=0)
        self.masks.update(masks)
        self.masks.apply_to_optimizer_state(trainer.optimizers)
        if self.rewind_state is not None:
            _restore(pl_module, self.rewind_state)
            self.masks.apply_to_weights()
        self.last_event_epoch = epoch
        report = sparsity_report(pl_module, self.layers)
        log_pruning_event(
            trainer,
            report=report,
            flops_ratio=None if self.dense_flops is None else self._pruned_flops(report) / self.dense_flops.total,
            channel_ratios=None if self.channels is None else self.channels.channel_ratios(),
            extra={"target_sparsity": self._target_sparsity(fraction)},
        )

    def _pruned_flops(self, report: SparsityReport) -> int:
        """Physical FLOPs of the channel plan, or the FLOPs left when zero weights are skipped."""
        if self.channels is not None:
            return self.channels.flops()
        return nonzero_flops(self.dense_flops, report)

    def _target_sparsity(self, fraction: float) -> float:
        if self.criterion == "sensitivity":
            return float("nan")
        if isinstance(self.sparsity, Mapping):
            total = {name: self.masks.model.get_submodule(name).weight.numel() for name in self.layers}
            zeros = sum(self.sparsity.get(name, 0.0) * n for name, n in total.items())
            return fraction * zeros / sum(total.values())
        return fraction * self.sparsity

    def _layer_targets(self, value: PerLayer, fraction: float) -> dict[str, float]:
        if isinstance(value, Mapping):
            return {name: fraction * value.get(name, 0.0) for name in self.layers}
        return {name: fraction * value for name in self.layers}

    def _compute_masks(self, pl_module: pl.LightningModule, fraction: float) -> dict[str, torch.Tensor]:
        if self.granularity == "channel":
            targets = self._layer_targets(self.sparsity, fraction) if self.scope == "layer" else fraction * self.sparsity
            return self.channels.masks(targets)
        names = weight_names(self.layers)
        weights = {name: pl_module.get_parameter(name) for name in names}
        if self.criterion == "sensitivity":
            if not self.sigmas:
                self.sigmas = {name: float(w.detach().float().std()) for name, w in weights.items()}
            s = self._layer_targets(self.sensitivity, fraction)
            masks = criteria.sensitivity_masks(weights, self.sigmas, {f"{k}.weight": v for k, v in s.items()})
        elif self.scope == "global":
            masks = criteria.global_magnitude_masks(weights, fraction * self.sparsity)
        else:
            s = self._layer_targets(self.sparsity, fraction)
            masks = criteria.layer_magnitude_masks(weights, {f"{k}.weight": v for k, v in s.items()})
        previous = self.masks.masks
        return {name: mask & previous[name].cpu() if name in previous else mask for name, mask in masks.items()}

    # ------------------------------------------------------------------ keeping zeros
    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self.masks:
            self.masks.apply_to_grads()
            self._stepped = True

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._stepped:
            self._stepped = False
            self.masks.apply_to_weights()

    # ------------------------------------------------------------------ end of fit
    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.masks:
            return
        report = sparsity_report(pl_module, self.layers)
        flops = None if self.dense_flops is None else (self.dense_flops.total, self._pruned_flops(report))
        if self.make_permanent:
            if self.physical:
                self.structure = self.channels.remove(pl_module)
                rebuild_training_state(trainer)  # optimizer state of the new shapes in later checkpoints
            self.masks = None
            self.last_event_epoch = -1
        if self.verbose and trainer.is_global_zero:
            score = trainer.callback_metrics.get(self.monitor) if self.monitor else None
            nonzero = sum(int(p.count_nonzero()) for p in pl_module.parameters())
            rank_zero_info(
                pruning_summary(
                    "IterativeMagnitude summary",
                    report,
                    (self.dense_parameters, nonzero),
                    flops,
                    self.monitor,
                    (self.dense_score, None if score is None else float(score)),
                )
            )

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.structure is not None:
            checkpoint[STRUCTURE_KEY] = self.structure

    # ------------------------------------------------------------------ checkpoints
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "masks": self.masks.state_dict() if self.masks else {},
            "last_event_epoch": self.last_event_epoch,
            "sigmas": dict(self.sigmas),
            "rewind_state": self.rewind_state,
            "dense_score": self.dense_score,
            "plan": self.channels.plan if self.channels is not None else {},
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_event_epoch = state_dict["last_event_epoch"]
        self.sigmas = dict(state_dict["sigmas"])
        self.rewind_state = state_dict["rewind_state"]
        self.dense_score = state_dict["dense_score"]
        if self.channels is not None:
            self.channels.plan = dict(state_dict["plan"])
        if self.masks is not None:
            self.masks.load_state_dict(state_dict["masks"])


def _snapshot(pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().clone() for name, p in pl_module.named_parameters()}


@torch.no_grad()
def _restore(pl_module: pl.LightningModule, state: dict[str, torch.Tensor]) -> None:
    for name, parameter in pl_module.named_parameters():
        parameter.copy_(state[name])
