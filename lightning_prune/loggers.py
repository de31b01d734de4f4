"""One bridge from the core's numbers to the Trainer's loggers (any logger; once, on global rank zero).

Works with a ``pytorch_lightning.Trainer`` and a ``lightning.pytorch.Trainer`` alike: rank zero is
read from ``trainer.is_global_zero`` (never a namespace's ``rank_zero_only``), and a Weights & Biases
logger of either namespace is recognised.
"""

from __future__ import annotations

import sys
import weakref
from typing import TYPE_CHECKING, Any, Mapping, Optional

import torch

from lightning_prune.report import SparsityReport

if TYPE_CHECKING:
    import pytorch_lightning as pl

STRUCTURE_COLUMNS = ["event", "label", "epoch", "global_step", "layer_index", "layer", "channel_ratio"]

# Rows of every channel-ratio vector logged so far, per WandbLogger (the cumulative table behind the
# overlaid line plot). Weak keys: a finished logger takes its rows with it.
_structure_rows: "weakref.WeakKeyDictionary[Any, list[list[Any]]]" = weakref.WeakKeyDictionary()


def log_metrics(trainer: "pl.Trainer", metrics: Mapping[str, float]) -> None:
    """Send scalars to every logger of ``trainer`` at the current global step, on global rank zero only.

    Works in hooks where ``LightningModule.log`` is refused (``setup``, ``on_fit_start/end``).
    """
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        logger.log_metrics(dict(metrics), step=trainer.global_step)


def is_wandb_logger(logger: Any) -> bool:
    """Whether ``logger`` is a ``WandbLogger`` of ``pytorch_lightning`` or of ``lightning.pytorch``."""
    from pytorch_lightning.loggers import WandbLogger

    if isinstance(logger, WandbLogger):
        return True
    unified = sys.modules.get("lightning.pytorch.loggers.wandb")  # loaded whenever the unified package is in use
    return unified is not None and isinstance(logger, unified.WandbLogger)


def pruning_scalars(
    report: Optional[SparsityReport] = None,
    flops_ratio: Optional[float] = None,
    extra: Optional[Mapping[str, float]] = None,
    prefix: str = "prune/",
) -> dict[str, float]:
    """The scalars of one pruning event: ``<prefix>sparsity``, ``<prefix>sparsity/<layer>``,
    ``<prefix>flops_ratio`` and each ``extra`` key (prefixed unless it already starts with ``prefix``)."""
    scalars: dict[str, float] = report.as_metrics(prefix) if report is not None else {}
    if flops_ratio is not None:
        scalars[f"{prefix}flops_ratio"] = float(flops_ratio)
    for key, value in (extra or {}).items():
        scalars[key if key.startswith(prefix) else f"{prefix}{key}"] = float(value)
    return scalars


def log_pruning_event(
    trainer: "pl.Trainer",
    *,
    report: Optional[SparsityReport] = None,
    flops_ratio: Optional[float] = None,
    channel_ratios: Optional[Mapping[str, float]] = None,
    histograms: Optional[Mapping[str, torch.Tensor]] = None,
    extra: Optional[Mapping[str, float]] = None,
    prefix: str = "prune/",
) -> None:
    """Log one pruning event to every logger of ``trainer``, once, on global rank zero.

    Every logger gets the scalars of :func:`pruning_scalars` (total and per-layer sparsity of
    ``report``, ``<prefix>flops_ratio`` = pruned/dense FLOPs, ``extra``). A ``WandbLogger`` also gets,
    in the same history row:

    - ``<prefix>channel_ratios``: a ``wandb.Table`` (layer_index, layer, channel_ratio) of this
      event's channel-ratio vector (kept/original channels per layer, in model order);
    - ``<prefix>structure``: a line plot of every vector logged so far in the run, one line per
      event (``stroke`` = its label), so structures of different epochs overlay (and, in the
      wandb UI, those of different runs/seeds);
    - ``<prefix>structure_chart`` / ``<prefix>sparsity_chart``: bar-chart images of the structure
      and of the per-layer sparsity;
    - ``<prefix>hist/<name>``: a ``wandb.Histogram`` of each tensor of ``histograms`` (gate or
      auxiliary-parameter values).

    Other loggers (CSV, TensorBoard, ...) get the channel ratios as scalars
    ``<prefix>channel_ratio/<layer>`` instead, and skip the wandb-only objects quietly.
    """
    if not trainer.is_global_zero or not trainer.loggers:
        return
    scalars = pruning_scalars(report, flops_ratio, extra, prefix)
    ratio_scalars = {f"{prefix}channel_ratio/{layer}": float(r) for layer, r in (channel_ratios or {}).items()}
    for logger in trainer.loggers:
        if is_wandb_logger(logger):
            objects = _wandb_objects(logger, trainer, report, channel_ratios, histograms, prefix)
            logger.log_metrics({**scalars, **objects}, step=trainer.global_step)
        elif scalars or ratio_scalars:
            logger.log_metrics({**scalars, **ratio_scalars}, step=trainer.global_step)


def _wandb_objects(
    logger: Any,
    trainer: "pl.Trainer",
    report: Optional[SparsityReport],
    channel_ratios: Optional[Mapping[str, float]],
    histograms: Optional[Mapping[str, torch.Tensor]],
    prefix: str,
) -> dict[str, Any]:
    import wandb

    from lightning_prune.plots import channel_ratio_figure, sparsity_figure

    objects: dict[str, Any] = {}
    if report is not None and report.layers:
        objects[f"{prefix}sparsity_chart"] = wandb.Image(sparsity_figure(report))
    if channel_ratios:
        epoch, step = trainer.current_epoch, trainer.global_step
        rows = list(enumerate(channel_ratios.items()))
        objects[f"{prefix}channel_ratios"] = wandb.Table(
            columns=["layer_index", "layer", "channel_ratio"], data=[[i, layer, float(r)] for i, (layer, r) in rows]
        )
        history = _structure_rows.setdefault(logger, [])
        event = 1 + (history[-1][0] if history else -1)
        label = f"epoch {epoch} (step {step})"
        history.extend([event, label, epoch, step, i, layer, float(r)] for i, (layer, r) in rows)
        objects[f"{prefix}structure"] = wandb.plot.line(
            wandb.Table(columns=STRUCTURE_COLUMNS, data=[list(row) for row in history]),
            x="layer_index",
            y="channel_ratio",
            stroke="label",
            title="Channel-ratio vector per pruning event",
        )
        objects[f"{prefix}structure_chart"] = wandb.Image(channel_ratio_figure(channel_ratios))
    for name, values in (histograms or {}).items():
        objects[f"{prefix}hist/{name}"] = wandb.Histogram(values.detach().float().cpu().flatten().numpy())
    return objects
