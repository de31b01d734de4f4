"""Channel gates and the Pruning-from-Scratch gate objective (Wang et al., AAAI 2020).

A gate is one scalar λ per prunable channel, initialised to 1, that multiplies the channel's
output while the weights keep their random initialisation. Channels coupled through a residual
add or a concatenation form one channel group (``structure.find_channel_groups``) and share one
gate per group channel, so every module output of a group is multiplied by the same λ and a
channel with a small gate disappears everywhere it is coupled.

Three gate positions:

- ``"bn"`` (the authors' code): after each BatchNorm of the group, before the activation:
  ``y = λ · BN(x)``.
- ``"conv"``: on each Conv/Linear output of the group: ``y = λ · conv(x)``. A BatchNorm right after
  the conv normalises the factor away (``BN(λz) ≈ BN(z)`` for ``λ > 0``), so this position suits
  layers without BatchNorm.
- ``"bn_weight"`` (network-slimming style): the gate *is* the BatchNorm scale,
  ``y = λ · x̂ + β``; the shift β is not gated.

A group of attention heads (``find_channel_groups(..., heads=True)``) gets one gate per head (per key/value head
under grouped-query attention) at every position: a forward pre-hook on the attention's output projection multiplies
each head's ``head_dim`` slice of its input, the attention's context, by the head's gate (:func:`gate_sites`).

Which groups get gates (``sites``, :func:`gated_groups`): ``"all"`` gates every coupled group;
``"inner"`` is the authors' placement (their ``gate.py``): on a residual net only the channels inside a
block (bn1 of a CIFAR basic block, bn1 and bn2 of a bottleneck, MobileNetV2's expansion channels), never
the stem or the residual stream, which stay unpruned at the (expanded) width; on a plain net (VGG) every
conv-BN-ReLU. :func:`inner_groups` defines it on the groups, not on class names.

Gates are one flat ``nn.Parameter``. By default it lives outside the model: its ``state_dict``,
parameters and optimizers never see it. ``attach(register=True)`` also registers it on the model as
:data:`GATE_PARAMETER` (so a DDP wrapper reduces its gradient and the model's ``state_dict`` holds it);
``remove()`` leaves the model exactly as it was.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Mapping, Optional, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from lightning_prune.choices import check_choice
from lightning_prune.inputs import ExampleInput, model_input, output_tensors
from lightning_prune.modes import eval_mode
from lightning_prune.structure import ChannelGroup, GroupMember
from lightning_prune.targets import linear_features, linear_types

GATE_PARAMETER = "pruning_gates"
"""Name of the gate parameter on a model it is registered on (``ChannelGates.attach(register=True)``)."""
GatePosition = Literal["bn", "conv", "bn_weight"]
GateSites = Literal["inner", "all"]
"""Which channel groups get gates: the authors' placement (:func:`inner_groups`) or every group."""
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _is_layer(module: nn.Module) -> bool:
    """A Conv or a Linear (Hugging Face's ``Conv1D`` included)."""
    return isinstance(module, (*_CONVS, *linear_types()))


@dataclass(frozen=True)
class GateSite:
    """Output ``channels`` of ``module`` (with ``input``: its input features) are gated by channels
    ``group_channels`` of gate ``group``."""

    module: str
    group: int
    channels: tuple[int, ...]
    group_channels: tuple[int, ...]
    input: bool = False


def _site(member: GroupMember, group: ChannelGroup, input: bool = False) -> GateSite:
    return GateSite(member.module, group.index, tuple(member.positions.tolist()), tuple(member.channels.tolist()), input)


