"""Physical channel removal: :func:`apply_plan` shrinks the model in place, channel groups with torch-pruning
(a grouped conv keeps its ``groups``: every conv group loses the same in-group indices), head groups and hidden
groups by slicing their members (then the attention modules' head counts and the models' hidden-width attributes
follow the weights; a tied weight stays one parameter)."""

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
    is_norm,
)
from lightning_prune.structure.hidden import sync_hidden_widths
from lightning_prune.structure.plans import ChannelPlan, _removed, _sliced_parameters, _weight_dim, check_plan
from lightning_prune.structure.records import StructureRecord, structure_record
from lightning_prune.targets import linear_types, set_linear_features


Removed = Mapping[tuple[str, str, Optional[str]], torch.Tensor]
"""``(module name, member kind, parameter name of a "parameter" member or None) -> positions to remove``."""


def slice_members(modules: Mapping[str, nn.Module], removed: Removed) -> None:
    """Remove, in place, the positions ``removed[(module name, kind, parameter)]`` of each member: its
    parameters (and BatchNorm statistics) are sliced and its width attributes set to match; a parameter shared
    by several members (a tied embedding and output layer) is sliced once and stays shared. A torch-pruning
    pass does the same for channel groups; this needs no graph, so head groups, hidden groups and the FLOPs
    predictor's probes use it."""
    done: dict[tuple[int, int], torch.Tensor] = {}  # (id of a dense tensor, dim) -> its sliced tensor
    dense = []  # the dense tensors sliced, alive until the end (their ids key ``done``)
    with torch.no_grad():
        for (name, kind, parameter), drop in removed.items():
            module = modules[name]
            member = GroupMember(name, kind, drop, drop, 0, 0, parameter=parameter)  # type: ignore[arg-type]
            sliced = _sliced_parameters(member, module)
            if isinstance(module, _BatchNorm) and module.running_mean is not None:
                sliced += [("running_mean", 0), ("running_var", 0)]
            for attribute, dim in sliced:
                tensor = getattr(module, attribute)
                if (id(tensor), dim) not in done:
                    keep = torch.ones(tensor.shape[dim], dtype=torch.bool)
                    keep[drop] = False
                    value = tensor.detach()[(slice(None),) * dim + (keep.to(tensor.device),)].clone()
                    dense.append(tensor)
                    done[id(tensor), dim] = nn.Parameter(value, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else value
                setattr(module, attribute, done[id(tensor), dim])
            _set_width(module, kind, getattr(module, "weight").shape if getattr(module, "weight", None) is not None else None)


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
    elif isinstance(module, nn.Embedding):
        module.embedding_dim = weight_shape[1]
    elif is_norm(module) and hasattr(module, "normalized_shape"):
        module.normalized_shape = (weight_shape[0],)


def removed_positions(groups: Sequence[ChannelGroup], removed: Mapping[int, torch.Tensor]) -> Removed:
    """``(module, kind, parameter) -> positions`` that removing the channels ``removed[g]`` (bool over group
    ``g``'s channels) takes from the groups' members with parameters."""
    positions: dict[tuple[str, str, Optional[str]], list[torch.Tensor]] = {}
    for group in groups:
        if group.index in removed:
            for member in group.members:
                if member.has_parameters:
                    drop = member.positions[removed[group.index][member.channels]]
                    positions.setdefault((member.module, member.kind, member.parameter), []).append(drop)
    return {key: torch.cat(parts) for key, parts in positions.items()}


def remove_channels(traced: _Graph, groups: Sequence[ChannelGroup], plan: ChannelPlan) -> None:
    """Remove the channels ``plan`` drops from the model ``traced`` was built on: channel groups through
    torch-pruning's graph, head groups and hidden groups by :func:`slice_members`, after which the attention
    modules' head counts and the hidden-width attributes are set from the weights."""
    sliced: dict[int, torch.Tensor] = {}
    for group in groups:
        if group.index not in plan:
            continue
        removed = _removed(group, plan[group.index])
        if group.heads is not None or group.hidden:
            sliced[group.index] = removed
        elif removed.any():
            root = next(member for member in group.members if member.module == group.root and member.kind == "out")
            traced.pruning_group(traced.modules[group.root], root.positions[removed[root.channels]].tolist()).prune()
    if sliced:
        slice_members(traced.modules, removed_positions(groups, sliced))
        sync_head_counts(traced.modules[""])
        sync_hidden_widths(traced.modules[""])


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
