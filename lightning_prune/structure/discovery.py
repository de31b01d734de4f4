"""Channel-group discovery: torch-pruning's groups (:mod:`~lightning_prune.structure.groups`; if asked, also
hidden groups through norms, embeddings and loose parameters) and, if asked, one group of heads per covered
attention module (:mod:`~lightning_prune.structure.attention`), each checked for a consistent channel mapping
and then by numbers: removing about half of every group's channels physically from a copy of the model must
compute what masking them (:func:`channel_masks`, with :func:`norm_masks` for hidden groups) computes. A group
that fails a check is refused, and :func:`refused_channel_groups` says why.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn
from torch.func import functional_call

from lightning_prune.checks import check_example_input, check_module, check_patterns
from lightning_prune.inputs import ExampleInput, model_input, output_tensors
from lightning_prune.modes import eval_mode
from lightning_prune.structure.attention import head_groups
from lightning_prune.structure.groups import (
    ChannelGroup,
    GroupMember,
    _Graph,
    is_norm,
)
from lightning_prune.structure.plans import ChannelPlan, channel_masks, norm_masks
from lightning_prune.structure.removal import remove_channels


@dataclass(frozen=True)
class RefusedGroup:
    """A coupled channel group torch-pruning found that is not pruned: its root layer, its size and why."""

    root: str
    size: int
    reason: str


def _resolve(model: nn.Module, names: Sequence[str], argument: str) -> list[nn.Module]:
    modules = dict(model.named_modules())
    unknown = [name for name in names if name not in modules]
    if unknown:
        raise ValueError(f"`{argument}` names modules that are not in the model: {unknown}.")
    return [modules[name] for name in names]


def _test_plan(groups: Sequence[ChannelGroup]) -> ChannelPlan:
    """About half of every group's channels, drawn with a fixed seed (the global random state is untouched)."""
    generator = torch.Generator().manual_seed(0)
    return {g.index: torch.randperm(g.size, generator=generator)[: max(1, g.size // 2)].sort().values for g in groups}


def _outputs(model: nn.Module, example_input: ExampleInput, parameters: Optional[dict] = None) -> list[torch.Tensor]:
    inputs = model_input(example_input)
    with torch.no_grad(), eval_mode(model):
        if parameters is None:
            return output_tensors(inputs.call(model))
        return output_tensors(functional_call(model, parameters, inputs.args, dict(inputs.kwargs)))


def _masked_outputs(
    model: nn.Module, example_input: ExampleInput, groups: Sequence[ChannelGroup], plan: ChannelPlan
) -> list[torch.Tensor]:
    """The outputs of ``model`` with the channels ``plan`` drops masked, norms of hidden groups over the kept
    channels (``model`` itself is not changed)."""
    parameters = dict(model.named_parameters())
    masked = {name: parameters[name] * mask for name, mask in channel_masks(model, groups, plan).items()}
    handles = norm_masks(model, groups, plan)
    try:
        return _outputs(model, example_input, masked)
    finally:
        for handle in handles:
            handle.remove()


def _pruning_error(
    model: nn.Module,
    example_input: ExampleInput,
    groups: Sequence[ChannelGroup],
    plan: ChannelPlan,
    traced: Optional[_Graph] = None,
) -> Optional[str]:
    """Why removing ``plan``'s channels physically (from the model ``traced`` was built on, else from a copy
    of ``model``) does not compute what masking them in ``model`` computes; ``None`` when it does."""
    try:
        expected = _masked_outputs(model, example_input, groups, plan)
    except ValueError as error:  # a norm that cannot be masked (norm_masks)
        return f"the masked model fails ({error})"
    if not all(bool(tensor.isfinite().all()) for tensor in expected if tensor.is_floating_point()):
        raise ValueError(
            "the model's output on `example_input` is not finite (with some channels masked), so its channel "
            "groups cannot be checked; pass an input (and weights) with a finite output."
        )
    if traced is None:
        traced = _Graph(copy.deepcopy(model), example_input)
    try:
        remove_channels(traced, groups, plan)
        found = _outputs(traced.modules[""], example_input)
    except Exception as error:  # noqa: BLE001 - any failure of the pruned model is the finding
        return f"the physically pruned model fails ({type(error).__name__}: {error})"
    expected = [_without_zero_slices(a, b) for a, b in zip(expected, found)] + expected[len(found) :]
    shapes = [tuple(tensor.shape) for tensor in expected]
    if [tuple(tensor.shape) for tensor in found] != shapes:
        return f"the physically pruned model's output shapes are {[tuple(t.shape) for t in found]}, not {shapes}"
    pairs = [(a.double(), b.double()) for a, b in zip(expected, found) if a.is_floating_point()]
    difference = math.sqrt(sum(float((a - b).square().sum()) for a, b in pairs))
    scale = math.sqrt(sum(float(a.square().sum()) for a, _ in pairs))
    tolerance = max((math.sqrt(torch.finfo(a.dtype).eps) for a in expected if a.is_floating_point()), default=0.0)
    if not difference <= tolerance * max(scale, 1e-12):
        return f"the physically pruned model's output differs from the masked one by {difference / max(scale, 1e-12):.3g} (relative)"
    return None


def _without_zero_slices(masked: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """``masked`` without its all-zero slices along the one dimension where ``pruned`` is smaller, when that
    leaves ``pruned``'s shape (a key/value cache holds the kept heads only; the masked model's removed heads
    are zeros there); else ``masked`` unchanged, for the shape check to report."""
    differing = [dim for dim, (a, b) in enumerate(zip(masked.shape, pruned.shape)) if a != b]
    if masked.dim() != pruned.dim() or len(differing) != 1:
        return masked
    dim = differing[0]
    alive = masked.movedim(dim, 0).flatten(1).ne(0).any(1)
    return masked.index_select(dim, alive.nonzero().flatten()) if int(alive.sum()) == pruned.shape[dim] else masked


def _unfaithful(
    model: nn.Module,
    example_input: ExampleInput,
    groups: Sequence[ChannelGroup],
    plan: ChannelPlan,
    suspects: Sequence[ChannelGroup],
    error: str,
) -> dict[int, str]:
    """Group index -> why, for the ``suspects`` (whose joint removal failed with ``error``) that fail alone;
    found by bisection, so ``k`` wrong groups among ``n`` cost about ``2 k log2 n`` checks. Suspects that
    fail only together are all refused."""
    if len(suspects) == 1:
        return {suspects[0].index: error}
    found: dict[int, str] = {}
    for part in (suspects[: len(suspects) // 2], suspects[len(suspects) // 2 :]):
        part_plan = {group.index: plan[group.index] for group in part}
        part_error = _pruning_error(model, example_input, groups, part_plan)
        if part_error is not None:
            found.update(_unfaithful(model, example_input, groups, plan, part, part_error))
    return found or {group.index: f"{error} (together with the groups of {[g.root for g in suspects]})" for group in suspects}


def _refusal(error: str, reused: Sequence[str]) -> str:
    where = f"; {', '.join(reused)} (a module applied more than once, e.g. to two slices of one tensor)" if reused else ""
    return f"removing its channels physically does not compute what masking them computes: {error}{where}"


_Found = tuple[str, int, list[GroupMember], Optional[str]]
"""A candidate group: its root, size, members and attention module (``None`` for a channel group)."""


def _is_hidden(members: Sequence[GroupMember], modules: dict[str, nn.Module]) -> bool:
    """Whether a group runs through a norm, an embedding or a loose parameter (a hidden group)."""
    return any(
        member.kind == "parameter" or is_norm(modules[member.module]) or isinstance(modules[member.module], nn.Embedding)
        for member in members
    )


def _head_groups(model: nn.Module, ignored: Sequence[nn.Module]) -> tuple[list[_Found], list[RefusedGroup]]:
    """A candidate per head group (one covered attention module, or those sharing their heads) whose q/k/v
    projections are all outside ``ignored``: its heads."""
    order = {name: position for position, name in enumerate(dict(model.named_modules()))}
    found: list[_Found] = []
    refused: list[RefusedGroup] = []
    for site, heads in head_groups(model, order):
        if isinstance(heads, str):
            refused.append(RefusedGroup(site, 0, f"the heads of {site!r} are not pruned: {heads}"))
            continue
        size, members = heads
        if not any(model.get_submodule(m.module) is layer for m in members if m.kind == "out" for layer in ignored):
            found.append((next(m.module for m in members if m.kind == "out"), size, members, site))
    return found, refused


def _discover(
    model: nn.Module, example_input: ExampleInput, ignored_layers: Optional[Sequence[str]], heads: bool, hidden: bool
) -> tuple[list[ChannelGroup], list[RefusedGroup]]:
    check_module("model", model)
    check_example_input("example_input", example_input)
    check_patterns("ignored_layers", ignored_layers)
    for argument, value in (("heads", heads), ("hidden", hidden)):
        if not isinstance(value, bool):
            raise ValueError(f"`{argument}` must be True or False, got {value!r}.")
    work = copy.deepcopy(model)  # traced, then pruned by the test plan
    ignored = _resolve(work, ignored_layers or [], "ignored_layers")
    found, refused = _head_groups(work, ignored) if heads else ([], [])
    projections = [work.get_submodule(m.module) for _, _, members, _ in found for m in members if m.kind == "out"]
    traced = _Graph(work, example_input)
    for root, size, tp_group in traced.root_groups([*ignored, *projections]):  # q/k/v outputs: head groups only
        units = tp_group if isinstance(tp_group, str) else traced.members(tp_group, size, hidden)
        if isinstance(units, str):
            refused.append(RefusedGroup(root, size, units))
        else:
            found.append((root, *units, None))
    # a position claimed by two groups would be removed by either: refuse both
    owners: dict[tuple[str, str, Optional[str], int], int] = {}
    clashing: set[int] = set()
    for number, (_, _, members, _) in enumerate(found):
        for member in members:
            if member.kind == "channel" and not member.has_parameters:
                continue
            for position in member.positions.unique().tolist():
                other = owners.setdefault((member.module, member.kind, member.parameter, position), number)
                if other != number:
                    clashing |= {number, other}
    for number in sorted(clashing):
        root, size, _, _ = found[number]
        refused.append(RefusedGroup(root, size, "shares channel positions with another group"))
    found = [entry for number, entry in enumerate(found) if number not in clashing]
    found.sort(key=lambda entry: next(m.order for m in entry[2] if m.kind == "out"))
    candidates = [
        ChannelGroup(
            index, size, tuple(m.module for m in members if m.kind == "out"), tuple(members), site,
            hidden=site is None and _is_hidden(members, traced.modules),
        )
        for index, (_, size, members, site) in enumerate(found)
    ]
    plan = _test_plan(candidates)
    error = _pruning_error(model, example_input, candidates, plan, traced) if candidates else None
    wrong = {} if error is None else _unfaithful(model, example_input, candidates, plan, candidates, error)
    refused += [
        RefusedGroup(group.root, group.size, _refusal(wrong[group.index], traced.reused(group.members)))
        for group in candidates
        if group.index in wrong
    ]
    groups = [
        dataclasses.replace(group, index=index)
        for index, group in enumerate(group for group in candidates if group.index not in wrong)
    ]
    return groups, refused


def find_channel_groups(
    model: nn.Module,
    example_input: ExampleInput,
    ignored_layers: Optional[Sequence[str]] = None,
    heads: bool = False,
    hidden: bool = False,
) -> list[ChannelGroup]:
    """The prunable coupled channel groups of ``model``, in model order (of each group's first out-layer).

    With ``heads=True``, each attention module of a covered type (:data:`~lightning_prune.structure.HEAD_LAYOUTS`)
    adds one group whose channels are its heads (``ChannelGroup.heads`` names the module; under grouped-query
    attention a channel is a key/value head with its query heads; T5's layers of one stack share one group), and
    its q/k/v outputs form no other group.
    IterativeMagnitude's and AutoPruneCallback's channel modes ask for them.

    With ``hidden=True``, groups may also run through norms over the channels (``LayerNorm``, ``RMSNorm``),
    ``nn.Embedding`` s and loose ``nn.Parameter`` s (class token, position embedding): a transformer's residual
    stream, from its embeddings through every block's input and output projections to the head, is one group
    (``ChannelGroup.hidden``), and so is a LayerNorm-coupled width such as a ConvNeXt stage's. Its norms then
    normalise over the channels that stay: masking it takes :func:`channel_masks` *and*
    :func:`~lightning_prune.structure.plans.norm_masks`; after :func:`apply_plan` the model's hidden-width
    attributes (a Hugging Face ``config.hidden_size``, timm's ``embed_dim``/``num_features``) follow the weights,
    and a tied embedding and output layer stay tied. Attention's head width is unchanged (q/k/v lose input
    channels only).

    Every group is checked on a copy of ``model``: removing about half of its channels physically computes
    what masking them computes, on ``example_input`` (groups that fail are refused:
    :func:`refused_channel_groups`). Discovery holds a second copy of the model while it runs.

    Args:
        model: the network (or a LightningModule around it; names are relative to ``model``).
        example_input: one input batch for tracing (the model is traced in eval mode, then restored). The
            output may be a tensor, a tuple, a dict or a Hugging Face ``ModelOutput`` (caches included).
        ignored_layers: names of modules whose output channels must stay; groups producing them
            are left out (their input channels may still shrink).
        heads: whether attention heads are groups too (see above).
        hidden: whether widths through norms, embeddings and loose parameters are groups too (see above).

    Raises:
        ValueError: ``model``, ``example_input`` or ``ignored_layers`` are not valid; torch-pruning cannot
            map channels through an operation of the model (named in the message); ``heads`` or ``hidden`` is
            not a bool.
    """
    return _discover(model, example_input, ignored_layers, heads, hidden)[0]


def refused_channel_groups(
    model: nn.Module,
    example_input: ExampleInput,
    ignored_layers: Optional[Sequence[str]] = None,
    heads: bool = False,
    hidden: bool = False,
) -> list[RefusedGroup]:
    """The coupled groups :func:`find_channel_groups` leaves out, each with its root layer and the reason
    (coupled to the output, an unsupported member type, an inconsistent channel mapping, a group expansion
    that does not terminate, or a physical removal that does not compute what the masks compute); with
    ``heads=True`` also the attention modules whose heads are not groups (size 0), with the reason (a covered type
    refused, or one of :data:`~lightning_prune.structure.UNPRUNABLE_HEADS` such as ``nn.MultiheadAttention``)."""
    return _discover(model, example_input, ignored_layers, heads, hidden)[1]
