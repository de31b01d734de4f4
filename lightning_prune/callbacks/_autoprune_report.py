"""What ``AutoPruneCallback`` measures and reports: channel groups and FLOPs taken once on one sample, then
per epoch the device counters, sparsity, compression, FLOPs and the histograms of ``M``."""

from __future__ import annotations

from typing import Optional

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from lightning_prune.auxiliary import AuxiliaryParameters
from lightning_prune.callbacks._module_io import ExampleInputFn, example_input
from lightning_prune.inputs import ModelInput
from lightning_prune.callbacks._shared import optional_flop_count
from lightning_prune.criteria import Granularity
from lightning_prune.flops import FlopsPredictor
from lightning_prune.loggers import log_pruning_event
from lightning_prune.report import SparsityReport, nonzero_flops, pruning_summary, sparsity_report
from lightning_prune.structure import ChannelGroup, find_channel_groups


class AutoPruneFigures:
    """The example input (:func:`example_input`), and on one sample of it the channel groups to gate
    (``granularity="channel"``: the groups touching ``layers``, attention heads included; ``all_groups`` the
    model's) and the dense FLOPs (multiply-adds per sample;
    ``None``, with a warning, without a usable example: element pruning runs on); :meth:`log` reports one
    event. ``selection`` names the arguments that chose ``layers``."""

    def __init__(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        layers: list[str],
        granularity: Granularity,
        example_input_fn: Optional[ExampleInputFn],
        selection: str,
    ) -> None:
        self.example: Optional[ModelInput] = None
        try:
            self.example = example_input(trainer, pl_module, example_input_fn)
        except MisconfigurationException as error:
            if granularity == "channel":
                raise
            rank_zero_warn(f"AutoPruneCallback: FLOPs are not reported ({error}).")
        sample = None if self.example is None else self.example.first_sample()
        self.layers, self.groups, self.checked_step = layers, [], 0
        self.flop_count, self.flops_predictor = None, None
        if granularity == "channel":
            found = find_channel_groups(pl_module, sample, heads=True)  # a head's switch gates its q/k/v rows
            self.all_groups = found  # a plan's group indices are positions in this list
            self.groups: list[ChannelGroup] = [group for group in found if any(layer in layers for layer in group.layers)]
            if not self.groups:
                raise ValueError(f"{selection} selects no prunable channel group (the network's output layer is never channel-pruned).")
            self.flops_predictor = FlopsPredictor(pl_module, sample, found)
            self.dense_flops: Optional[int] = self.flops_predictor.dense
        else:
            self.flop_count = optional_flop_count(pl_module, sample)
            self.dense_flops = None if self.flop_count is None else self.flop_count.total

    def log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, aux: AuxiliaryParameters) -> tuple[SparsityReport, Optional[int]]:
        """Read the core's counters once (a skipped non-finite step stops the run) and log the event. Returns
        the sparsity report and the FLOPs (MACs per sample): the exact count of the channel plan's physically
        pruned model, or, for element pruning, the dense count (zero weights still multiply; what a sparse kernel
        would run is logged beside it as ``sparse_flops_*``)."""
        where = f"between global steps {self.checked_step} and {trainer.global_step} (epoch {trainer.current_epoch})"
        counts, self.checked_step = aux.take_counts(raise_nonfinite=where), trainer.global_step
        if counts["collapsed"]:
            rank_zero_warn("AutoPruneCallback: every channel of a channel group would have been switched off (a constant "
                           "output); the channel with the largest m was kept. Lower `reg` or `aux_lr` if this repeats.")
        report = sparsity_report(pl_module, self.layers)
        extra = {"revived": float(counts["revived"]), "switched_off": float(counts["switched_off"])}
        if report.total.nonzero:
            extra["compression"] = report.total.total / report.total.nonzero
        flops, flops_ratio = None, None
        if self.dense_flops:
            flops = self.flops_predictor.predict(aux.plan()) if self.flops_predictor else self.dense_flops
            flops_ratio, extra["flops_macs"] = flops / self.dense_flops, float(flops)
            sparse = self.sparse_flops(report)
            if sparse is not None:
                extra["sparse_flops_ratio"], extra["sparse_flops_macs"] = sparse / self.dense_flops, float(sparse)
        histograms = {f"aux/{key}": value.detach() for key, value in aux.values.items()}
        log_pruning_event(trainer, report=report, flops_ratio=flops_ratio, histograms=histograms, extra=extra)
        return report, flops

    def sparse_flops(self, report: SparsityReport) -> Optional[int]:
        """Element pruning: the MACs per sample a sparse kernel would run, skipping the zero weights."""
        return nonzero_flops(self.flop_count, report) if self.flop_count is not None else None

    def summary(self, trainer: pl.Trainer, report: SparsityReport, flops: Optional[int], notes: list[str], removed: bool) -> None:
        """The end-of-fit table, on global rank zero (``removed``: whether the switched-off channels were removed)."""
        if trainer.is_global_zero:
            rank_zero_info(pruning_summary(
                "AutoPrune summary", report, flops=None if flops is None else (self.dense_flops, flops),
                sparse_flops=self.sparse_flops(report), notes=notes,
                flops_of="" if removed or self.flops_predictor is None else "once apply_plan removes the switched-off channels",
            ))
