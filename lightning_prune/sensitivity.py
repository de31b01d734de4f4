"""Sensitivity analysis: prune one layer at a time and watch the metric (Han et al. 2015; Distiller).

For each Conv/Linear layer alone and each sparsity level, the layer's smallest-|w| weights are set
to zero (the same ``lowest_k_mask`` the callbacks use), the model is evaluated, and the layer is
restored bit-exactly. The resulting table (layer × level → metric) shows which layers tolerate
pruning, and proposes per-layer targets for an allowed drop of the metric that feed
``IterativeMagnitude(scope="layer", sparsity=...)`` or
``IterativeMagnitude(criterion="sensitivity", sensitivity=...)`` directly.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import torch
from torch import nn
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy
from tqdm.auto import tqdm

from lightning_prune.criteria import count_to_prune, layer_magnitude_masks
from lightning_prune.modes import eval_mode
from lightning_prune.targets import select_modules

DEFAULT_LEVELS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


@dataclass(frozen=True)
class SensitivityTable:
    """Metric of the model with one layer pruned to each level (``scores[layer][level]``).

    ``baseline`` is the unpruned model's metric; ``thresholds[layer][level]`` is the s of Distiller's
    threshold λ = s·σ (σ the std of the layer's weights) that drops the same weights as the level.
    """

    levels: list[float]
    baseline: float
    scores: dict[str, dict[float, float]]
    thresholds: dict[str, dict[float, float]]
    metric: str = "accuracy"
    higher_is_better: bool = True
    layers: list[str] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", list(self.scores))

    def drop(self, layer: str, level: float) -> float:
        """How much worse than the baseline the metric is with ``layer`` alone at ``level`` (≥ 0 is worse)."""
        change = self.baseline - self.scores[layer][level]
        return change if self.higher_is_better else -change

    def tolerated_level(self, layer: str, max_drop: float) -> float:
        """The highest level such that this and every lower level stay within ``max_drop`` of the
        baseline (0.0 when even the lowest level costs more)."""
        best = 0.0
        for level in self.levels:
            if self.drop(layer, level) > max_drop:
                break
            best = level
        return best

    def propose_sparsity(self, max_drop: float) -> dict[str, float]:
        """Per-layer sparsity for ``IterativeMagnitude(scope="layer", sparsity=...)``: the most each
        layer tolerates alone within ``max_drop`` (layers pruned together may cost more; fine-tune)."""
        _check_drop(max_drop)
        return {layer: self.tolerated_level(layer, max_drop) for layer in self.layers}

    def propose_sensitivity(self, max_drop: float) -> dict[str, float]:
        """Per-layer s for ``IterativeMagnitude(criterion="sensitivity", sensitivity=...)``: the s·σ
        threshold that drops the weights of :meth:`propose_sparsity`'s level (s = λ/σ, λ between the
        k-th and (k+1)-th smallest |w| of the analysed weights; 0 for a level of 0)."""
        _check_drop(max_drop)
        proposal = {}
        for layer in self.layers:
            level = self.tolerated_level(layer, max_drop)
            proposal[layer] = self.thresholds[layer][level] if level > 0 else 0.0
        return proposal

    def rows(self) -> list[dict[str, Any]]:
        """One row per (layer, level): layer, sparsity, metric, drop, s."""
        return [
            {"layer": layer, "sparsity": level, self.metric: self.scores[layer][level],
             "drop": self.drop(layer, level), "s": self.thresholds[layer][level]}
            for layer in self.layers
            for level in self.levels
        ]

    def to_csv(self, path: Union[str, Path]) -> Path:
        """Write :meth:`rows` as CSV (plus a ``dense`` row with the baseline); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        columns = ["layer", "sparsity", self.metric, "drop", "s"]
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerow({"layer": "dense", "sparsity": 0.0, self.metric: self.baseline, "drop": 0.0, "s": 0.0})
            writer.writerows(self.rows())
        return path

    def plot(self, path: Union[str, Path]) -> Path:
        """Sensitivity curves as a PNG (see :func:`lightning_prune.plots.plot_sensitivity`)."""
        from lightning_prune.plots import plot_sensitivity

        return plot_sensitivity(self.scores, path, self.metric, self.baseline)

    def figure(self) -> Any:
        from lightning_prune.plots import sensitivity_figure

        return sensitivity_figure(self.scores, self.metric, self.baseline)


def _check_drop(max_drop: float) -> None:
    if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)) or not max_drop >= 0:
        raise ValueError(f"`max_drop` must be a number >= 0, got {max_drop!r}.")