def gate_sites(model: nn.Module, groups: Sequence[ChannelGroup], position: GatePosition = "bn") -> list[GateSite]:
    """Every module output a group's gate multiplies at ``position``: the group's affine BatchNorms
    (``"bn"``, ``"bn_weight"``) or its Conv/Linear layers' outputs (``"conv"``). A group of attention heads
    (``ChannelGroup.heads``) is gated at any position on the input of its output projection: each head's
    ``head_dim`` slice of the attention's context (its query heads' slices under grouped-query attention) is
    multiplied by the head's gate, so a head gated to 0 contributes exactly what a removed head does. A group
    without such a module gets no gate (it keeps all its channels)."""
    sites = []
    for group in groups:
        if group.heads is not None:
            sites.extend(_site(member, group, input=True) for member in group.members if member.kind == "in")
            continue
        for member in group.members:
            module = model.get_submodule(member.module)
            if position == "conv":
                gated = member.kind == "out" and _is_layer(module)
            else:
                gated = member.kind == "channel" and isinstance(module, _BATCHNORMS) and module.affine
            if gated:
                sites.append(_site(member, group))
    return sites


def _layers(model: nn.Module, group: ChannelGroup, kind: str) -> list[str]:
    """The group's Conv/Linear members carrying its channels as ``kind`` ("out": producing, "in": reading);
    a depthwise conv acts per channel and is neither."""
    return [
        member.module
        for member in group.members
        if member.kind == kind
        and _is_layer(module := model.get_submodule(member.module))
        and getattr(module, "groups", 1) == 1
    ]


def _feeds_activation(model: nn.Module, example_input: ExampleInput, names: set[str]) -> dict[str, bool]:
    """For each module in ``names``: whether every use of its output in one forward pass is a one-input
    operation (an activation), not a layer (which also reads its weight) or an add. Read from the autograd
    graph of one pass in eval mode, every parameter requiring its gradient for the while."""
    produced: dict[str, Any] = {}

    def record(name: str):  # noqa: ANN202 - a forward hook
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            produced.setdefault(name, output.grad_fn)

        return hook

    hooks = [model.get_submodule(name).register_forward_hook(record(name)) for name in names]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for parameter, _ in flags:
            parameter.requires_grad_(parameter.is_floating_point())
        with eval_mode(model), torch.enable_grad():
            output = model_input(example_input).call(model)
    finally:
        for hook in hooks:
            hook.remove()
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
    stack = [t.grad_fn for t in output_tensors(output) if t.grad_fn is not None]
    users: dict[Any, list[Any]] = {}
    seen = set(stack)
    while stack:
        node = stack.pop()
        for previous, _ in node.next_functions:
            if previous is not None:
                users.setdefault(previous, []).append(node)
                if previous not in seen:
                    seen.add(previous)
                    stack.append(previous)
    one_input = lambda node: sum(previous is not None for previous, _ in node.next_functions) == 1  # noqa: E731
    return {name: bool(users.get(fn)) and all(map(one_input, users[fn])) for name, fn in produced.items()}


def inner_groups(model: nn.Module, groups: Sequence[ChannelGroup], example_input: ExampleInput) -> list[ChannelGroup]:
    """The authors' gate sites on the coupled groups: the groups whose channels go from one layer, through
    a nonlinearity, into one layer, i.e. that take no part in a residual connection:

    - one producing Conv/Linear: several mean the channels are added (a residual stream, with the stem
      that feeds it);
    - at most one reading Conv/Linear: several mean the input of a residual block, read by its branch and by
      its projection shortcut (ResNet-50's stem);
    - each of the group's BatchNorms (without one: its producing layer) feeds an activation, not a layer or
      an add: a linear bottleneck (MobileNetV2's block output) is the stream of a stage with one block.

    On the built-in networks this is exactly the authors' placement: resnet20/56 bn1 of each block,
    resnet50 bn1 and bn2 of each bottleneck, mobilenetv2 the expansion channels plus the stem and the last
    conv (their ImageNet script gates every ConvBNReLU too), VGG every conv-BN-ReLU
    (``tests/test_gate_sites.py``). A group leaving the network (DenseNet's concatenations) is read by several
    layers and left out as well. A group of attention heads is inner: a head's output goes only into the output
    projection of its residual branch.
    """
    candidates = [g for g in groups if g.heads is None and len(_layers(model, g, "out")) == 1 and len(_layers(model, g, "in")) <= 1]
    checked = {
        g.index: [m.module for m in g.members if isinstance(model.get_submodule(m.module), _BATCHNORMS)] or _layers(model, g, "out")
        for g in candidates
    }
    activated = _feeds_activation(model, example_input, {name for names in checked.values() for name in names})
    inner = {g.index for g in candidates if all(activated.get(name, False) for name in checked[g.index])}
    return [g for g in groups if g.index in inner or g.heads is not None]


