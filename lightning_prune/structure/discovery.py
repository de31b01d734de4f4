"""Channel-group discovery: torch-pruning's groups (:mod:`~lightning_prune.structure.groups`; if asked, also
hidden groups through norms, embeddings and loose parameters) and, if asked, one group of heads per covered
attention module (:mod:`~lightning_prune.structure.attention`), each checked for a consistent channel mapping
and then by numbers: removing about half of every group's channels physically from a copy of the model must
compute what masking them (:func:`channel_masks`, with :func:`norm_masks` for hidden groups) computes. A group
that fails a check is refused, and :func:`refused_channel_groups` says why. A model on the meta device is traced
as it is and its groups are matched, block indices aside, to groups checked by numbers on a smaller real
``check_model`` of its layout.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

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


def _on_meta(model: nn.Module) -> bool:
    """Whether any of ``model``'s parameters or buffers is on the meta device (shapes without values)."""
    return any(tensor.is_meta for tensor in (*model.parameters(), *model.buffers()))


def _candidates(
    work: nn.Module, example_input: ExampleInput, ignored: Sequence[nn.Module], heads: bool, hidden: bool
) -> tuple[list[ChannelGroup], list[RefusedGroup], _Graph]:
    """The groups of ``work`` (traced on ``example_input``) that pass the consistency checks, not yet checked by
    numbers; the groups refused so far; the traced graph."""
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
    return candidates, refused, traced


def _checked_by_numbers(
    model: nn.Module, example_input: ExampleInput, candidates: Sequence[ChannelGroup], traced: _Graph
) -> tuple[list[ChannelGroup], list[RefusedGroup]]:
    """The ``candidates`` (traced on a copy of ``model``) whose physical removal computes what masking them
    computes, and the others refused with the reason."""
    plan = _test_plan(candidates)
    error = _pruning_error(model, example_input, candidates, plan, traced) if candidates else None
    wrong = {} if error is None else _unfaithful(model, example_input, candidates, plan, candidates, error)
    refused = [
        RefusedGroup(group.root, group.size, _refusal(wrong[group.index], traced.reused(group.members)))
        for group in candidates
        if group.index in wrong
    ]
    return [group for group in candidates if group.index not in wrong], refused


def _block_renamer(model: nn.Module, check_model: nn.Module) -> Callable[[str], str]:
    """A function writing a module name with the block index of each ``nn.ModuleList`` that ``model`` and
    ``check_model`` hold with different lengths as ``*`` (``model.layers.17.mlp`` -> ``model.layers.*.mlp``),
    after checking that the two models are one layout: the same module types under the same renamed names."""
    lists = {name: len(m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList)}
    repeated = [
        name for name, m in check_model.named_modules()
        if isinstance(m, nn.ModuleList) and lists.get(name, len(m)) != len(m)
    ]
    pattern = re.compile("|".join(rf"(?<=^{re.escape(name)}\.)\d+(?=\.|$)" for name in repeated)) if repeated else None

    def rename(name: str) -> str:
        return pattern.sub("*", name) if pattern is not None else name

    def layout(network: nn.Module) -> set[tuple[str, str]]:
        return {(rename(name), type(m).__qualname__) for name, m in network.named_modules()}

    differing = sorted(layout(model) ^ layout(check_model))
    if differing:
        raise ValueError(
            "`check_model` must have `model`'s layout (the same module types under the same names, blocks of an "
            f"nn.ModuleList fewer or more); these (name, type) pairs are in one model only: {differing[:6]}."
        )
    return rename


def _signature(group: ChannelGroup, rename: Callable[[str], str]) -> tuple:
    """What a group removes, with block indices renamed (:func:`_block_renamer`): its size, heads site, whether
    hidden, and per member its module, kind, parameter, dimension, positions and their channels."""
    members = frozenset(
        (rename(m.module), m.kind, m.parameter, m.dim, tuple(m.positions.tolist()), tuple(m.channels.tolist()))
        for m in group.members
    )
    return group.size, group.heads and rename(group.heads), group.hidden, rename(group.root), members


def _checked_by_structure(
    check_model: nn.Module,
    rename: Callable[[str], str],
    example_input: ExampleInput,
    candidates: Sequence[ChannelGroup],
    heads: bool,
    hidden: bool,
) -> tuple[list[ChannelGroup], list[RefusedGroup]]:
    """The ``candidates`` each equal, up to block indices (``rename``: :func:`_block_renamer`), to a group of
    ``check_model`` that was checked by numbers there (:func:`_discover` on ``check_model``); the others refused
    with the reason."""
    passed, failed = _discover(check_model, example_input, None, heads, hidden)  # ignoring changes no other group
    checked = {_signature(group, rename) for group in passed}
    why = {rename(group.root): group.reason for group in failed}
    accepted, refused = [], []
    for group in candidates:
        if _signature(group, rename) in checked:
            accepted.append(group)
            continue
        reason = why.get(rename(group.root), "no group of `check_model` removes the same positions of the same modules")
        refused.append(RefusedGroup(group.root, group.size, f"not checked by numbers on `check_model`: {reason}"))
    return accepted, refused


