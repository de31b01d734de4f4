"""Channel plans and what follows from one: checking a plan, making one from scores or from already
zeroed channels, the 0/1 masks and channel norms of groups, and the kept-channel ratios per layer.

A :data:`ChannelPlan` says, per group, which channels stay. :func:`channel_masks` gives the 0/1 masks
that make the dense model compute what :func:`~lightning_prune.structure.removal.apply_plan` leaves (with
:func:`norm_masks` in place where a hidden group runs through norms).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.modules.conv import _ConvNd
from torch.utils.hooks import RemovableHandle

from lightning_prune.choices import check_choice
from lightning_prune.criteria import ChannelNorm
from lightning_prune.structure.groups import ChannelGroup, GroupMember, MemberKind, _check_groups_match, is_norm, norm_width
from lightning_prune.structure.records import _qualified
from lightning_prune.targets import transposed_linear_types

ChannelPlan = dict[int, torch.Tensor]
"""Group index -> sorted ``LongTensor`` of the channels that stay; a missing group keeps all."""


def _weight_dim(module: nn.Module, kind: MemberKind) -> int:
    """The weight dimension holding a Conv/Linear's ``kind`` channels (a transposed conv's weight is
    ``(in, out / groups, *kernel)``, a Hugging Face ``Conv1D``'s ``(in, out)``, an ``nn.Embedding``'s
    ``(num_embeddings, embedding_dim)``: its output is dim 1)."""
    if isinstance(module, nn.Embedding):
        return 1
    transposed = module.transposed if isinstance(module, _ConvNd) else isinstance(module, transposed_linear_types())
    out_dim = 1 if transposed else 0
    return out_dim if kind == "out" else 1 - out_dim


def _removed(group: ChannelGroup, keep: torch.Tensor) -> torch.Tensor:
    """Boolean vector over the group's channels: True where the channel is removed."""
    removed = torch.ones(group.size, dtype=torch.bool)
    removed[keep.cpu()] = False
    return removed


def check_plan(groups: Sequence[ChannelGroup], plan: ChannelPlan) -> None:
    """Raise ``ValueError`` unless every entry of ``plan`` names a group and keeps 1..size distinct channels."""
    for index, keep in plan.items():
        if not 0 <= index < len(groups):
            raise ValueError(f"`plan` has group index {index!r}; valid indices are 0..{len(groups) - 1}.")
        size = groups[index].size
        if not isinstance(keep, torch.Tensor) or keep.dim() != 1 or keep.dtype != torch.long:
            raise ValueError(f"`plan[{index}]` must be a 1-D LongTensor of kept channels, got {keep!r}.")
        if keep.numel() == 0:
            raise ValueError(f"`plan[{index}]` keeps no channel; a group keeps at least one.")
        if int(keep.min()) < 0 or int(keep.max()) >= size or keep.unique().numel() != keep.numel():
            raise ValueError(f"`plan[{index}]` must hold distinct channel indices in [0, {size}), got {keep.tolist()}.")


def _sliced_parameters(member: GroupMember, module: nn.Module) -> list[tuple[str, int]]:
    """(parameter name in the module, dimension) pairs that removing the member's positions slices."""
    if member.kind == "in":
        return [("weight", _weight_dim(module, "in"))]
    if member.kind == "parameter":
        return [(member.parameter, getattr(module, member.parameter).dim() - 1)]
    if member.kind == "out":
        return [("weight", _weight_dim(module, "out"))] + ([("bias", 0)] if getattr(module, "bias", None) is not None else [])
    if member.kind == "table":
        return [(name, parameter.dim() - 1) for name, parameter in module.named_parameters(recurse=False)]
    return [(name, 0) for name, _ in module.named_parameters(recurse=False)]


