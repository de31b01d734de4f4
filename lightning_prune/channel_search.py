"""Channel decisions under a FLOPs budget: one global threshold over per-channel scores (Pruning from
Scratch, Sec. 3.3), counted by :class:`~lightning_prune.flops.FlopsPredictor`.

:mod:`lightning_prune.flops` counts and predicts; this module decides which channels stay.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from lightning_prune.flops import FlopsPredictor
from lightning_prune.structure import ChannelPlan, plan_from_scores


@dataclass(frozen=True)
class ThresholdSearch:
    """Result of :func:`search_threshold`: the plan, its FLOPs, FLOPs / dense FLOPs, and the threshold."""

    plan: ChannelPlan
    flops: int
    ratio: float
    threshold: float


def search_threshold(
    scores: Sequence[torch.Tensor], flops_ratio: float, predictor: FlopsPredictor, min_channels: int = 1
) -> ThresholdSearch:
    """The lowest global threshold whose plan meets a FLOPs budget (Pruning from Scratch, Sec. 3.3).

    Channel ``c`` of group ``g`` stays iff ``scores[g][c] >= t`` (plus each group's ``min_channels``
    top-scored channels). FLOPs fall as ``t`` rises, so a binary search over the sorted distinct score
    values finds the smallest ``t`` with ``FLOPs(t) <= flops_ratio * dense`` in ``log2(#channels)``
    predictions: the plan lands at or below the target and as close as the global threshold allows
    (only equal scores move together).

    Raises:
        ValueError: ``flops_ratio`` outside (0, 1]; scores that do not match the groups; or a target
            below the smallest reachable structure (the message gives the smallest reachable ratio).
    """
    if not 0.0 < flops_ratio <= 1.0:
        raise ValueError(f"`flops_ratio` must be in (0, 1], got {flops_ratio!r}.")
    sizes = [int(size) for size in predictor.sizes]
    if [len(score) for score in scores] != sizes:
        raise ValueError(f"`scores` must hold one score per channel of each group (sizes {sizes}).")
    flat = torch.cat([score.detach().float().cpu().flatten() for score in scores])
    if torch.isnan(flat).any():
        raise ValueError("`scores` contain NaN.")
    budget = flops_ratio * predictor.dense
    smallest = predictor.min_flops(min_channels)
    if smallest > budget:
        raise ValueError(
            f"`flops_ratio`={flops_ratio} is below the smallest reachable ratio {smallest / predictor.dense:.6f} "
            f"(every group at `min_channels`={min_channels})."
        )
    group_of = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    # each group's min_channels top scores (ties to the lower index, as in plan_from_scores)
    by_score = torch.argsort(flat, descending=True, stable=True)
    by_group_then_score = by_score[torch.argsort(group_of[by_score], stable=True)]
    rank = torch.arange(len(flat)) - torch.tensor([0] + sizes[:-1]).cumsum(0)[group_of]
    protected = torch.zeros_like(flat, dtype=torch.bool)
    protected[by_group_then_score[rank < min_channels]] = True
    candidates = torch.unique(flat)  # sorted; position len(candidates) stands for "above every score"

    def flops_at(position: int) -> int:
        keep = protected if position == len(candidates) else protected | (flat >= candidates[position])
        return predictor.predict_counts(torch.bincount(group_of[keep], minlength=len(sizes)).numpy())

    low, high = 0, len(candidates)  # invariant: flops_at(high) <= budget
    while low < high:
        middle = (low + high) // 2
        if flops_at(middle) <= budget:
            high = middle
        else:
            low = middle + 1
    above_all = torch.nextafter(candidates[-1], torch.tensor(math.inf))
    threshold = float(candidates[high] if high < len(candidates) else above_all)
    plan = plan_from_scores(scores, threshold, min_channels)
    flops = predictor.predict(plan)
    return ThresholdSearch(plan=plan, flops=flops, ratio=flops / predictor.dense, threshold=threshold)
