"""Channel-granular magnitude pruning over coupled channel groups (used by ``IterativeMagnitude``)."""

from __future__ import annotations

from typing import Literal, Mapping, Optional, Union

import torch
from torch import nn

from lightning_prune.criteria import count_to_prune
from lightning_prune.flops import FlopCount, FlopsPredictor
from lightning_prune.structure import (
    ChannelPlan,
    StructureRecord,
    apply_plan,
    channel_masks,
    channel_norms,
    find_channel_groups,
    layer_channel_ratios,
    zeroed_channel_plan,
)
from lightning_prune.targets import PRUNABLE_TYPES, weight_names


class ChannelPruning:
    """Masks whole channels of the coupled groups whose out-layers are all selected for pruning.

    A channel's importance is the L1/L2 norm of its output weights summed over the group's
    out-layers; its mask zeroes everything physical removal would remove (producer rows and biases,
    BatchNorm entries, consumer columns), so ``remove`` afterwards changes no output.
    """

    def __init__(
        self,
        model: nn.Module,
        example_input: torch.Tensor,
        modules: Mapping[str, nn.Module],
        norm: Literal["l1", "l2"],
        count: Optional[FlopCount] = None,
    ) -> None:
        unselected = [name for name, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES) and name not in modules]
        self.model = model
        self.example_input = example_input
        self.norm = norm
        self.groups = find_channel_groups(model, example_input, ignored_layers=unselected)
        if not self.groups:
            raise ValueError(
                "`granularity`='channel' found no prunable channel group among the selected layers "
                f"{sorted(modules)} (the output layer and layers coupled to it are never pruned)."
            )
        self.weights = weight_names(modules)
        self.predictor = FlopsPredictor(model, example_input, self.groups, count)
        self.plan: ChannelPlan = {}

    def _plan(self, drop: list[torch.Tensor]) -> ChannelPlan:
        plan = {}
        for group, dropped in zip(self.groups, drop):
            keep = torch.ones(group.size, dtype=torch.bool)
            keep[dropped] = False
            plan[group.index] = keep.nonzero().flatten()
        return plan

    def _zeros(self, plan: ChannelPlan) -> int:
        masks = channel_masks(self.model, self.groups, plan)
        return sum(int((masks[name] == 0).sum()) for name in self.weights if name in masks)

    def masks(self, target: Union[float, Mapping[str, float]]) -> dict[str, torch.Tensor]:
        """Keep-masks for a global target sparsity (a float) or per-layer channel fractions (a mapping).

        Per layer, each group loses round(s·size) of its lowest-norm channels (its root layer's s).
        Globally, channels are ranked by norm / mean norm of their group over all groups, and the
        fewest lowest-ranked ones are dropped whose removal zeroes at least round(s·N) of the N
        pruned weights (binary search).
        Every group keeps at least one channel.
        """
        # each group's norms relative to its mean, so layers of different fan-in compete fairly
        scores = [score / score.mean().clamp_min(1e-12) for score in channel_norms(self.model, self.groups, self.norm)]
        orders = [torch.sort(score, stable=True).indices for score in scores]
        if isinstance(target, Mapping):
            drop = [
                order[: min(count_to_prune(group.size, target.get(group.root, 0.0)), group.size - 1)]
                for group, order in zip(self.groups, orders)
            ]
            self.plan = self._plan(drop)
        else:
            self.plan = self._global_plan(scores, orders, target)
        return {name: mask != 0 for name, mask in channel_masks(self.model, self.groups, self.plan).items()}

    def channel_ratios(self) -> dict[str, float]:
        """Kept / original channels per layer under the current plan (the channel-ratio vector)."""
        return layer_channel_ratios(self.groups, self.plan)

    def flops(self) -> int:
        """FLOPs (fvcore, multiply-adds) of the model once the current plan is physically applied."""
        return self.predictor.predict(self.plan)

    def _global_plan(self, scores: list[torch.Tensor], orders: list[torch.Tensor], target: float) -> ChannelPlan:
        # candidates: every channel but each group's highest-scored one, ranked by score over all groups
        candidates = [(float(scores[g][c]), g, int(c)) for g, order in enumerate(orders) for c in order[:-1]]
        candidates.sort(key=lambda item: item[0])
        total = sum(self.model.get_parameter(name).numel() for name in self.weights)
        wanted = count_to_prune(total, target)

        def plan_for(count: int) -> ChannelPlan:
            drop: list[list[int]] = [[] for _ in self.groups]
            for _, g, c in candidates[:count]:
                drop[g].append(c)
            return self._plan([torch.tensor(d, dtype=torch.long) for d in drop])

        low, high = 0, len(candidates)
        while low < high:
            middle = (low + high) // 2
            if self._zeros(plan_for(middle)) >= wanted:
                high = middle
            else:
                low = middle + 1
        return plan_for(low)

    def remove(self, model: nn.Module) -> StructureRecord:
        """Physically remove every channel whose slices are all zero; returns the new structure."""
        device = next(model.parameters()).device
        return apply_plan(model, self.groups, zeroed_channel_plan(model, self.groups), self.example_input.to(device))