def _check_levels(levels: Sequence[float]) -> list[float]:
    values = list(levels)
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1 for v in values):
        raise ValueError(f"`levels` must be a non-empty list of sparsities in (0, 1), got {levels!r}.")
    if sorted(set(values)) != values:
        raise ValueError(f"`levels` must be strictly increasing, got {levels!r}.")
    return [float(v) for v in values]


def threshold_for_level(weight: torch.Tensor, level: float) -> float:
    """s with s·σ between the k-th and (k+1)-th smallest |w| (k = round(level·n)), σ = std(w):
    Distiller's λ = s·σ threshold that drops the same weights as magnitude pruning to ``level``
    (exactly, unless |w| has ties at the boundary)."""
    magnitudes = torch.sort(weight.detach().abs().flatten().float().cpu()).values
    k = count_to_prune(magnitudes.numel(), level)
    if k == 0:
        return 0.0
    upper = magnitudes[k] if k < magnitudes.numel() else magnitudes[-1] * 2 + 1
    return float((magnitudes[k - 1] + upper) / 2 / weight.detach().float().std())


def _batches(dataloader: Iterable[Any], limit: Optional[int]) -> Iterable[Any]:
    for index, batch in enumerate(dataloader):
        if limit is not None and index >= limit:
            return
        yield batch


@torch.no_grad()
def evaluate(model: nn.Module, dataloader: Iterable[Any], metric: Metric, limit_batches: Optional[int] = None) -> float:
    """``metric`` over ``(inputs, targets)`` batches of ``dataloader``, the model in eval mode."""
    device = next(model.parameters()).device
    metric = metric.to(device)
    metric.reset()
    for inputs, targets, *_ in _batches(dataloader, limit_batches):
        metric.update(model(inputs.to(device)), targets.to(device))
    value = float(metric.compute())
    metric.reset()
    return value


@torch.no_grad()
def _num_outputs(model: nn.Module, dataloader: Iterable[Any]) -> int:
    inputs = next(iter(dataloader))[0]
    return int(model(inputs[:1].to(next(model.parameters()).device)).shape[-1])


def sensitivity_analysis(
    model: nn.Module,
    dataloader: Iterable[Any],
    levels: Sequence[float] = DEFAULT_LEVELS,
    metric: Optional[Metric] = None,
    parameters: Optional[list[str]] = None,
    exclude: Optional[list[str]] = None,
    limit_batches: Optional[int] = None,
    progress: bool = True,
) -> SensitivityTable:
    """Prune each Conv/Linear layer alone to each level by magnitude, evaluate, restore it.

    Args:
        model: the (trained) model; any ``nn.Module`` or LightningModule mapping inputs to logits.
        dataloader: batches ``(inputs, targets, ...)``, e.g. a validation loader.
        levels: strictly increasing sparsities in (0, 1).
        metric: a torchmetrics ``Metric`` (default: micro-averaged multiclass accuracy over the
            model's number of outputs); its ``higher_is_better`` decides what a drop is.
        parameters: glob patterns of module names to analyse (default: every Conv/Linear).
        exclude: glob patterns of module names to skip.
        limit_batches: evaluate on the first ``limit_batches`` batches only.
        progress: show a progress bar.

    The model's weights, and its train/eval mode, are exactly as before when this returns.
    """
    levels = _check_levels(levels)
    modules = select_modules(model, parameters, exclude)
    if metric is None:
        metric = MulticlassAccuracy(num_classes=_num_outputs(model, dataloader), average="micro")
    name = type(metric).__name__.replace("Multiclass", "").replace("Binary", "").lower()
    higher_is_better = metric.higher_is_better is not False
    with eval_mode(model):  # every submodule gets its own train/eval flag back
        baseline = evaluate(model, dataloader, metric, limit_batches)
        scores: dict[str, dict[float, float]] = {}
        thresholds: dict[str, dict[float, float]] = {}
        with tqdm(total=len(modules) * len(levels), desc="sensitivity", disable=not progress, leave=False) as bar:
            for layer, module in modules.items():
                weight = module.weight
                original = weight.detach().clone()
                scores[layer], thresholds[layer] = {}, {}
                try:
                    for level in levels:
                        keep = layer_magnitude_masks({layer: original}, {layer: level})[layer].to(weight.device)
                        with torch.no_grad():
                            weight.copy_(original.masked_fill(~keep, 0.0))
                        scores[layer][level] = evaluate(model, dataloader, metric, limit_batches)
                        thresholds[layer][level] = threshold_for_level(original, level)
                        bar.set_postfix(layer=layer, sparsity=level)
                        bar.update()
                finally:
                    with torch.no_grad():
                        weight.copy_(original)
    return SensitivityTable(levels, baseline, scores, thresholds, name, higher_is_better)