def _discover(
    model: nn.Module,
    example_input: ExampleInput,
    ignored_layers: Optional[Sequence[str]],
    heads: bool,
    hidden: bool,
    check_model: Optional[nn.Module] = None,
) -> tuple[list[ChannelGroup], list[RefusedGroup]]:
    check_module("model", model)
    check_example_input("example_input", example_input)
    check_patterns("ignored_layers", ignored_layers)
    for argument, value in (("heads", heads), ("hidden", hidden)):
        if not isinstance(value, bool):
            raise ValueError(f"`{argument}` must be True or False, got {value!r}.")
    if check_model is not None:
        check_module("check_model", check_model)
        if _on_meta(check_model):
            raise ValueError("`check_model` must hold real weights (its groups are checked by numbers), not meta tensors.")
        rename = _block_renamer(model, check_model)
    elif _on_meta(model):
        raise ValueError(
            "`model` is on the meta device, so its groups cannot be checked by numbers; pass `check_model`, a real "
            "model of the same layout with fewer blocks (e.g. the same config with 2 layers)."
        )
    if check_model is None:
        work = copy.deepcopy(model)  # traced, then pruned by the test plan
        candidates, refused, traced = _candidates(
            work, example_input, _resolve(work, ignored_layers or [], "ignored_layers"), heads, hidden
        )
        groups, wrong = _checked_by_numbers(model, example_input, candidates, traced)
    else:  # traced as it is (nothing is removed from it), on meta tensors when its weights are
        traced_input = model_input(example_input).to("meta") if _on_meta(model) else example_input
        candidates, refused, _ = _candidates(
            model, traced_input, _resolve(model, ignored_layers or [], "ignored_layers"), heads, hidden
        )
        groups, wrong = _checked_by_structure(check_model, rename, example_input, candidates, heads, hidden)
    return [dataclasses.replace(group, index=index) for index, group in enumerate(groups)], refused + wrong


def find_channel_groups(
    model: nn.Module,
    example_input: ExampleInput,
    ignored_layers: Optional[Sequence[str]] = None,
    heads: bool = False,
    hidden: bool = False,
    check_model: Optional[nn.Module] = None,
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

    A model too large for that (a Llama-7B layout: 24 to 27 GB in fp32) can be built on the meta device
    (``with torch.device("meta"):``) and passed with ``check_model``, a real model of the same layout with
    fewer blocks (the same config with 2 layers, or any ``nn.ModuleList`` of blocks shorter): ``model`` is then
    traced as it is (on meta tensors: shapes only, no copy, no weight materialised), and the numeric check runs on
    ``check_model`` alone. A group of ``model`` is returned only if a group of ``check_model`` that passed the
    numeric check removes exactly the same positions of the same modules, block indices aside (the same size, the
    same widths: ``check_model`` keeps every width, and its vocabulary may be smaller); every other group is
    refused, with the reason. What is checked by numbers is thus each kind of group once per block of
    ``check_model``, not each block of ``model``: blocks beyond ``check_model``'s are trusted to be wired like
    them (their module types and group positions are compared, their numbers are not).

    Args:
        model: the network (or a LightningModule around it; names are relative to ``model``).
        example_input: one input batch for tracing (the model is traced in eval mode, then restored). The
            output may be a tensor, a tuple, a dict or a Hugging Face ``ModelOutput`` (caches included).
        ignored_layers: names of modules whose output channels must stay; groups producing them
            are left out (their input channels may still shrink).
        heads: whether attention heads are groups too (see above).
        hidden: whether widths through norms, embeddings and loose parameters are groups too (see above).
        check_model: a real model of ``model``'s layout with fewer blocks on which the groups are checked by
            numbers instead of on a copy of ``model`` (required when ``model`` is on the meta device; see above).
            ``example_input`` must suit both (token ids below the smaller vocabulary).

    Raises:
        ValueError: ``model``, ``example_input`` or ``ignored_layers`` are not valid; ``model`` is on the meta
            device without ``check_model``; ``check_model`` is on the meta device or not of ``model``'s layout; torch-pruning cannot
            map channels through an operation of the model (named in the message); ``heads`` or ``hidden`` is
            not a bool.
    """
    return _discover(model, example_input, ignored_layers, heads, hidden, check_model)[0]


def refused_channel_groups(
    model: nn.Module,
    example_input: ExampleInput,
    ignored_layers: Optional[Sequence[str]] = None,
    heads: bool = False,
    hidden: bool = False,
    check_model: Optional[nn.Module] = None,
) -> list[RefusedGroup]:
    """The coupled groups :func:`find_channel_groups` leaves out, each with its root layer and the reason
    (coupled to the output, an unsupported member type, an inconsistent channel mapping, a group expansion
    that does not terminate, or a physical removal that does not compute what the masks compute); with
    ``heads=True`` also the attention modules whose heads are not groups (size 0), with the reason (a covered type
    refused, or one of :data:`~lightning_prune.structure.UNPRUNABLE_HEADS` such as ``nn.MultiheadAttention``); with
    ``check_model``, also the groups no group of ``check_model`` checked by numbers matches."""
    return _discover(model, example_input, ignored_layers, heads, hidden, check_model)[1]
