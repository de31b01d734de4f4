"""Physical channel removal: :func:`apply_plan` shrinks the model in place, channel groups with torch-pruning
(a grouped conv keeps its ``groups``: every conv group loses the same in-group indices), head groups by slicing
their projections (then the attention modules' head counts follow the weights)."""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from lightning_prune.structure.attention import sync_head_counts
from lightning_prune.structure.groups import (
    ChannelGroup,
    ExampleInput,
    GroupMember,
    _check_groups_match,
    _Graph,
    _is_depthwise,
)
from lightning_prune.structure.plans import ChannelPlan, _removed, _sliced_parameters, _weight_dim, check_plan
from lightning_prune.structure.records import StructureRecord, structure_record
from lightning_prune.targets import linear_types, set_linear_features


def slice_members(modules: Mapping[str, nn.Module], removed: Mapping[tuple[str, str], torch.Tensor]) -> None:
    """Remove, in place, the positions ``removed[(module name, kind)]`` of each member: its parameters (and
    BatchNorm statistics) are sliced and its width attributes set to match. A torch-pruning pass does the
    same for channel groups; this needs no graph, so head groups and the FLOPs predictor's probes use it."""
    with torch.no_grad():
        for (name, kind), drop in removed.items():
            module = modules[name]
            member = GroupMember(name, kind, drop, drop, 0, 0)  # type: ignore[arg-type]
            sliced = _sliced_parameters(member, module)
            if isinstance(module, _BatchNorm) and module.running_mean is not None:
                sliced += [("running_mean", 0), ("running_var", 0)]
            for attribute, dim in sliced:
                tensor = getattr(module, attribute)
                keep = torch.ones(tensor.shape[dim], dtype=torch.bool)
                keep[drop] = False
                value = tensor.detach()[(slice(None),) * dim + (keep.to(tensor.device),)].clone()
                setattr(module, attribute, nn.Parameter(value, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else value)
            _set_width(module, kind, getattr(module, "weight").shape if hasattr(module, "weight") and module.weight is not None else None)


def _set_width(module: nn.Module, kind: str, weight_shape: Optional[torch.Size]) -> None:
    """Make a sliced module's width attributes match its parameters."""
    if isinstance(module, _ConvNd):
        dim = _weight_dim(module, kind)
        if _is_depthwise(module) and module.groups > 1:  # in == out == groups
            module.in_channels = module.out_channels = module.groups = weight_shape[0]
        elif kind == "out":
            module.out_channels = weight_shape[dim]
        else:  # a grouped conv's weight holds one conv group's inputs
            module.in_channels = weight_shape[dim] * module.groups
    elif isinstance(module, linear_types()):
        in_dim = _weight_dim(module, "in")
        set_linear_features(module, weight_shape[in_dim], weight_shape[1 - in_dim])
    elif isinstance(module, _BatchNorm):
        module.num_features = module.running_mean.numel() if module.running_mean is not None else weight_shape[0]


def removed_positions(groups: Sequence[ChannelGroup], removed: Mapping[int, torch.Tensor]) -> dict[tuple[str, str], torch.Tensor]:
    """``(module, kind) -> positions`` that removing the channels ``removed[g]`` (bool over group ``g``'s
    channels) takes from the groups' members with parameters."""
    positions: dict[tuple[str, str], list[torch.Tensor]] = {}
    for group in groups:
        if group.index in removed:
            for member in group.members:
                if member.has_parameters:
                    drop = member.positions[removed[group.index][member.channels]]
                    positions.setdefault((member.module, member.kind), []).append(drop)
    return {key: torch.cat(parts) for key, parts in positions.items()}


def remove_channels(traced: _Graph, groups: Sequence[ChannelGroup], plan: ChannelPlan) -> None:
    """Remove the channels ``plan`` drops from the model ``traced`` was built on: channel groups through
    torch-pruning's graph, head groups by :func:`slice_members`, after which the attention modules' head
    counts are set from their weights."""
    heads: dict[int, torch.Tensor] = {}
    for group in groups:
        if group.index not in plan:
            continue
        removed = _removed(group, plan[group.index])
        if group.heads is not None:
            heads[group.index] = removed
        elif removed.any():
            root = next(member for member in group.members if member.module == group.root and member.kind == "out")
            traced.pruning_group(traced.modules[group.root], root.positions[removed[root.channels]].tolist()).prune()
    if heads:
        slice_members(traced.modules, removed_positions(groups, heads))
        sync_head_counts(traced.modules[""])


def apply_plan(
    model: nn.Module, groups: Sequence[ChannelGroup], plan: ChannelPlan, example_input: ExampleInput
) -> StructureRecord:
    """Remove the channels ``plan`` drops, in place: every coupled Conv, BatchNorm and Linear gets smaller
    parameters (and buffers), and attention modules whose heads go get their head counts set to match, so
    ``model`` stays a plain ``nn.Module`` that runs and trains without this package. ``requires_grad`` flags
    and training modes are kept. Parameters are new tensors: re-create optimizers
    (``training_state.rebuild_training_state`` inside ``Trainer.fit``), and find the groups again before the
    next plan. Returns :func:`structure_record` of the pruned model."""
    check_plan(groups, plan)
    _check_groups_match(model, groups)
    requires_grad = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    remove_channels(_Graph(model, example_input), groups, plan)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(requires_grad[name])
    return structure_record(model)
