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

Gates live outside the model (plain ``nn.Parameter`` s, not registered on it): its
``state_dict``, parameters and optimizers never see them, and ``remove()`` leaves the model
exactly as it was.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Literal, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from lightning_prune.structure import ChannelGroup

GatePosition = Literal["bn", "conv", "bn_weight"]
GATE_POSITIONS: tuple[str, ...] = ("bn", "conv", "bn_weight")
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass(frozen=True)
class GateSite:
    """Output ``channels`` of ``module`` are gated by channels ``group_channels`` of gate ``group``."""

    module: str
    group: int
    channels: tuple[int, ...]
    group_channels: tuple[int, ...]


def gate_sites(model: nn.Module, groups: Sequence[ChannelGroup], position: GatePosition = "bn") -> list[GateSite]:
    """Every module output a group's gate multiplies at ``position``: the group's affine BatchNorms
    (``"bn"``, ``"bn_weight"``) or its Conv/Linear layers' outputs (``"conv"``). A group without such a
    module gets no gate (it keeps all its channels)."""
    sites = []
    for group in groups:
        for member in group.members:
            module = model.get_submodule(member.module)
            if position == "conv":
                gated = member.kind == "out" and isinstance(module, _LAYERS)
            else:
                gated = member.kind == "channel" and isinstance(module, _BATCHNORMS) and module.affine
            if gated:
                sites.append(GateSite(member.module, group.index, tuple(member.positions.tolist()), tuple(member.channels.tolist())))
    return sites


class _Multiplier:
    """Builds the per-channel factor of one module from the gates of every group it belongs to."""

    def __init__(self, gates: Mapping[int, nn.Parameter], sites: Sequence[GateSite]) -> None:
        self.gates = gates
        self.entries = [
            (site.group, torch.tensor(site.channels, dtype=torch.long), torch.tensor(site.group_channels, dtype=torch.long))
            for site in sites
        ]

    def __call__(self, base: torch.Tensor) -> torch.Tensor:
        """``base`` with its gated channels replaced by their gate values."""
        factor = base
        for group, channels, group_channels in self.entries:
            gate = self.gates[group]
            factor = factor.index_put((channels.to(gate.device),), gate[group_channels.to(gate.device)])
        return factor


class _GatedScale(nn.Module):
    """Parametrization of a BatchNorm ``weight``: gated channels take the gate value as their scale."""

    def __init__(self, multiplier: _Multiplier) -> None:
        super().__init__()
        self.multiplier = multiplier

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.multiplier(weight)


