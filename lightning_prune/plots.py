"""PNG figures of what pruning did: per-layer sparsity, the channel-ratio vector, sensitivity curves and
the structure-correlation heat map.

Every picture comes as a pair: ``<name>_figure(...)`` builds a :class:`matplotlib.figure.Figure`
(for ``wandb.Image`` or further styling) and ``plot_<name>(..., path)`` writes it as a PNG and
returns the path. Figures are drawn on matplotlib's Agg canvas without ``pyplot``, so no display and
no global figure state are involved; the constrained layout keeps long layer names inside the image
(also when ``wandb.Image`` saves the figure itself).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence, Union

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lightning_prune.report import SparsityReport

PathLike = Union[str, Path]
#: A structure (``{layer: kept/original channels}``) or several, keyed by a label (epoch, seed, ...).
ChannelRatios = Union[Mapping[str, float], Mapping[str, Mapping[str, float]]]


def _figure(n_items: int, height: float = 3.6) -> Figure:
    figure = Figure(figsize=(min(18.0, max(5.0, 0.32 * n_items + 2.0)), height), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Figure, path: PathLike) -> Path:
    """Write ``figure`` as a PNG (parent folders are created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", bbox_inches="tight")
    return path


def _layer_ticks(axes, labels: Sequence[str]) -> None:
    axes.set_xticks(range(len(labels)))
    axes.set_xticklabels(labels, rotation=60 if len(labels) > 4 else 0, ha="right" if len(labels) > 4 else "center", fontsize=8)
    axes.set_xlim(-0.6, len(labels) - 0.4)


# ---------------------------------------------------------------------------- per-layer sparsity
def sparsity_figure(report: Union[SparsityReport, Mapping[str, float]], title: str = "Per-layer sparsity") -> Figure:
    """Bar chart of each layer's sparsity (zeros / weights), with the total as a dashed line."""
    if isinstance(report, SparsityReport):
        values = {row.layer: row.sparsity for row in report.layers}
        total = report.sparsity
    else:
        values = dict(report)
        total = None
    figure = _figure(len(values))
    axes = figure.add_subplot()
    axes.bar(range(len(values)), list(values.values()), color="#4c72b0")
    if total is not None:
        axes.axhline(total, color="#c44e52", linestyle="--", linewidth=1, label=f"total {total:.1%}")
        axes.legend(loc="lower right", fontsize=8)
    _layer_ticks(axes, list(values))
    axes.set_ylim(0, 1)
    axes.set_ylabel("sparsity (zeros / weights)")
    axes.set_title(title)
    axes.grid(axis="y", alpha=0.3)
    return figure


def plot_sparsity(report: Union[SparsityReport, Mapping[str, float]], path: PathLike, title: str = "Per-layer sparsity") -> Path:
    """Write :func:`sparsity_figure` as a PNG; returns ``path``."""
    return save_figure(sparsity_figure(report, title), path)


# ---------------------------------------------------------------------------- channel-ratio vector
def _as_structures(ratios: ChannelRatios) -> dict[str, dict[str, float]]:
    first = next(iter(ratios.values()), None)
    if isinstance(first, Mapping):
        return {str(label): dict(structure) for label, structure in ratios.items()}
    return {"": dict(ratios)}


def channel_ratio_figure(ratios: ChannelRatios, title: str = "Channel-ratio vector (kept / original channels)") -> Figure:
    """The structure vector of Pruning from Scratch: kept/original channels per layer, in model order.

    One structure is drawn as bars; several (``{label: {layer: ratio}}``, e.g. per epoch or seed) as
    overlaid lines so their shapes can be compared.
    """
    structures = _as_structures(ratios)
    layers = list(dict.fromkeys(layer for structure in structures.values() for layer in structure))
    figure = _figure(len(layers))
    axes = figure.add_subplot()
    if len(structures) == 1:
        (structure,) = structures.values()
        axes.bar(range(len(layers)), [structure.get(layer, np.nan) for layer in layers], color="#55a868")
    else:
        for label, structure in structures.items():
            axes.plot(range(len(layers)), [structure.get(layer, np.nan) for layer in layers], marker="o", markersize=3, label=label)
        axes.legend(fontsize=8, ncol=max(1, len(structures) // 8))
    _layer_ticks(axes, layers)
    axes.set_ylim(0, 1.05)
    axes.set_ylabel("kept / original channels")
    axes.set_title(title)
    axes.grid(axis="y", alpha=0.3)
    return figure


def plot_channel_ratios(ratios: ChannelRatios, path: PathLike, title: str = "Channel-ratio vector (kept / original channels)") -> Path:
    """Write :func:`channel_ratio_figure` as a PNG; returns ``path``."""
    return save_figure(channel_ratio_figure(ratios, title), path)


# ---------------------------------------------------------------------------- sensitivity curves
def sensitivity_figure(
    table: Mapping[str, Mapping[float, float]], metric: str = "accuracy", baseline: Union[float, None] = None,
    title: str = "Sensitivity: each layer pruned alone",
) -> Figure:
    """One curve per layer: the metric when only that layer is pruned to each sparsity level."""
    figure = Figure(figsize=(7.0, 4.4), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for layer, row in table.items():
        levels = sorted(row)
        axes.plot(levels, [row[level] for level in levels], marker="o", markersize=3, label=layer)
    if baseline is not None:
        axes.axhline(baseline, color="black", linestyle=":", linewidth=1, label=f"dense {baseline:.3f}")
    axes.set_xlabel("sparsity of the layer (zeros / weights)")
    axes.set_ylabel(metric)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="lower left", ncol=max(1, len(table) // 10))
    return figure


def plot_sensitivity(
    table: Mapping[str, Mapping[float, float]], path: PathLike, metric: str = "accuracy", baseline: Union[float, None] = None,
    title: str = "Sensitivity: each layer pruned alone",
) -> Path:
    """Write :func:`sensitivity_figure` as a PNG; returns ``path``."""
    return save_figure(sensitivity_figure(table, metric, baseline, title), path)


# ---------------------------------------------------------------------------- structure correlation
def structure_correlation_figure(
    matrix: Union[np.ndarray, torch.Tensor, Sequence[Sequence[float]]], labels: Sequence[str],
    title: str = "Correlation of channel-ratio vectors",
) -> Figure:
    """Heat map of a correlation matrix between structures (Pearson r in [-1, 1]), values printed in the cells."""
    values = np.asarray(matrix.detach().cpu() if isinstance(matrix, torch.Tensor) else matrix, dtype=float)
    if values.ndim != 2 or values.shape[0] != values.shape[1] or values.shape[0] != len(labels):
        raise ValueError(f"`matrix` must be square with one row per label ({len(labels)}), got shape {values.shape}.")
    side = min(12.0, max(4.0, 0.55 * len(labels) + 2.0))
    figure = Figure(figsize=(side + 1.0, side), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(values, cmap="RdBu_r", vmin=-1, vmax=1)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="correlation")
    axes.set_xticks(range(len(labels)))
    axes.set_yticks(range(len(labels)))
    axes.set_xticklabels(labels, rotation=60, ha="right", fontsize=8)
    axes.set_yticklabels(labels, fontsize=8)
    if len(labels) <= 16:
        for i in range(len(labels)):
            for j in range(len(labels)):
                axes.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=7,
                          color="white" if abs(values[i, j]) > 0.6 else "black")
    axes.set_title(title)
    return figure


def plot_structure_correlation(
    matrix: Union[np.ndarray, torch.Tensor, Sequence[Sequence[float]]], labels: Sequence[str], path: PathLike,
    title: str = "Correlation of channel-ratio vectors",
) -> Path:
    """Write :func:`structure_correlation_figure` as a PNG; returns ``path``."""
    return save_figure(structure_correlation_figure(matrix, labels, title), path)