def gated_groups(
    model: nn.Module, groups: Sequence[ChannelGroup], example_input: ExampleInput, sites: GateSites = "all"
) -> list[ChannelGroup]:
    """The groups that get gates: every group (``"all"``) or :func:`inner_groups` (``"inner"``)."""
    check_choice("gate_sites", sites, GateSites)
    return list(groups) if sites == "all" else inner_groups(model, groups, example_input)


class _Multiplier:
    """The per-channel factor of one module, built from the flat gate parameter.

    Index tensors are built once, on the gates' device, when the gates are attached: a forward pass
    copies nothing to the device. A module whose output channels are all gated, in order, by one
    contiguous stretch of the flat parameter (the common case) gets a view of it, with no indexing."""

    def __init__(self, parameter: nn.Parameter, offsets: Mapping[int, int], sites: Sequence[GateSite], channels: int) -> None:
        device = parameter.device
        positions = [p for site in sites for p in site.channels]
        source = [offsets[site.group] + c for site in sites for c in site.group_channels]
        self.parameter = parameter
        self.channels = channels
        self.whole = positions == list(range(channels))
        contiguous = self.whole and source == list(range(source[0], source[0] + channels))
        self.start: Optional[int] = source[0] if contiguous else None
        self.source = None if contiguous else torch.tensor(source, dtype=torch.long, device=device)
        self.positions = None if self.whole else torch.tensor(positions, dtype=torch.long, device=device)

    def __call__(self, base: torch.Tensor) -> torch.Tensor:
        """``base`` (one value per output channel) with its gated channels replaced by their gate values."""
        if self.source is not None and self.source.device != self.parameter.device:  # the model moved: follow once
            self.source = self.source.to(self.parameter.device)
        if self.positions is not None and self.positions.device != base.device:
            self.positions = self.positions.to(base.device)
        if self.start is not None:
            values = self.parameter.narrow(0, self.start, self.channels)
        else:
            values = self.parameter.index_select(0, self.source)
        values = values.to(base.dtype)
        if self.whole:
            return values
        return base.index_put((self.positions,), values)


class _GatedScale(nn.Module):
    """Parametrization of a BatchNorm ``weight``: gated channels take the gate value as their scale."""

    def __init__(self, multiplier: _Multiplier) -> None:
        super().__init__()
        self.multiplier = multiplier

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.multiplier(weight)


