"""Channel decisions under a FLOPs budget: one global threshold over per-channel scores (Pruning from
Scratch, Sec. 3.3), counted by :class:`~lightning_prune.flops.FlopsPredictor`.

:mod:`lightning_prune.flops` counts and predicts; this module decides which channels stay.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from lightning_prune.flops import FlopsPredictor
from lightning_prune.structure import ChannelPlan
from lightning_prune.structure.plans import check_round_to, kept_counts, plan_from_scores


@dataclass(frozen=True)
class ThresholdSearch:
    """Result of :func:`search_threshold`: the plan, its FLOPs, FLOPs / dense FLOPs, and the threshold."""

    plan: ChannelPlan
    flops: int
    ratio: float
    threshold: float


def search_threshold(
    scores: Sequence[torch.Tensor],
    flops_ratio: float,
    predictor: FlopsPredictor,
    min_channels: int = 1,
    round_to: Optional[int] = None,
    fill: bool = False,
) -> ThresholdSearch:
    """The lowest global threshold whose plan meets a FLOPs budget (Pruning from Scratch, Sec. 3.3).

    Channel ``c`` of group ``g`` stays iff ``scores[g][c] >= t``, plus each group's ``min_channels``
    top-scored channels; with ``round_to`` each group's count is rounded up to a multiple of it with its next
    best channels (:func:`~lightning_prune.structure.plans.kept_counts`; as Torch-Pruning's ``round_to``).
    A score of ``+inf`` (a group without a gate) always stays. FLOPs fall as ``t`` rises, so a binary search
    over the sorted distinct finite scores finds the smallest ``t`` with ``FLOPs(t) <= flops_ratio * dense``
    in ``log2(#channels)`` predictions, every one of them on the rounded counts: the plan lands at or below
    the target and as close as the global threshold (and the rounding) allows.

    With ``fill``, the channels below the threshold are then admitted in descending score order while the
    budget holds; a group whose next channel does not fit takes no more (its cost only grows as others are
    admitted). Where the units differ in cost (whole attention heads ranked with single channels) the
    threshold's last step can be a whole head; the fill spends what it leaves on the next-ranked units that fit.

    Raises:
        ValueError: ``flops_ratio`` outside (0, 1]; ``round_to`` not a positive integer; scores that do not
            match the groups; or a target below the smallest reachable structure (the message gives the
            smallest reachable ratio).
    """
    if not 0.0 < flops_ratio <= 1.0:
        raise ValueError(f"`flops_ratio` must be in (0, 1], got {flops_ratio!r}.")
    check_round_to(round_to)
    if len(scores) == 0 or len(predictor.sizes) == 0:
        raise ValueError(
            f"`scores` hold {len(scores)} groups and `predictor` counts {len(predictor.sizes)}: there is no prunable "
            "channel group to search a threshold over. `find_channel_groups` found none on this model; "
            "`refused_channel_groups(model, example_input)` says why each coupled group was left out (e.g. coupled "
            "to the output, attention); prune another part of the model or use element (unstructured) pruning."
        )
    sizes = torch.as_tensor(predictor.sizes, dtype=torch.long)
    if [len(score) for score in scores] != sizes.tolist():
        raise ValueError(f"`scores` must hold one score per channel of each group (sizes {sizes.tolist()}).")
    flat = torch.cat([score.detach().float().cpu().flatten() for score in scores])
    if torch.isnan(flat).any():
        raise ValueError("`scores` contain NaN.")
    group_of = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
    candidates = torch.unique(flat[torch.isfinite(flat)])  # sorted; position len(candidates): above every finite score
    above_all = float(torch.nextafter(candidates[-1], torch.tensor(math.inf))) if len(candidates) else math.inf

    def threshold_at(position: int) -> float:
        return float(candidates[position]) if position < len(candidates) else above_all

    def flops_at(position: int) -> int:
        counts = torch.bincount(group_of[flat >= threshold_at(position)], minlength=len(sizes))
        return predictor.predict_counts(kept_counts(counts, sizes, min_channels, round_to).numpy())

    budget = flops_ratio * predictor.dense
    smallest = flops_at(len(candidates))
    if smallest > budget:
        raise ValueError(
            f"`flops_ratio`={flops_ratio} is below the smallest reachable ratio {smallest / predictor.dense:.6f} "
            f"(every group at `min_channels`={min_channels}, `round_to`={round_to}; groups without a finite score kept whole)."
        )
    low, high = 0, len(candidates)  # invariant: flops_at(high) <= budget
    while low < high:
        middle = (low + high) // 2
        if flops_at(middle) <= budget:
            high = middle
        else:
            low = middle + 1
    threshold = threshold_at(high)
    plan = plan_from_scores(scores, threshold, min_channels, round_to)
    if fill:
        plan = _filled(scores, plan, flat, group_of, threshold, budget, predictor, round_to)
    flops = predictor.predict(plan)
    return ThresholdSearch(plan=plan, flops=flops, ratio=flops / predictor.dense, threshold=threshold)


def _filled(
    scores: Sequence[torch.Tensor],
    plan: ChannelPlan,
    flat: torch.Tensor,
    group_of: torch.Tensor,
    threshold: float,
    budget: float,
    predictor: FlopsPredictor,
    round_to: Optional[int],
) -> ChannelPlan:
    """``plan`` grown by the channels scored below ``threshold``, in descending score order, while the
    predicted FLOPs stay within ``budget`` (see :func:`search_threshold`'s ``fill``). Each group closes once, and
    every admitted channel spends part of what the threshold left, so this makes few predictions."""
    sizes = predictor.sizes
    counts = np.array([len(plan[index]) for index in range(len(scores))], dtype=np.int64)
    step = round_to or 1
    open_groups = set(np.flatnonzero(counts < sizes).tolist())
    for group in group_of[torch.argsort(flat, descending=True, stable=True)[int((flat >= threshold).sum()) :]].tolist():
        if not open_groups:
            break
        if group not in open_groups:
            continue
        grown = counts.copy()
        grown[group] = min(counts[group] + step, sizes[group])
        if predictor.predict_counts(grown) > budget:
            open_groups.discard(group)  # its next channel only costs more as other groups grow
            continue
        counts = grown
        if counts[group] == sizes[group]:
            open_groups.discard(group)
    return {
        index: torch.argsort(score.detach().float().cpu(), descending=True, stable=True)[: int(counts[index])].sort().values
        for index, score in enumerate(scores)
    }