def channel_masks(model: nn.Module, groups: Sequence[ChannelGroup], plan: ChannelPlan) -> dict[str, torch.Tensor]:
    """0/1 masks (name as in ``model.named_parameters()`` -> mask of that parameter's shape and dtype)
    that zero exactly what :func:`apply_plan` would remove: output slices of producing Conv/Linear
    weights and biases, input slices of consuming ones, and BatchNorm weights and biases (a hidden group's:
    also embeddings' columns, loose parameters and norm weights). The masked model computes what the
    physically pruned one computes (a hidden group's norms need
    :func:`norm_masks` as well). Only affected parameters appear, each under
    its ``model.named_parameters()`` name (a tied weight once, with the slices of all its members)."""
    check_plan(groups, plan)
    modules = _check_groups_match(model, groups)
    parameters = dict(model.named_parameters())
    canonical = {id(parameter): name for name, parameter in parameters.items()}
    every = dict(model.named_parameters(remove_duplicate=False))
    masks: dict[str, torch.Tensor] = {}
    for group in groups:
        if group.index not in plan:
            continue
        removed = _removed(group, plan[group.index])
        if not removed.any():
            continue
        for member in group.members:
            positions = member.positions[removed[member.channels]]
            for attribute, dim in _sliced_parameters(member, modules[member.module]):
                name = canonical[id(every[_qualified(member.module, attribute)])]
                mask = masks.setdefault(name, torch.ones_like(parameters[name], requires_grad=False))
                mask.index_fill_(dim, positions.to(mask.device), 0.0)
    return masks


def channel_norms(
    model: nn.Module, groups: Sequence[ChannelGroup], norm: ChannelNorm = "l1"
) -> list[torch.Tensor]:
    """Per group, each channel's importance ``s_c = sum over out-layers l of ||W_l[c]||_p`` (p = 1 or 2),
    the norm of output channel ``c``'s weights (biases excluded). Float32 CPU tensors of length ``size``."""
    check_choice("norm", norm, ChannelNorm)
    modules = _check_groups_match(model, groups)
    scores = []
    for group in groups:
        score = torch.zeros(group.size)
        for member in group.members:
            if member.kind != "out":
                continue
            module = modules[member.module]
            weight = module.weight.detach().movedim(_weight_dim(module, "out"), 0)
            rows = weight.flatten(1)[member.positions.to(weight.device)]
            values = rows.abs().sum(1) if norm == "l1" else rows.norm(dim=1)
            score.index_add_(0, member.channels, values.float().cpu())
        scores.append(score)
    return scores


def kept_counts(
    counts: torch.Tensor, sizes: torch.Tensor, min_channels: int = 1, round_to: Optional[int] = None
) -> torch.Tensor:
    """Channels each group keeps when ``counts[g]`` of its ``sizes[g]`` pass a threshold: at least
    ``min_channels``, rounded up to a multiple of ``round_to`` (hence never below ``round_to``), and at most
    the whole group (so a group smaller than ``round_to``, or whose next multiple exceeds it, keeps all)."""
    check_round_to(round_to)
    if min_channels < 1:
        raise ValueError(f"`min_channels` must be at least 1, got {min_channels!r}.")
    kept = counts.clamp(min=min_channels)
    if round_to is not None:
        kept = (kept + round_to - 1) // round_to * round_to
    return torch.minimum(kept, sizes)


def check_round_to(round_to: Optional[int]) -> None:
    """``round_to`` must be ``None`` or a positive integer."""
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise ValueError(f"`round_to` must be None or a positive integer (e.g. 8 or 16), got {round_to!r}.")


def plan_from_scores(
    scores: Sequence[torch.Tensor], threshold: float, min_channels: int = 1, round_to: Optional[int] = None
) -> ChannelPlan:
    """Keep channel ``c`` of group ``g`` iff ``scores[g][c] >= threshold``, and always the ``min_channels``
    top-scored channels of each group (ties go to the lower index); with ``round_to``, the next best channels
    until the count is a multiple of it (:func:`kept_counts`). Every group appears in the plan."""
    plan: ChannelPlan = {}
    for index, score in enumerate(scores):
        score = score.detach().float().cpu()
        count = kept_counts((score >= threshold).sum().view(1), torch.tensor([len(score)]), min_channels, round_to)
        best = torch.argsort(score, descending=True, stable=True)[: int(count)]
        plan[index] = best.sort().values
    return plan


