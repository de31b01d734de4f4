"""Coupled channel groups, channel plans and physical channel removal.

Channels that must be removed together (a residual add, a concatenation, a depthwise conv, the
BatchNorm after a conv, the Linear after a flatten) form one :class:`ChannelGroup`; the groups come
from torch-pruning's ``DependencyGraph`` (through a grouped conv, a channel is one in-group index of every
conv group, so the conv keeps its ``groups``); with ``find_channel_groups(..., heads=True)`` the heads of each
attention module of a covered type (:data:`HEAD_LAYOUTS`) form one group too, whose channels are whole heads; with
``hidden=True`` widths through LayerNorm/RMSNorm, embeddings and loose parameters (a transformer's residual
stream) are groups too (``ChannelGroup.hidden``). A :data:`ChannelPlan` says, per group, which channels stay.
:func:`apply_plan` removes the others physically (the model stays a plain, smaller ``nn.Module``),
:func:`channel_masks` gives the 0/1 masks that make the dense model compute the same thing, and the
returned :data:`StructureRecord` lets a fresh dense model be reshaped so that a pruned ``state_dict``
loads (:func:`restore_structure`; the Lightning layer's checkpoint helpers are in ``training_state.py``).

One module per job, all public names re-exported here:

- ``groups``: torch-pruning's groups (:class:`ChannelGroup`, :class:`GroupMember`, :data:`ExampleInput`,
  :func:`output_tensors`), their bounded expansion (:data:`MAX_GROUP_ITEMS`, :data:`MAX_NODE_VISITS`) and the
  consistency checks every group's members pass.
- ``hidden``: the hidden width's attributes (:data:`HIDDEN_WIDTH_ATTRIBUTES`, :func:`sync_hidden_widths`).
- ``attention``: head groups (:data:`HEAD_LAYOUTS`, :class:`HeadLayout`: where an attention module type holds
  its q/k/v and output projections, its per-head tables and its head counts, and which modules share their heads;
  :func:`sync_head_counts`; :data:`UNPRUNABLE_HEADS`: types whose heads are refused, with the reason).
- ``discovery``: :func:`find_channel_groups` (every group also checked by numbers: physical removal computes
  what the masks compute; a model on the meta device through a smaller real ``check_model`` of its layout) and :func:`refused_channel_groups` (:class:`RefusedGroup`: each left-out group's
  reason).
- ``plans``: plans and masks (:data:`ChannelPlan`, :func:`check_plan`, :func:`plan_from_scores`,
  :func:`zeroed_channel_plan`, :func:`channel_masks`, :func:`norm_masks`, :func:`channel_norms`, :func:`layer_channel_ratios`,
  :func:`channel_ratio_vector`).
- ``removal``: physical removal (:func:`apply_plan`; :func:`slice_members` for a graph-free slice).
- ``records``: structure records (:data:`StructureRecord`, :data:`STRUCTURE_KEY`, :func:`structure_record`,
  :func:`restore_structure`, :func:`structure_from_state_dict`).

``training_mode``/``eval_mode`` live in :mod:`lightning_prune.modes` (re-exported here for older imports).
"""

from lightning_prune.modes import eval_mode, training_mode
from lightning_prune.structure.attention import HEAD_LAYOUTS, UNPRUNABLE_HEADS, HeadLayout, sync_head_counts
from lightning_prune.structure.hidden import HIDDEN_WIDTH_ATTRIBUTES, sync_hidden_widths
from lightning_prune.structure.discovery import RefusedGroup, find_channel_groups, refused_channel_groups
from lightning_prune.structure.groups import (
    MAX_GROUP_ITEMS,
    MAX_NODE_VISITS,
    ChannelGroup,
    ExampleInput,
    GroupMember,
    MemberKind,
    output_tensors,
)
from lightning_prune.structure.plans import (
    ChannelPlan,
    channel_masks,
    channel_norms,
    channel_ratio_vector,
    check_plan,
    layer_channel_ratios,
    norm_masks,
    plan_from_scores,
    zeroed_channel_plan,
)
from lightning_prune.structure.records import (
    STRUCTURE_KEY,
    StructureRecord,
    restore_structure,
    structure_from_state_dict,
    structure_record,
)
from lightning_prune.structure.removal import apply_plan, slice_members

__all__ = [
    "HEAD_LAYOUTS",
    "HIDDEN_WIDTH_ATTRIBUTES",
    "HeadLayout",
    "UNPRUNABLE_HEADS",
    "slice_members",
    "sync_head_counts",
    "sync_hidden_widths",
    "MAX_GROUP_ITEMS",
    "MAX_NODE_VISITS",
    "STRUCTURE_KEY",
    "ChannelGroup",
    "ChannelPlan",
    "ExampleInput",
    "GroupMember",
    "MemberKind",
    "RefusedGroup",
    "StructureRecord",
    "apply_plan",
    "channel_masks",
    "channel_norms",
    "channel_ratio_vector",
    "check_plan",
    "eval_mode",
    "find_channel_groups",
    "layer_channel_ratios",
    "norm_masks",
    "output_tensors",
    "plan_from_scores",
    "refused_channel_groups",
    "restore_structure",
    "structure_from_state_dict",
    "structure_record",
    "training_mode",
    "zeroed_channel_plan",
]