class ChannelGates:
    r"""Gates Λ of a model: one gate of ones per gated channel group, all stored in one flat
    ``nn.Parameter`` (:attr:`parameter`; group ``g`` is the stretch ``gates[g]``), so the gate phase
    steps, clamps, reduces across processes and reads one tensor.

    ``attach()`` inserts them (forward hooks for ``"bn"``/``"conv"``, a parametrization of the
    BatchNorm weight for ``"bn_weight"``, forward pre-hooks on the output projections for heads),
    ``remove()`` takes them out again. Gate values are
    cast to each gated output's dtype (``bf16-true`` models keep float32 gates).

    Args:
        model: the network whose channels are gated.
        sites: which module outputs each group's gate multiplies (see :func:`gate_sites`).
        group_sizes: group index -> number of channels of the group (the length of its gate).
        position: ``"bn"``, ``"conv"`` or ``"bn_weight"``.
    """

    def __init__(
        self, model: nn.Module, sites: Sequence[GateSite], group_sizes: Mapping[int, int], position: GatePosition = "bn"
    ) -> None:
        check_choice("gate_position", position, GatePosition)
        if not sites:
            raise ValueError(f"The model has no prunable channel to gate at `gate_position={position!r}`.")
        self.model = model
        self.sites = list(sites)
        self.position = position
        device = next(model.parameters()).device
        self.offsets: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        total = 0
        for group in sorted({site.group for site in self.sites}):
            self.offsets[group], self.sizes[group] = total, group_sizes[group]
            total += group_sizes[group]
        self.parameter = nn.Parameter(torch.ones(total, device=device))
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._parametrized: list[tuple[nn.Module, list[str]]] = []

    @classmethod
    def for_groups(cls, model: nn.Module, groups: Sequence[ChannelGroup], position: GatePosition = "bn") -> "ChannelGates":
        """Gates for the channel groups of ``model`` (``structure.find_channel_groups``) at ``position``."""
        return cls(model, gate_sites(model, groups, position), {group.index: group.size for group in groups}, position)

    # ------------------------------------------------------------------ insertion
    @property
    def device(self) -> torch.device:
        return self.parameter.device

    @property
    def attached(self) -> bool:
        return bool(self._handles or self._parametrized)

    def attach(self, register: bool = False) -> None:
        """Insert the gates into the model's forward pass (λ = current gate values); with ``register``, also
        register :attr:`parameter` on the model as :data:`GATE_PARAMETER`."""
        if self.attached:
            return
        by_module: dict[tuple[str, bool], list[GateSite]] = {}  # (module, input) -> the sites gating its output or input
        for site in self.sites:
            by_module.setdefault((site.module, site.input), []).append(site)
        for (name, input), sites in by_module.items():
            module = self.model.get_submodule(name)
            channels = linear_features(module)[0] if input else _out_channels(module)
            multiplier = _Multiplier(self.parameter, self.offsets, sites, channels)
            if input:  # the heads' context, before the output projection
                self._handles.append(module.register_forward_pre_hook(_scaling_hook(multiplier, channels, input=True)))
            elif self.position == "bn_weight":
                order = list(module._parameters)
                parametrize.register_parametrization(module, "weight", _GatedScale(multiplier), unsafe=True)
                self._parametrized.append((module, order))
            else:
                self._handles.append(module.register_forward_hook(_scaling_hook(multiplier, channels, input=False)))
        if register:
            self.model.register_parameter(GATE_PARAMETER, self.parameter)

    def remove(self) -> None:
        """Take the gates out: the model computes exactly what it computed before ``attach()``."""
        for handle in self._handles:
            handle.remove()
        for module, order in self._parametrized:
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
            module._parameters = {name: module._parameters[name] for name in order}  # state_dict order as before
        self._handles, self._parametrized = [], []
        if self.model._parameters.get(GATE_PARAMETER) is self.parameter:
            del self.model._parameters[GATE_PARAMETER]

    @contextmanager
    def inserted(self, register: bool = False) -> Iterator["ChannelGates"]:
        """``with gates.inserted():`` — attached inside the block, removed on leaving it (also on error)."""
        self.attach(register)
        try:
            yield self
        finally:
            self.remove()

    # ------------------------------------------------------------------ values
    @property
    def gates(self) -> dict[int, torch.Tensor]:
        """Group index -> its gate, a (differentiable) view of :attr:`parameter`."""
        return {group: self.parameter.narrow(0, offset, self.sizes[group]) for group, offset in self.offsets.items()}

    def parameters(self) -> list[nn.Parameter]:
        return [self.parameter]

    @property
    def num_gates(self) -> int:
        return self.parameter.numel()

    def nonzero_fraction(self) -> torch.Tensor:
        """Fraction of gates that are not exactly zero (a 0-dim tensor on the gates' device: no host sync)."""
        return (self.parameter.detach() != 0).float().mean()

    def values(self) -> dict[int, torch.Tensor]:
        """Detached CPU copies of the gates, group index -> gate (a snapshot)."""
        flat = self.parameter.detach().cpu()
        return {group: flat[offset : offset + self.sizes[group]].clone() for group, offset in self.offsets.items()}


def _out_channels(module: nn.Module) -> int:
    if isinstance(module, linear_types()):
        return linear_features(module)[1]
    if isinstance(module, _BATCHNORMS):
        return module.num_features
    return module.out_channels


