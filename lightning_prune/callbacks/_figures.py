"""``Figures``: what a pruning callback measures on the dense model and reports, one way for all three.

Measured once (:meth:`Figures.measure`): one sample of the example input, the dense parameter count and fvcore's
FLOPs (multiply-adds per sample); with channel groups (:meth:`Figures.predict_with`) the exact FLOPs predictor of
any channel plan. Reported: each event to the loggers (:meth:`Figures.log`: sparsity, FLOPs, channel ratios,
histograms) and the end-of-fit table (:meth:`Figures.summary`).
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from lightning_prune.callbacks._module_io import ExampleInputFn, example_input
from lightning_prune.flops import FlopCount, FlopsPredictor, count_flops
from lightning_prune.inputs import ModelInput
from lightning_prune.loggers import log_pruning_event
from lightning_prune.report import SparsityReport, nonzero_flops, pruning_summary, sparsity_report
from lightning_prune.structure import ChannelGroup, ChannelPlan


class Figures:
    """The figures of one fit for the callback ``title``: ``example`` (one sample), ``dense_parameters``,
    ``dense_flops`` (fvcore; ``None`` without a usable example), ``groups`` and ``predictor`` (channel plans),
    ``dense_score`` (the ``monitor`` metric before the first event). ``layers``: the pruned layers (their
    weight sparsity is reported; none: no sparsity table)."""

    def __init__(self, title: str, layers: Sequence[str] = (), monitor: Optional[str] = None, dense_score: Optional[float] = None) -> None:
        self.title, self.layers, self.monitor, self.dense_score = title, list(layers), monitor, dense_score
        self.example: Optional[ModelInput] = None
        self.dense_parameters = 0
        self.dense_flops: Optional[FlopCount] = None
        self.groups: list[ChannelGroup] = []
        self.predictor: Optional[FlopsPredictor] = None

    def measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, example_input_fn: Optional[ExampleInputFn], required: bool
    ) -> None:
        """The example input and the dense counts. Without ``required`` (element pruning needs no FLOPs) a missing
        example input or a model fvcore cannot trace warns and leaves ``dense_flops`` at ``None``."""
        self.dense_parameters = sum(p.numel() for p in pl_module.parameters())
        try:
            self.example = example_input(trainer, pl_module, example_input_fn).first_sample()
            self.dense_flops = count_flops(pl_module, self.example)
        except Exception as error:  # noqa: BLE001 - any failure only costs the FLOPs figures
            if required:
                raise
            why = "no example input" if isinstance(error, MisconfigurationException) else "fvcore could not trace the model on its example input"
            rank_zero_warn(f"{self.title}: FLOPs are not reported: {why} ({error}).")

    def predict_with(self, pl_module: pl.LightningModule, groups: Sequence[ChannelGroup]) -> None:
        """The exact FLOPs of channel plans over ``groups`` (a plan's group indices are positions in it)."""
        self.groups = list(groups)
        self.predictor = FlopsPredictor(pl_module, self.example, self.groups, self.dense_flops)

    def flops(self, plan: Optional[ChannelPlan]) -> Optional[int]:
        """MACs per sample of ``plan``'s physically pruned model; element pruning (no predictor) leaves every
        multiplication in the model (zero weights still multiply), so its count is the dense one."""
        if self.dense_flops is None:
            return None
        return self.predictor.predict(plan) if self.predictor is not None and plan is not None else self.dense_flops.total

    def sparse_flops(self, report: Optional[SparsityReport]) -> Optional[int]:
        """Element pruning: the MACs per sample a sparse kernel would run, skipping the zero weights."""
        if report is None or self.dense_flops is None or self.predictor is not None:
            return None
        return nonzero_flops(self.dense_flops, report)

    def log(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        plan: Optional[ChannelPlan] = None,
        *,
        flops: Optional[int] = None,
        channel_ratios: Optional[Mapping[str, float]] = None,
        histograms: Optional[Mapping[str, torch.Tensor]] = None,
        extra: Optional[Mapping[str, float]] = None,
    ) -> tuple[Optional[SparsityReport], Optional[int]]:
        """Log one event: the layers' sparsity and compression, the FLOPs of ``plan`` (or ``flops`` when the caller
        counted them) as ``flops_ratio``/``flops_macs``, the sparse-kernel FLOPs, ``channel_ratios``, ``histograms``
        and ``extra``. Returns the sparsity report and the FLOPs."""
        report = sparsity_report(pl_module, self.layers) if self.layers else None
        flops = self.flops(plan) if flops is None else flops
        scalars = dict(extra or {})
        if report is not None and report.total.nonzero:
            scalars["compression"] = report.total.total / report.total.nonzero
        ratio = None
        if flops is not None and self.dense_flops is not None:
            ratio, scalars["flops_macs"] = flops / self.dense_flops.total, float(flops)
            sparse = self.sparse_flops(report)
            if sparse is not None:
                scalars["sparse_flops_ratio"], scalars["sparse_flops_macs"] = sparse / self.dense_flops.total, float(sparse)
        log_pruning_event(trainer, report=report, flops_ratio=ratio, channel_ratios=channel_ratios or None,
                          histograms=histograms, extra=scalars)
        return report, flops

    def summary(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        report: Optional[SparsityReport],
        flops: Optional[int],
        *,
        removed: bool,
        notes: Sequence[str] = (),
        facts: Sequence[str] = (),
        channels: Sequence[tuple[str, int, int]] = (),
        kept: str = "non-zero",
    ) -> None:
        """The end-of-fit table on global rank zero (``flops``: of the pruned model, taken before any removal;
        ``removed``: whether the channels were removed physically; ``kept``: what the parameter count after the
        arrow counts)."""
        if not trainer.is_global_zero:
            return
        score = trainer.callback_metrics.get(self.monitor) if self.monitor else None
        counted = (lambda p: p.numel()) if kept == "remaining" else (lambda p: int(p.count_nonzero()))
        parameters = (self.dense_parameters, sum(counted(p) for p in pl_module.parameters()))
        rank_zero_info(pruning_summary(
            f"{self.title} summary", report, channels=channels, parameters=parameters, kept=kept,
            flops=None if flops is None or self.dense_flops is None else (self.dense_flops.total, flops),
            sparse_flops=self.sparse_flops(report), monitor=self.monitor, facts=facts, notes=notes,
            flops_of="" if removed or self.predictor is None else "once apply_plan removes the zeroed channels",
            scores=(self.dense_score, None if score is None else float(score)),
        ))