class ChannelGates:
    r"""Gates Λ of a model: one ``nn.Parameter`` of ones per gated channel group.

    ``attach()`` inserts them (forward hooks for ``"bn"``/``"conv"``, a parametrization of the
    BatchNorm weight for ``"bn_weight"``), ``remove()`` takes them out again.

    Args:
        model: the network whose channels are gated.
        sites: which module outputs each group's gate multiplies (see :func:`gate_sites`).
        group_sizes: group index -> number of channels of the group (the length of its gate).
        position: ``"bn"``, ``"conv"`` or ``"bn_weight"``.
    """

    def __init__(
        self, model: nn.Module, sites: Sequence[GateSite], group_sizes: Mapping[int, int], position: GatePosition = "bn"
    ) -> None:
        if position not in GATE_POSITIONS:
            raise ValueError(f"`gate_position` must be one of {GATE_POSITIONS}, got {position!r}.")
        if not sites:
            raise ValueError(f"The model has no prunable channel to gate at `gate_position={position!r}`.")
        self.model = model
        self.sites = list(sites)
        self.position = position
        device = next(model.parameters()).device
        groups = sorted({site.group for site in self.sites})
        self.gates: dict[int, nn.Parameter] = {g: nn.Parameter(torch.ones(group_sizes[g], device=device)) for g in groups}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._parametrized: list[tuple[nn.Module, list[str]]] = []

    @classmethod
    def for_groups(cls, model: nn.Module, groups: Sequence[ChannelGroup], position: GatePosition = "bn") -> "ChannelGates":
        """Gates for the channel groups of ``model`` (``structure.find_channel_groups``) at ``position``."""
        return cls(model, gate_sites(model, groups, position), {group.index: group.size for group in groups}, position)

    # ------------------------------------------------------------------ insertion
    def by_module(self) -> dict[str, list[GateSite]]:
        modules: dict[str, list[GateSite]] = {}
        for site in self.sites:
            modules.setdefault(site.module, []).append(site)
        return modules

    @property
    def device(self) -> torch.device:
        return next(iter(self.gates.values())).device

    @property
    def attached(self) -> bool:
        return bool(self._handles or self._parametrized)

    def attach(self) -> None:
        """Insert the gates into the model's forward pass (λ = current gate values)."""
        if self.attached:
            return
        for name, sites in self.by_module().items():
            module = self.model.get_submodule(name)
            multiplier = _Multiplier(self.gates, sites)
            if self.position == "bn_weight":
                order = list(module._parameters)
                parametrize.register_parametrization(module, "weight", _GatedScale(multiplier), unsafe=True)
                self._parametrized.append((module, order))
            else:
                ones = torch.ones(_out_channels(module), device=self.device)
                self._handles.append(module.register_forward_hook(_scale_output(multiplier, ones)))

    def remove(self) -> None:
        """Take the gates out: the model computes exactly what it computed before ``attach()``."""
        for handle in self._handles:
            handle.remove()
        for module, order in self._parametrized:
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
            module._parameters = {name: module._parameters[name] for name in order}  # state_dict order as before
        self._handles, self._parametrized = [], []

    @contextmanager
    def inserted(self) -> Iterator["ChannelGates"]:
        """``with gates.inserted():`` — attached inside the block, removed on leaving it (also on error)."""
        self.attach()
        try:
            yield self
        finally:
            self.remove()

    # ------------------------------------------------------------------ values
    def parameters(self) -> list[nn.Parameter]:
        return list(self.gates.values())

    @property
    def num_gates(self) -> int:
        return sum(gate.numel() for gate in self.gates.values())

    def flat(self) -> torch.Tensor:
        """All gates in one vector, groups in index order (differentiable)."""
        return torch.cat([gate.flatten() for gate in self.gates.values()])

    @torch.no_grad()
    def clamp_(self, low: float = 0.0, high: float = 1.0) -> None:
        """Project the gates onto [low, high] (done after every optimizer step)."""
        for gate in self.gates.values():
            gate.clamp_(low, high)

    def mean_abs(self) -> torch.Tensor:
        """‖Λ‖₁ / C over all gated channels (differentiable)."""
        return self.flat().abs().mean()

    def nonzero_fraction(self) -> float:
        """Fraction of gates that are not exactly zero."""
        flat = self.flat().detach()
        return float((flat != 0).float().mean())

    def values(self) -> dict[int, torch.Tensor]:
        """Detached CPU copies of the gates, group index -> gate (a snapshot)."""
        return {group: gate.detach().cpu().clone() for group, gate in self.gates.items()}


def _out_channels(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, _BATCHNORMS):
        return module.num_features
    return module.out_channels


def _scale_output(multiplier: _Multiplier, ones: torch.Tensor):  # noqa: ANN202 - a forward hook
    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        factor = multiplier(ones.to(output.device))
        if isinstance(module, nn.Linear):
            return output * factor
        return output * factor.view(1, -1, *([1] * (output.dim() - 2)))

    return hook