def _scaling_hook(multiplier: _Multiplier, channels: int, input: bool):  # noqa: ANN202 - a forward (pre-)hook
    """A forward hook multiplying the output channels by the gates, or (``input``) a forward pre-hook multiplying the
    input features (last dimension, as a Linear or ``Conv1D`` reads them)."""
    ones = [torch.ones(channels, device=multiplier.parameter.device)]

    def scale(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
        if ones[0].device != tensor.device:  # the model moved after the gates were attached: follow once
            ones[0] = ones[0].to(tensor.device)
        factor = multiplier(ones[0]).to(tensor.dtype)
        if input or isinstance(module, linear_types()):  # channels last
            return tensor * factor
        return tensor * factor.view(1, -1, *([1] * (tensor.dim() - 2)))

    if input:
        return lambda module, inputs: (scale(module, inputs[0]), *inputs[1:])
    return lambda module, inputs, output: scale(module, output)


class NonFiniteGateLoss(RuntimeError):
    """The gate loss became NaN or infinite during the gate phase (the model was left as it was)."""


@dataclass
class GatePhaseResult:
    """Outcome of the gate phase (:class:`~lightning_prune.gate_search.GateSearch`).

    Attributes:
        gates: the selected snapshot, group index -> gate values (CPU).
        averages: each gate's mean value over the steps up to the snapshot (the tie-break of
            :func:`gate_scores`).
        selected: ``"best_val"`` snapshot or ``"last"``.
        step: gate step of the snapshot; ``metric``: its monitored validation value (``None`` if not validated).
        steps: gate steps run.
    """

    gates: dict[int, torch.Tensor]
    averages: dict[int, torch.Tensor]
    selected: str
    step: int
    metric: Optional[float]
    steps: int


class FrozenNetwork:
    """Weights, biases and BatchNorm affine parameters frozen and every module in training mode from
    construction until :meth:`restore`, which gives back every ``requires_grad`` flag, module mode and buffer
    (BatchNorm running statistics): the gate phase changes nothing of the model. :attr:`buffers` (copies)
    can be saved and loaded, so a resumed phase restores the buffers of the run it continues."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.flags = {name: p.requires_grad for name, p in model.named_parameters()}
        self.buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
        self.modes = [(module, module.training) for module in model.modules()]
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        model.train(True)

    def restore(self) -> None:
        """Everything back; a buffer whose shape changed meanwhile (its module reshaped to a checkpoint about to
        load into it) is left to that load."""
        with torch.no_grad():
            for name, buffer in self.model.named_buffers():
                if name in self.buffers and buffer.shape == self.buffers[name].shape:
                    buffer.copy_(self.buffers[name])
        for name, parameter in self.model.named_parameters():
            parameter.requires_grad_(self.flags.get(name, parameter.requires_grad))
        for module, was_training in self.modes:
            module.training = was_training


def gate_scores(result: GatePhaseResult, groups: Sequence[ChannelGroup]) -> list[torch.Tensor]:
    """Per group, a score per channel for the global threshold search: channels ranked by their
    selected gate value, ties broken by the gate's mean value over the phase (a gate that stayed open
    longer ranks higher), then by position; the scores are the ranks in (0, 1], so every threshold
    step moves one channel. A group without a gate scores ``inf`` (always kept)."""
    gated = [g.index for g in groups if g.index in result.gates]
    values = torch.cat([result.gates[g].float() for g in gated]) if gated else torch.zeros(0)
    averages = torch.cat([result.averages[g].float() for g in gated]) if gated else torch.zeros(0)
    order = torch.argsort(averages, stable=True)
    order = order[torch.argsort(values[order], stable=True)]  # lexicographic: value, then average
    ranks = torch.empty(len(values))
    ranks[order] = torch.arange(1, len(values) + 1, dtype=torch.float) / max(len(values), 1)
    scores, offset = [], 0
    for group in groups:
        if group.index in result.gates:
            scores.append(ranks[offset : offset + group.size])
            offset += group.size
        else:
            scores.append(torch.full((group.size,), math.inf))
    return scores