def zeroed_channel_plan(model: nn.Module, groups: Sequence[ChannelGroup]) -> ChannelPlan:
    """The plan that removes every channel whose slices :func:`channel_masks` would zero are all zero
    already, so applying it changes no output (e.g. after channel-granular magnitude pruning). A
    group whose channels are all zero keeps channel 0, so no layer is emptied."""
    modules = _check_groups_match(model, groups)
    plan: ChannelPlan = {}
    for group in groups:
        alive = torch.zeros(group.size, dtype=torch.bool)
        for member in group.members:
            module = modules[member.module]
            for attribute, dim in _sliced_parameters(member, module):
                values = getattr(module, attribute).detach()
                nonzero = values.movedim(dim, 0).reshape(values.shape[dim], -1).ne(0).any(1).cpu()
                alive[member.channels[nonzero[member.positions]]] = True
        if not alive.any():
            alive[0] = True
        plan[group.index] = alive.nonzero().flatten()
    return plan


def layer_channel_ratios(groups: Sequence[ChannelGroup], plan: ChannelPlan) -> dict[str, float]:
    """Layer name -> kept / original output channels, for every out-layer of every group, in model order."""
    check_plan(groups, plan)
    ratios = []
    for group in groups:
        ratio = len(plan[group.index]) / group.size if group.index in plan else 1.0
        ratios += [(member.order, member.module, ratio) for member in group.members if member.kind == "out"]
    return {name: ratio for _, name, ratio in sorted(ratios)}


def channel_ratio_vector(groups: Sequence[ChannelGroup], plan: ChannelPlan) -> list[float]:
    """The channel-ratio vector (Pruning from Scratch's structure): kept / original channels per prunable
    layer in model order; :func:`layer_channel_ratios` gives the layer names alongside."""
    return list(layer_channel_ratios(groups, plan).values())


def norm_masks(model: nn.Module, groups: Sequence[ChannelGroup], plan: ChannelPlan) -> list[RemovableHandle]:
    """Forward hooks that make each norm of a hidden group (``ChannelGroup.hidden``) normalise over the
    channels ``plan`` keeps only, with zeros at the removed ones, as the physically pruned norm does (a
    LayerNorm's mean and variance, an RMSNorm's mean square are over the channels that stay, so masking its
    input and weights alone would not do). With :func:`channel_masks` applied, the dense model computes what
    :func:`~lightning_prune.structure.apply_plan` leaves. Remove the returned handles to end it."""
    check_plan(groups, plan)
    modules = _check_groups_match(model, groups)
    handles = []
    for group in groups:
        if not group.hidden or group.index not in plan:
            continue
        removed = _removed(group, plan[group.index])
        for member in group.members:
            module = modules[member.module]
            if member.kind == "channel" and is_norm(module):
                keep = member.positions[~removed[member.channels]].sort().values
                handles.append(module.register_forward_hook(_normalised_over(keep)))
    return handles


def _normalised_over(keep: torch.Tensor):  # noqa: ANN202 - a forward hook
    """A norm's forward hook: its output recomputed on the ``keep`` channels of its input (with its weights of
    those channels), zeros elsewhere. The channel dimension is the last one, dim 1 for a channels-first norm
    (timm's ``LayerNorm2d``)."""
    inside = [False]
    on_device: dict[torch.device, torch.Tensor] = {}  # ``keep`` where the activations are (copied once)

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> Optional[torch.Tensor]:
        if inside[0]:
            return None
        dim = 1 if type(module).__name__.endswith(("2d", "3d")) else -1
        width = norm_width(module)
        if args[0].dim() < 2 or args[0].shape[dim] != width:
            raise ValueError(f"{type(module).__name__}'s input {tuple(args[0].shape)} has no {width} channels in dim {dim}")
        if output.device not in on_device:
            on_device[output.device] = keep.to(output.device)
        index = on_device[output.device]
        sliced = {name: p.index_select(0, index) for name, p in module.named_parameters(recurse=False)}
        shape = getattr(module, "normalized_shape", None)
        inside[0] = True
        try:
            if shape is not None:
                module.normalized_shape = (len(keep),)
            kept = functional_call(module, sliced, (args[0].index_select(dim, index),))
        finally:
            inside[0] = False
            if shape is not None:
                module.normalized_shape = shape
        return torch.zeros_like(output).index_copy(dim % output.dim(), index, kept.to(output.dtype))

    return hook
