"""Structured-pruning baselines the benchmarks compare Pruning from Scratch against.

Each function reaches a FLOPs budget ``F(pruned) <= r * F(dense)`` (fvcore's count, one multiply-add =
one FLOP, per sample) and is checked against an fvcore recount of the physically pruned network in
``tests/test_structured_baselines.py``:

- :func:`uniform_plan`: every coupled channel group keeps the same fraction of its channels;
- :func:`torch_pruning_l1`: L1-norm filter pruning (Li et al. 2017) with Torch-Pruning as the
  reference implementation, one channel-pruning ratio for every layer;
- :func:`slimming_plan`: network slimming (Liu et al. 2017), channels ranked by their BatchNorm
  scales ``|gamma|`` with one global threshold; the sparsity penalty during training is
  :class:`BatchNormL1` (``benchmarks/gate_digits.py``).
"""

from __future__ import annotations

import copy
from typing import Sequence

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from benchmarks.gate_digits import BatchNormL1
from benchmarks.gate_structures import bn_scale_scores
from lightning_prune.channel_search import search_threshold
from lightning_prune.flops import FlopsPredictor, count_flops
from lightning_prune.modes import eval_mode
from lightning_prune.structure import ChannelGroup, ChannelPlan

__all__ = ["BatchNormL1", "slimming_plan", "slimming_scores", "torch_pruning_l1", "uniform_plan"]


def _check_ratio(flops_ratio: float) -> None:
    if not 0.0 < flops_ratio <= 1.0:
        raise ValueError(f"`flops_ratio` must be in (0, 1], got {flops_ratio!r}.")


def uniform_plan(groups: Sequence[ChannelGroup], predictor: FlopsPredictor, flops_ratio: float) -> ChannelPlan:
    """Uniform width: group ``g`` of ``n_g`` channels keeps ``k_g = max(1, floor(f * n_g))`` (its first
    channels; the structure is trained from a fresh initialisation, so which ones does not matter), with
    ``f`` the largest fraction such that ``F(k) <= flops_ratio * F(dense)``.

    ``F(k)`` is lightning_prune's exact :class:`FlopsPredictor`; ``F`` rises with ``f`` and only changes at
    ``f = j / n_g``, so a binary search over those fractions finds ``f`` exactly.
    """
    _check_ratio(flops_ratio)
    sizes = predictor.sizes

    def kept(fraction: float) -> np.ndarray:
        return np.maximum(1, np.floor(fraction * sizes + 1e-9)).astype(np.int64)

    candidates = sorted({j / int(n) for n in sizes for j in range(1, int(n) + 1)})
    budget = flops_ratio * predictor.dense
    if predictor.predict_counts(kept(candidates[0])) > budget:
        smallest = predictor.predict_counts(kept(candidates[0])) / predictor.dense
        raise ValueError(f"`flops_ratio`={flops_ratio} is below uniform width's smallest reachable ratio {smallest:.4f}.")
    low, high = 0, len(candidates) - 1  # invariant: candidates[low] meets the budget
    while low < high:
        middle = (low + high + 1) // 2
        if predictor.predict_counts(kept(candidates[middle])) <= budget:
            low = middle
        else:
            high = middle - 1
    return {group.index: torch.arange(int(k)) for group, k in zip(groups, kept(candidates[low]))}


def slimming_scores(model: nn.Module, groups: Sequence[ChannelGroup]) -> list[torch.Tensor]:
    """Network slimming's channel importance: ``s_c = mean over the group's BatchNorms b of |gamma_b[c]|``.

    Liu et al. rank single BatchNorm channels; a coupled group (a residual stage) has several BatchNorms,
    so the mean keeps one global threshold comparable between groups with one and with many.
    """
    scores = bn_scale_scores(model, groups)
    counts = [
        sum(1 for m in group.members if m.kind == "channel" and isinstance(model.get_submodule(m.module), nn.BatchNorm2d))
        for group in groups
    ]
    return [score / max(count, 1) for score, count in zip(scores, counts)]


def slimming_plan(
    model: nn.Module, groups: Sequence[ChannelGroup], predictor: FlopsPredictor, flops_ratio: float
) -> ChannelPlan:
    """Network slimming's pruning step (Liu et al. 2017): keep channel ``c`` iff ``s_c >= t`` with
    ``s_c`` from :func:`slimming_scores` and ``t`` the lowest global threshold with
    ``F(plan) <= flops_ratio * F(dense)`` (lightning_prune's threshold search on the exact predictor)."""
    _check_ratio(flops_ratio)
    return search_threshold(slimming_scores(model, groups), flops_ratio, predictor).plan


def _tp_pruned(model: nn.Module, example_input: torch.Tensor, ignored: list[str], ratio: float) -> nn.Module:
    """``model`` pruned by Torch-Pruning: every group drops ``ratio`` of its channels, lowest L1 norm first."""
    importance = tp.importance.GroupMagnitudeImportance(p=1, group_reduction="first", normalizer=None)
    with eval_mode(model):  # Torch-Pruning traces in eval mode and leaves the model there; give the flags back
        pruner = tp.pruner.MetaPruner(
            model, example_input, importance=importance, pruning_ratio=ratio, global_pruning=False,
            ignored_layers=[model.get_submodule(name) for name in ignored],
        )
        pruner.step()
    return model


def torch_pruning_l1(
    model: nn.Module, example_input: torch.Tensor, flops_ratio: float, ignored: Sequence[str], steps: int = 14
) -> float:
    """L1-norm filter pruning (Li et al. 2017) with Torch-Pruning's ``MetaPruner``, in place.

    Filter ``c`` of a layer scores ``s_c = ||W[c]||_1`` (``GroupMagnitudeImportance(p=1,
    group_reduction="first")``, Torch-Pruning's "standard L1-norm"); every coupled group drops the same
    fraction ``p`` of its channels, lowest ``s_c`` first (``global_pruning=False``). ``p`` is the smallest
    value on a ``steps``-step bisection of [0, 1) whose fvcore count meets ``F <= flops_ratio * F(dense)``.
    ``ignored``: module names Torch-Pruning must not shrink (the classifier). Training flags are kept. Returns ``p``.
    """
    _check_ratio(flops_ratio)
    budget = flops_ratio * count_flops(model, example_input).total
    if flops_ratio == 1.0:
        return 0.0
    low, high = 0.0, 1.0  # invariant: p = low misses the budget; p = high meets it (or was never tried)
    for _ in range(steps):
        middle = (low + high) / 2
        trial = _tp_pruned(copy.deepcopy(model), example_input, list(ignored), middle)
        if count_flops(trial, example_input).total <= budget:
            high = middle
        else:
            low = middle
    if high == 1.0:
        raise ValueError(f"`flops_ratio`={flops_ratio} is not reachable with one pruning ratio for every layer.")
    _tp_pruned(model, example_input, list(ignored), high)
    return high
