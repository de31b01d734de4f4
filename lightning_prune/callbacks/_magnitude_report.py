"""What ``IterativeMagnitude`` measures and reports: the example input, the dense FLOPs (fvcore) and, for
channel pruning, the FLOPs predictor of its groups; per pruning event the sparsity, FLOPs and channel
ratios; at the end of fit the summary table."""

from __future__ import annotations

from typing import Optional

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from lightning_prune.callbacks._module_io import ExampleInputFn, example_input
from lightning_prune.inputs import ModelInput
from lightning_prune.callbacks._shared import optional_flop_count
from lightning_prune.criteria import ChannelNorm, Granularity
from lightning_prune.flops import FlopCount, FlopsPredictor
from lightning_prune.loggers import log_pruning_event
from lightning_prune.magnitude import ChannelMagnitude, MagnitudePruner
from lightning_prune.pruner import Target
from lightning_prune.report import SparsityReport, nonzero_flops, pruning_summary, sparsity_report


class MagnitudeFigures:
    """The figures of one fit: ``example`` (one sample of the example input), ``dense_flops`` (fvcore, MACs per
    sample; ``None`` without a usable example), ``predictor`` (channel granularity), ``dense_parameters`` and
    ``dense_score`` (the monitored metric before the first event)."""

    def __init__(self, layers: list[str], monitor: Optional[str], dense_score: Optional[float] = None) -> None:
        self.layers, self.monitor = layers, monitor
        self.example: Optional[ModelInput] = None
        self.dense_flops: Optional[FlopCount] = None
        self.predictor: Optional[FlopsPredictor] = None
        self.dense_parameters = 0
        self.dense_score = dense_score

    def measure_dense(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        pruner: MagnitudePruner,
        granularity: Granularity,
        channel_norm: ChannelNorm,
        example_input_fn: Optional[ExampleInputFn],
    ) -> None:
        """The example input (the first training batch is loaded by now), dense FLOPs and, for channel
        granularity, the pruner's channel groups (unless it has them from an earlier fit) and their predictor."""
        self.dense_parameters = sum(p.numel() for p in pl_module.parameters())
        try:
            self.example = example_input(trainer, pl_module, example_input_fn).first_sample()
        except MisconfigurationException as error:
            if granularity == "channel":
                raise
            rank_zero_warn(f"FLOPs are not reported: no example input ({error}).")
        self.dense_flops = optional_flop_count(pl_module, self.example)
        if granularity == "channel":
            if pruner.channels is None:
                pruner.channels = ChannelMagnitude.for_model(pl_module, self.example, self.layers, channel_norm, pruner.max_layer_sparsity)
            self.predictor = FlopsPredictor(pl_module, self.example, pruner.channels.groups, self.dense_flops)

    def remember_dense_score(self, trainer: pl.Trainer) -> None:
        if self.monitor in trainer.callback_metrics:
            self.dense_score = float(trainer.callback_metrics[self.monitor])

    def pruned_flops(self, pruner: MagnitudePruner) -> Optional[int]:
        """MACs per sample of the channel plan's physically pruned model; element pruning leaves every
        multiplication in the model (zero weights still multiply), so its count is the dense one."""
        if self.dense_flops is None:
            return None
        return self.predictor.predict(pruner.plan) if self.predictor is not None else self.dense_flops.total

    def sparse_flops(self, report: SparsityReport) -> Optional[int]:
        """Element pruning: the MACs per sample a sparse kernel would run, skipping the zero weights."""
        return nonzero_flops(self.dense_flops, report) if self.dense_flops is not None and self.predictor is None else None

    def log_event(self, trainer: pl.Trainer, pl_module: pl.LightningModule, pruner: MagnitudePruner, target: Target) -> None:
        report = sparsity_report(pl_module, self.layers)
        flops, sparse = self.pruned_flops(pruner), self.sparse_flops(report)
        extra = {"target_sparsity": pruner.target_sparsity(target)}
        if sparse is not None:
            extra["sparse_flops_ratio"] = sparse / self.dense_flops.total
        log_pruning_event(trainer, report=report, flops_ratio=None if flops is None else flops / self.dense_flops.total,
                          channel_ratios=pruner.channel_ratios() or None, extra=extra)

    def summary(self, trainer: pl.Trainer, pl_module: pl.LightningModule, report: SparsityReport, flops: Optional[int],
                notes: list[str], removed: bool) -> None:
        """The end-of-fit table on global rank zero (``flops``: :meth:`pruned_flops`, taken before any removal;
        ``removed``: whether the zeroed channels were removed physically)."""
        if not trainer.is_global_zero:
            return
        score = trainer.callback_metrics.get(self.monitor) if self.monitor else None
        nonzero = sum(int(p.count_nonzero()) for p in pl_module.parameters())
        rank_zero_info(pruning_summary(
            "IterativeMagnitude summary", report, parameters=(self.dense_parameters, nonzero),
            flops=None if flops is None else (self.dense_flops.total, flops), sparse_flops=self.sparse_flops(report),
            flops_of="" if removed or self.predictor is None else "once apply_plan removes the zeroed channels",
            monitor=self.monitor, scores=(self.dense_score, None if score is None else float(score)), notes=notes,
        ))
