"""Coupled channel groups as torch-pruning's ``DependencyGraph`` proposes them: the traced graph, its
bounded group expansion, and the consistency checks every group's members pass.

Channels that must be removed together (a residual add, a concatenation, a depthwise conv, the
BatchNorm after a conv, the Linear after a flatten) form one :class:`ChannelGroup`;
:func:`~lightning_prune.structure.discovery.find_channel_groups` finds them.

Supported group members: ``Conv1d/2d/3d`` (any ``groups``) and ``ConvTranspose1d/2d/3d`` with ``groups=1``,
depthwise convs (``groups == in == out``), ``Linear``, ``BatchNorm`` and parameter-free modules (activations,
pooling, dropout). A group that touches any other parametrised module (a grouped transposed conv, LayerNorm,
GroupNorm, PReLU, attention, a loose ``nn.Parameter``) is left out, and so is every group coupled to the
model's output: the last layer's output units and the model's input channels are never pruned. Attention
heads are groups of their own, built from the module's layout rather than traced
(:mod:`~lightning_prune.structure.attention`).

Hidden widths (opt-in, ``find_channel_groups(..., hidden=True)``): a group may also run through norms over the
channel dimension (``LayerNorm`` over one dimension, ``RMSNorm``; :func:`is_norm`), ``nn.Embedding`` (its
``embedding_dim`` is an output width) and loose ``nn.Parameter`` s whose last dimension carries the channels (a
ViT's class token and position embedding): a transformer's residual stream. Such a group is a *hidden* group
(``ChannelGroup.hidden``); a norm normalises over the channels that stay, so the masked model computes the pruned
one only with :func:`~lightning_prune.structure.plans.norm_masks` in place.

Grouped convs (``1 < groups``, not depthwise: ResNeXt, RegNet) are pruned as Torch-Pruning prunes them: the
conv keeps its ``groups`` and loses the same in-group index from every conv group, so its conv groups stay
equally wide and a ResNeXt block keeps its cardinality. A group through one therefore counts units, not single
channels: a unit is one in-group index across all conv groups (ResNeXt-50 32x4d's first stage: 4 units of 32
channels; :func:`_conv_group_units`). A group that covers a grouped conv's conv groups unevenly (one branch of
a concatenation per conv group) is left out.

Every group torch-pruning proposes is checked here before it is accepted: each member's positions lie
inside the module's dimension, no position is claimed twice (within a group or by two groups), and each
channel occupies equally many positions of a member. A group whose expansion runs away (a loop through
attention's reshapes, Swin's window shifts) is stopped within :data:`MAX_GROUP_ITEMS` channel indices and
:data:`MAX_NODE_VISITS` visits of one graph node. ``discovery`` then checks each accepted group numerically.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Mapping, Optional, Sequence, Union

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from lightning_prune.inputs import ExampleInput, output_tensors
from lightning_prune.modes import eval_mode
from lightning_prune.structure.tracing import dependency_graph, index_mapping_fixed
from lightning_prune.targets import linear_features, linear_types

MemberKind = Literal["out", "in", "channel", "table", "parameter"]


@dataclass(frozen=True, eq=False)
class GroupMember:
    """One module touched by a channel group.

    Attributes:
        module: module name, relative to the model the groups were found on.
        kind: ``"out"``: a Conv/Linear whose output channels (weight dim 0, bias) carry the group
            (a depthwise conv is ``"out"``); ``"in"``: a Conv/Linear whose input channels (weight
            dim 1) carry it (an ``nn.Embedding`` is ``"out"``: its weight's dim 1); ``"channel"``: a per-channel
            module (BatchNorm, a norm of a hidden group; pooling, activations); ``"table"``: a per-head table of an
            attention module (its own parameters' last dimension); ``"parameter"``: the loose ``nn.Parameter``
            ``parameter`` of ``module``, channels along its last dimension.
        positions: ``LongTensor``, indices along that dimension of the module that belong to the group (a
            grouped conv's input channels: columns of its weight, the in-group index shared by its conv groups).
        channels: ``LongTensor`` of the same length: the group channel behind each position (behind
            a flatten, one channel occupies ``H*W`` positions of the following Linear; through a grouped conv,
            one position per conv group).
        dim: full size of that dimension in the dense module (all groups together; a grouped conv's inputs:
            ``in_channels / groups``, its weight's width).
        order: the module's position in ``model.named_modules()``.
        has_parameters: whether the module holds parameters of its own (parameter-free members, such
            as an activation module called several times, are not checked for consistency).
        parameter: for a ``"parameter"`` member, the parameter's name in ``module``; else ``None``.
    """

    module: str
    kind: MemberKind
    positions: torch.Tensor
    channels: torch.Tensor
    dim: int
    order: int
    has_parameters: bool = True
    parameter: Optional[str] = None


@dataclass(frozen=True, eq=False)
class ChannelGroup:
    """Channels that can only be removed together.

    Holds names and small index tensors only (no modules, no graph), so it pickles cheaply and stays
    valid for the model's *current* shapes: after :func:`apply_plan`, find the groups again.

    Attributes:
        index: position in the list returned by :func:`find_channel_groups` (the key in a plan).
        size: number of channels; channel ``c`` is output channel ``c`` of ``layers[0]`` (through a grouped
            conv, a unit of its output channels, one per conv group: see the ``"out"`` member of ``layers[0]``).
        layers: names of the Conv/Linear modules whose output channels these are, in model order.
        members: every named module the group touches, in model order.
        heads: for a group of attention heads (:mod:`~lightning_prune.structure.attention`), the attention
            module's name (the first of those sharing their heads, T5's layers of one stack): channel ``c`` is its
            head ``c`` (key/value head ``c`` with its query heads under grouped-query attention); ``None`` for a
            group of channels.
        hidden: whether the group runs through a norm, an embedding or a loose parameter (a residual stream,
            found with ``hidden=True``); it is removed by slicing, and masked with
            :func:`~lightning_prune.structure.plans.norm_masks`.
    """

    index: int
    size: int
    layers: tuple[str, ...]
    members: tuple[GroupMember, ...]
    heads: Optional[str] = None
    hidden: bool = False

    @property
    def root(self) -> str:
        """The first out-layer; the group's channel indices are its output channel indices."""
        return self.layers[0]


def _is_depthwise(module: _ConvNd) -> bool:
    """A conv acting per channel (``groups == in == out``): its input and output channels are one."""
    return module.groups == module.in_channels == module.out_channels and not module.transposed


def _is_grouped(module: nn.Module) -> bool:
    """A conv with ``1 < groups`` that is not depthwise (ResNeXt's, RegNet's): each of its ``groups`` conv groups
    reads ``in_channels / groups`` inputs and writes ``out_channels / groups`` outputs."""
    return isinstance(module, _ConvNd) and module.groups > 1 and not _is_depthwise(module)


def _is_leaf(module: nn.Module) -> bool:
    return next(module.children(), None) is None


def is_norm(module: nn.Module) -> bool:
    """A norm over the channel (last) dimension a hidden group may run through: ``nn.LayerNorm`` (timm's
    channels-first ``LayerNorm2d`` included), ``nn.RMSNorm``, or a module type named ``...RMSNorm`` (Hugging
    Face's ``LlamaRMSNorm``: a weight over the channels, no other parameter)."""
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return True
    parameters = dict(module.named_parameters(recurse=False))
    return type(module).__name__.endswith("RMSNorm") and list(parameters) == ["weight"] and parameters["weight"].dim() == 1


def norm_width(module: nn.Module) -> int:
    """The number of channels a norm (:func:`is_norm`) normalises over."""
    weight = getattr(module, "weight", None)
    return weight.shape[0] if weight is not None else module.normalized_shape[-1]


def _member_kind(module: nn.Module, is_out: bool, hidden: bool = False) -> Union[MemberKind, str]:
    """How a module carries a group's channels, or why such a group is not supported (a sentence); norms and
    embeddings only with ``hidden``."""
    if isinstance(module, _ConvNd):
        depthwise = _is_depthwise(module)
        if module.groups > 1 and module.transposed:
            return f"a grouped {type(module).__name__} (groups={module.groups}) is not supported"
        return "out" if is_out or depthwise else "in"
    if isinstance(module, linear_types()):
        return "out" if is_out else "in"
    if isinstance(module, _BatchNorm) or next(module.parameters(recurse=False), None) is None:
        return "channel"
    if (is_norm(module) or isinstance(module, nn.Embedding)) and not hidden:
        return f"{type(module).__name__} carries a hidden width (find_channel_groups(..., hidden=True) prunes it)"
    if is_norm(module):
        if len(getattr(module, "normalized_shape", (0,))) != 1:
            return f"a {type(module).__name__} over {len(module.normalized_shape)} dimensions is not supported"
        return "channel"
    if isinstance(module, nn.Embedding):
        return "out"
    return f"a {type(module).__name__} (a parametrised module of unsupported type) is not supported"


def _member_dim(module: nn.Module, kind: MemberKind, channels: Optional[int]) -> int:
    if isinstance(module, _ConvNd):
        return module.in_channels if kind == "in" else module.out_channels
    if isinstance(module, linear_types()):
        return linear_features(module)[kind == "out"]
    if isinstance(module, _BatchNorm):
        return module.num_features
    if isinstance(module, nn.Embedding):
        return module.embedding_dim
    if is_norm(module):
        return norm_width(module)
    assert channels is not None, "a traced per-channel module has a recorded output width"
    return channels


class _Graph:
    """A torch-pruning ``DependencyGraph`` of a model plus the model names of its nodes and how often each
    leaf module was called in the traced forward."""

    def __init__(self, model: nn.Module, example_input: ExampleInput) -> None:
        self.modules = dict(model.named_modules())
        self.names = {module: name for name, module in self.modules.items()}
        self.order = {name: position for position, name in enumerate(self.modules)}
        self.leaf_by_grad_fn: dict[Any, str] = {}
        self.channels: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        handles = [
            module.register_forward_hook(self._recorder(name))
            for name, module in self.modules.items()
            if _is_leaf(module)
        ]
        try:
            with eval_mode(model), torch.enable_grad():
                self.graph = dependency_graph(model, example_input)
        except (ZeroDivisionError, IndexError, KeyError) as error:  # torch-pruning's index mapping failed
            node = _failing_node(error.__traceback__)
            raise ValueError(
                f"torch-pruning cannot map channels through {node} ({type(error).__name__}: {error}); "
                "e.g. a reshape that splits the channel dimension (a channel shuffle). This model's channel "
                "groups are not supported."
            ) from error
        finally:
            for handle in handles:
                handle.remove()

    def _recorder(self, name: str):  # noqa: ANN202 - a forward hook
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            self.calls[name] = self.calls.get(name, 0) + 1
            if isinstance(output, torch.Tensor) and output.grad_fn is not None:
                # The first leaf producing a tensor names it (an empty shortcut passes its input on).
                self.leaf_by_grad_fn.setdefault(output.grad_fn, name)
                if output.dim() >= 2:
                    self.channels.setdefault(name, output.shape[1])

        return hook

    def reused(self, members: Sequence[GroupMember]) -> list[str]:
        """The members with parameters that the traced forward called more than once, each with its count."""
        return [
            f"{member.module!r} is called {self.calls[member.module]} times in forward"
            for member in members
            if member.has_parameters and self.calls.get(member.module, 0) > 1
        ]

    def node_name(self, node: Any) -> Optional[str]:
        if node.type == tp.ops.OPTYPE.ELEMENTWISE:
            return self.leaf_by_grad_fn.get(node.grad_fn)
        if node.type == tp.ops.OPTYPE.PARAMETER:
            return None
        return self.names.get(node.module)

    def pruning_group(self, root: nn.Module, idxs: Sequence[int]) -> Any:
        pruner = self.graph.get_pruner_of_module(root)
        with index_mapping_fixed():
            return self.graph.get_pruning_group(root, pruner.prune_out_channels, list(idxs))

    def root_groups(self, ignored: Sequence[nn.Module]) -> list[tuple[str, int, Union[Any, str]]]:
        """Per coupled group whose out-layers are all outside ``ignored``: its root (first Conv/Linear producing
        it, in model order), the root's width and torch-pruning's group over all its channels, or why the
        expansion was stopped (:func:`_bounded_groups`). As ``DependencyGraph.get_all_groups``, with one
        group's runaway expansion refusing that group only. A list, not a generator: torch-pruning is patched
        only while the groups are expanded here, never while a caller holds a half-consumed iteration (a
        generator left suspended, or closed out of order, would leave torch-pruning patched for the process)."""
        skipped = set(ignored) | set(self.graph.IGNORED_LAYERS_IN_TRACING)
        visited: set[nn.Module] = set()
        found: list[tuple[str, int, Union[Any, str]]] = []
        with _bounded_groups(self.names), _index_mapping_as_built():
            for name, module in self.modules.items():
                if not isinstance(module, (_ConvNd, *linear_types())) or module in skipped or module in visited:
                    continue
                pruner = self.graph.get_pruner_of_module(module) if module in self.graph.module2node else None
                size = None if pruner is None else pruner.get_out_channels(module)
                if size is None:
                    continue
                try:
                    tp_group = self.pruning_group(module, range(size))
                except _Runaway as error:
                    visited.add(module)
                    found.append((name, size, str(error)))
                    continue
                producers = {
                    item.dep.target.module
                    for item in tp_group.items
                    if self.graph.is_out_channel_pruning_fn(item.dep.handler)
                }
                visited |= producers
                if not producers & skipped:
                    found.append((name, size, tp_group))
        return found

    def members(self, tp_group: Any, size: int, hidden: bool = False) -> Union[tuple[int, list[GroupMember]], str]:
        """The number of channels and the named members of a torch-pruning group over ``size`` root channels,
        or why the group is not prunable here; with ``hidden``, norms, embeddings and loose parameters may be
        members. Through a grouped conv a channel is a unit of root channels (:func:`_conv_group_units`)."""
        members = []
        for item in tp_group.items:
            node, handler = item.dep.target, item.dep.handler
            is_out = self.graph.is_out_channel_pruning_fn(handler)
            if node.type == tp.ops.OPTYPE.OUTPUT or (is_out and not node.outputs):
                return "coupled to the model's output"
            if node.type == tp.ops.OPTYPE.PARAMETER:
                member = self._parameter_member(node, item) if hidden else "coupled to a loose nn.Parameter"
                if isinstance(member, str):
                    return member
                if member is not None:
                    members.append(member)
                continue
            if _is_attention(node):
                return (
                    f"its channels flow through attention ({node.name}): heads are not pruned, and "
                    "removing single q/k/v channels would break the head reshape"
                )
            name = self.node_name(node)
            if name is None:
                continue  # an unnamed functional op (add, cat, flatten, ...): no weights, no FLOPs
            module = self.modules[name]
            kind = _member_kind(module, is_out, hidden)
            if kind not in ("out", "in", "channel"):
                return f"{name!r}: {kind}"
            members.append(
                GroupMember(
                    module=name,
                    kind=kind,
                    positions=torch.tensor(item.idxs, dtype=torch.long),
                    channels=torch.tensor(item.root_idxs, dtype=torch.long),
                    dim=_member_dim(module, kind, self.channels.get(name)),
                    order=self.order[name],
                    has_parameters=next(module.parameters(recurse=False), None) is not None,
                )
            )
        members.sort(key=lambda member: (member.order, member.kind, member.parameter or ""))
        found = _inconsistency(members) or _conv_group_units(members, self.modules, size)
        return found if isinstance(found, str) else _inconsistency(found[1]) or found

    def _parameter_member(self, node: Any, item: Any) -> Union[GroupMember, str, None]:
        """A loose parameter's member (channels along its last dimension), ``None`` for a norm's own weight
        (its ``"channel"`` member slices it), or why it cannot be one."""
        owner, _, attribute = self.graph._param_to_name[node.module].rpartition(".")
        module = self.modules[owner]
        if is_norm(module):
            return None
        parameter = getattr(module, attribute)
        if getattr(node, "pruning_dim", None) != parameter.dim() - 1:
            return f"the loose nn.Parameter {_qualified_name(owner, attribute)!r} carries channels outside its last dimension"
        return GroupMember(
            module=owner,
            kind="parameter",
            positions=torch.tensor(item.idxs, dtype=torch.long),
            channels=torch.tensor(item.root_idxs, dtype=torch.long),
            dim=parameter.shape[-1],
            order=self.order[owner],
            parameter=attribute,
        )


def _qualified_name(module: str, parameter: str) -> str:
    return f"{module}.{parameter}" if module else parameter


def _conv_group_units(
    members: Sequence[GroupMember], modules: Mapping[str, nn.Module], size: int
) -> Union[tuple[int, list[GroupMember]], str]:
    """A group's members re-indexed by units that keep every grouped conv's conv groups equally wide, and the
    number of units; or why no such unit exists. As Torch-Pruning, a grouped conv keeps its ``groups`` and
    loses the same in-group index from every conv group: root channels that reach one in-group index of a
    grouped member belong to one unit (ResNeXt's 32x4d block: 4 units of 32 channels each). A grouped conv's
    input positions become columns of its weight (the in-group index, ``dim = in_channels / groups``)."""
    grouped = [member for member in members if _is_grouped(modules[member.module])]
    if not grouped:
        return size, list(members)
    parent = list(range(size))  # union-find over the root channels

    def find(channel: int) -> int:
        while parent[channel] != channel:
            parent[channel] = parent[parent[channel]]
            channel = parent[channel]
        return channel

    for member in grouped:
        width = member.dim // modules[member.module].groups
        first: dict[int, int] = {}
        for position, channel in zip(member.positions.tolist(), member.channels.tolist()):
            parent[find(channel)] = find(first.setdefault(position % width, channel))
    labels: dict[int, int] = {}
    unit = torch.tensor([labels.setdefault(find(channel), len(labels)) for channel in range(size)], dtype=torch.long)
    remapped = []
    for member in members:
        channels = unit[member.channels]
        if member in grouped:
            groups = modules[member.module].groups
            width = member.dim // groups
            spread = torch.zeros(len(labels), groups, dtype=torch.long)
            spread.index_put_((channels, member.positions // width), torch.ones_like(channels), accumulate=True)
            if not bool((spread == spread[:, :1]).all()):
                return (
                    f"{member.module!r}: removing a channel would leave its {groups} conv groups unequally wide "
                    "(the group covers its conv groups unevenly)"
                )
            if member.kind == "in":  # a column's positions are all of one unit (united above)
                unit_of = torch.full((width,), -1, dtype=torch.long).scatter_(0, member.positions % width, channels)
                columns = (unit_of >= 0).nonzero().flatten()
                remapped.append(dataclasses.replace(member, positions=columns, channels=unit_of[columns], dim=width))
                continue
        remapped.append(dataclasses.replace(member, channels=channels))
    return len(labels), remapped


def _inconsistency(members: Sequence[GroupMember]) -> Optional[str]:
    """Why a group's members do not describe a consistent channel removal, or ``None`` if they do:
    every position inside its module's dimension, no position of a (module, kind) claimed twice, as
    many positions as channels, and each channel occupying equally many positions of the member."""
    claimed: dict[tuple[str, str, Optional[str]], list[torch.Tensor]] = {}
    for member in members:
        if member.kind == "channel" and not member.has_parameters:
            continue  # nothing to slice (an activation may well be called several times)
        where = f"{member.module!r} ({member.kind} channels)"
        if member.positions.numel() != member.channels.numel():
            return f"{where}: {member.positions.numel()} positions for {member.channels.numel()} channels"
        if member.positions.numel() and (int(member.positions.min()) < 0 or int(member.positions.max()) >= member.dim):
            return f"{where}: positions outside [0, {member.dim}) (a module used more than once in forward?)"
        counts = torch.bincount(member.channels)
        counts = counts[counts > 0]
        if counts.numel() and not bool((counts == counts[0]).all()):
            return f"{where}: channels occupy unequal numbers of positions"
        claimed.setdefault((member.module, member.kind, member.parameter), []).append(member.positions)
    for (module, kind, _), positions in claimed.items():
        every = torch.cat(positions)
        if every.unique().numel() != every.numel():
            return f"{module!r} ({kind} channels): a position is claimed twice (a module used twice in forward?)"
    return None


_ATTENTION_OPS = ("Attention", "Bmm", "Baddbmm")


def _is_attention(node: Any) -> bool:
    """A torch-pruning node that splits q/k/v (``unbind``) or mixes channels of two activations
    (``scaled_dot_product_attention``, a batched matmul): its index mapping is not channel-wise."""
    if node.type == tp.ops.OPTYPE.UNBIND:
        return True
    grad_fn = type(node.grad_fn).__name__ if node.grad_fn is not None else ""
    return node.type == tp.ops.OPTYPE.ELEMENTWISE and any(op in grad_fn for op in _ATTENTION_OPS)


def _failing_node(traceback: Any) -> str:
    """The torch-pruning graph node being processed where an exception was raised (for the message)."""
    found = "an operation"
    while traceback is not None:
        node = traceback.tb_frame.f_locals.get("node")
        if node is not None and hasattr(node, "name"):
            inputs = ", ".join(str(getattr(item, "name", item)) for item in getattr(node, "inputs", [])[:2])
            found = f"{node.name} (after {inputs})" if inputs else str(node.name)
        traceback = traceback.tb_next
    return found


MAX_GROUP_ITEMS = 1_000_000
"""A torch-pruning group with more channel indices (over all its entries) than this is taken as a runaway
expansion (Swin's window attention grows one past 5 GB) and refused, instead of exhausting memory."""

MAX_NODE_VISITS = 64
"""A torch-pruning group that reaches one graph node (with one pruning function) more often than this, each
time with other channel indices, is taken as a runaway expansion (a loop through attention's reshapes, as in
Llama, would never end: each visit costs a scan of the whole group) and refused."""


class _Runaway(Exception):
    """A group's expansion passed :data:`MAX_GROUP_ITEMS` or :data:`MAX_NODE_VISITS`; the message says where."""


@contextlib.contextmanager
def _bounded_groups(names: Mapping[nn.Module, str]) -> Iterator[None]:
    """Make torch-pruning's group expansion raise :class:`_Runaway` past :data:`MAX_GROUP_ITEMS` indices or
    :data:`MAX_NODE_VISITS` visits of one node, so that discovery ends in bounded time and memory; and answer
    its "is this entry in the group already?" from a set instead of a scan of the group (a scan per entry
    made a long group's expansion quadratic: seconds for a tiny Llama's attention loop)."""
    group_class = tp.dependency.Group
    add_dep, has_pruning_op = group_class.add_dep, group_class.has_pruning_op

    def node_name(node: Any) -> str:
        return repr(names.get(node.module, node.name))

    def bounded(group: Any, dep: Any, idxs: Any) -> None:
        if not hasattr(group, "lightning_prune_entries"):
            group.lightning_prune_size, group.lightning_prune_visits, group.lightning_prune_entries = 0, {}, set()
        group.lightning_prune_size += len(idxs)
        key = (dep.target, dep.handler)
        visits = group.lightning_prune_visits[key] = group.lightning_prune_visits.get(key, 0) + 1
        if group.lightning_prune_size > MAX_GROUP_ITEMS or visits > MAX_NODE_VISITS:
            root = node_name(group._group[0].dep.target)
            raise _Runaway(
                f"torch-pruning's channel mapping does not terminate: the group rooted at {root} grows past "
                f"{MAX_GROUP_ITEMS} channel indices (e.g. shifted-window attention)"
                if group.lightning_prune_size > MAX_GROUP_ITEMS
                else f"torch-pruning's channel mapping does not terminate: the group rooted at {root} reaches "
                f"{node_name(dep.target)} more than {MAX_NODE_VISITS} times with other channel indices (a loop, "
                "e.g. through attention's reshapes)"
            )
        group.lightning_prune_entries.add((dep.target, dep.handler, tuple(idxs)))
        add_dep(group, dep, idxs)

    def has(group: Any, dep: Any, idxs: Any) -> bool:
        if not hasattr(group, "lightning_prune_entries"):
            return has_pruning_op(group, dep, idxs)
        return (dep.target, dep.handler, tuple(idxs)) in group.lightning_prune_entries

    group_class.add_dep, group_class.has_pruning_op = bounded, has
    try:
        yield
    finally:
        group_class.add_dep, group_class.has_pruning_op = add_dep, has_pruning_op


@contextlib.contextmanager
def _index_mapping_as_built() -> Iterator[None]:
    """Skip torch-pruning's recomputation of every concat/split/reshape index mapping before each group (a
    scan of the whole graph per group: most of DenseNet-121's discovery time). ``build_dependency`` computed
    them, and they hold while no module changes shape."""
    module = tp.dependency.index_mapping
    update = module.update_index_mapping
    module.update_index_mapping = lambda graph: None
    try:
        yield
    finally:
        module.update_index_mapping = update


def _out_width(module: nn.Module) -> int:
    """A group root's output width: a Conv's ``out_channels``, a Linear's ``out_features``, an embedding's
    ``embedding_dim``."""
    if isinstance(module, nn.Embedding):
        return module.embedding_dim
    return module.out_channels if isinstance(module, _ConvNd) else linear_features(module)[1]


def _check_groups_match(model: nn.Module, groups: Sequence[ChannelGroup]) -> dict[str, nn.Module]:
    modules = dict(model.named_modules())
    for group in groups:
        root = modules.get(group.root)
        width = None if root is None else _out_width(root)
        expected = sum(m.positions.numel() for m in group.members if m.module == group.root and m.kind == "out")
        if width != expected:
            raise ValueError(
                f"`groups` do not describe this model (group {group.index} expects {group.root!r} with "
                f"{expected} output channels); find the groups again on the model's current shape."
            )
    return modules