def gate_objective(
    logits: torch.Tensor,
    targets: torch.Tensor,
    gates: ChannelGates,
    gamma: float = 0.5,
    gate_ratio: float = 0.2,
    l1: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The gate loss and its cross-entropy term.

    .. math:: L(Λ) = \mathrm{CE}(f(x; W, Λ), y) + γ\,\big(\lVert Λ\rVert_1 / C - r\big)^2 + l_1 \lVert Λ\rVert_1

    with ``C`` the number of gated channels and ``r = gate_ratio`` (the authors' code: γ = 0.5,
    r = 0.2 on CIFAR; the plain L1 term is an option, default 0).
    """
    ce = F.cross_entropy(logits, targets)
    loss = ce + gamma * (gates.mean_abs() - gate_ratio) ** 2
    if l1:
        loss = loss + l1 * gates.flat().abs().sum()
    return loss, ce


def snapshot_is_better(accuracy: float, nonzero_fraction: float, best: Optional[float], gate_ratio: float) -> bool:
    """Snapshot rule of the authors' code: sparse enough (non-zero gates ≤ r) and more accurate than the best so far."""
    return nonzero_fraction <= gate_ratio and (best is None or accuracy > best)


class NonFiniteGateLoss(RuntimeError):
    """The gate loss became NaN or infinite during the gate phase (the model was left as it was)."""


@dataclass
class GatePhaseResult:
    """Outcome of :func:`learn_gates`.

    Attributes:
        gates: the selected snapshot, group index -> gate values (CPU).
        averages: each gate's mean value over the steps up to the snapshot (the tie-break of
            :func:`gate_scores`).
        selected: ``"best_val"`` snapshot or ``"last"``.
        step: gate step of the snapshot; ``val_acc``: its validation accuracy (``None`` if not validated).
        steps: gate steps run.
    """

    gates: dict[int, torch.Tensor]
    averages: dict[int, torch.Tensor]
    selected: str
    step: int
    val_acc: Optional[float]
    steps: int


@contextmanager
def frozen_network(model: nn.Module) -> Iterator[nn.Module]:
    """Weights, biases and BatchNorm affine parameters frozen, every module in training mode, BatchNorm
    running statistics restored on leaving: the gate phase changes nothing of the model."""
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    modes = [(module, module.training) for module in model.modules()]
    stats = {name: b.detach().clone() for name, b in model.named_buffers()}
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    model.train()
    try:
        yield model
    finally:
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                if name in stats:
                    buffer.copy_(stats[name])
        for module, training in modes:
            module.training = training
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(flags.get(name, parameter.requires_grad))


Batch = tuple[torch.Tensor, torch.Tensor]


def learn_gates(
    model: nn.Module,
    gates: ChannelGates,
    train_batches: Iterable[Batch],
    *,
    epochs: int = 10,
    lr: float = 0.01,
    gamma: float = 0.5,
    gate_ratio: float = 0.2,
    l1: float = 0.0,
    val_batches: Optional[Iterable[Batch]] = None,
    val_every: Optional[int] = None,
    select: Literal["best_val", "last"] = "best_val",
    reduce: Optional[Callable[[torch.Tensor, str], torch.Tensor]] = None,
    on_step: Optional[Callable[[int, dict[str, float]], None]] = None,
) -> GatePhaseResult:
    r"""The gate phase of Pruning from Scratch on a randomly initialised network.

    Only the gates Λ learn (Adam, ``lr``); after every step they are clamped to [0, 1]. The loss is
    :func:`gate_objective`. The network runs in training mode (BatchNorm batch statistics, as in the
    authors' code) with every weight frozen; the BatchNorm running statistics the phase accumulates
    serve the validation passes (eval mode) and are restored afterwards, so the model leaves the
    phase exactly as it entered it.

    Selection (``select="best_val"``, the authors' rule): after each epoch, or every ``val_every``
    steps, the gates are evaluated on ``val_batches``; the snapshot with the best validation accuracy
    among those with a fraction of non-zero gates ``<= gate_ratio`` is kept, otherwise the last gates.

    Args:
        train_batches / val_batches: re-iterable ``(inputs, targets)`` batches on the model's device.
        reduce: ``reduce(tensor, op)`` with ``op`` ``"mean"`` or ``"sum"`` over processes (identity
            when ``None``): gate gradients and the loss are averaged, validation counts summed, so every
            process takes the same steps.
        on_step: called as ``on_step(step, metrics)`` after every step (and validation) for progress
            and logging; metrics ``gate/loss``, ``gate/ce``, ``gate/mean``, ``gate/nonzero_fraction``
            (and ``gate/val_acc`` after a validation).

    Raises:
        NonFiniteGateLoss: the loss became NaN or infinite; gates are removed and the model restored.
    """
    reduce = reduce or (lambda tensor, op: tensor)
    optimizer = torch.optim.Adam(gates.parameters(), lr=lr)
    sums = {group: torch.zeros_like(gate.detach()) for group, gate in gates.gates.items()}
    best: Optional[float] = None
    chosen: Optional[GatePhaseResult] = None
    last_acc: Optional[float] = None
    step = 0

    def snapshot(selected: str, acc: Optional[float]) -> GatePhaseResult:
        averages = {group: (total / max(step, 1)).cpu() for group, total in sums.items()}
        return GatePhaseResult(gates.values(), averages, selected, step, acc, step)

    def validate() -> None:
        nonlocal best, chosen, last_acc
        if val_batches is None or select == "last":
            return
        last_acc = _accuracy(model, val_batches, reduce)
        fraction = gates.nonzero_fraction()
        if on_step is not None:
            on_step(step, {"gate/val_acc": last_acc, "gate/nonzero_fraction": fraction})
        if snapshot_is_better(last_acc, fraction, best, gate_ratio):
            best, chosen = last_acc, snapshot("best_val", last_acc)

    with frozen_network(model), gates.inserted():
        for epoch in range(epochs):
            for inputs, targets in train_batches:
                optimizer.zero_grad(set_to_none=True)
                loss, ce = gate_objective(model(inputs), targets, gates, gamma, gate_ratio, l1)
                loss.backward()
                loss = reduce(loss.detach(), "mean")
                if not bool(torch.isfinite(loss)):
                    raise NonFiniteGateLoss(
                        f"Gate phase of Pruning from Scratch: the gate loss is {float(loss)} at gate epoch {epoch}, "
                        f"step {step}; the gates were removed and the model left as it was. Check the inputs and "
                        "the model's initialisation, or lower `gate_lr`."
                    )
                for gate in gates.parameters():
                    gate.grad = reduce(gate.grad, "mean")
                optimizer.step()
                gates.clamp_()
                step += 1
                for group, gate in gates.gates.items():
                    sums[group] += gate.detach()
                if on_step is not None:
                    on_step(step, {
                        "gate/loss": float(loss), "gate/ce": float(reduce(ce.detach(), "mean")),
                        "gate/mean": float(gates.mean_abs().detach()), "gate/nonzero_fraction": gates.nonzero_fraction(),
                    })
                if val_every and step % val_every == 0:
                    validate()
            if not val_every:
                validate()
    if chosen is None:
        chosen = snapshot("last", last_acc)
    chosen.steps = step
    return chosen


@torch.no_grad()
def _accuracy(model: nn.Module, batches: Iterable[Batch], reduce: Callable[[torch.Tensor, str], torch.Tensor]) -> float:
    """Top-1 accuracy in eval mode (training mode restored afterwards), summed over processes."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    counts = None
    try:
        for inputs, targets in batches:
            batch = torch.stack([(model(inputs).argmax(1) == targets).sum(), torch.tensor(targets.numel(), device=targets.device)])
            counts = batch if counts is None else counts + batch
    finally:
        for module, training in modes:
            module.training = training
    if counts is None:
        raise ValueError("The validation data of the gate phase is empty.")
    counts = reduce(counts.float(), "sum")
    return float(counts[0] / counts[1])


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
