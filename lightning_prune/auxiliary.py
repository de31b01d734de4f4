r"""AutoPrune's auxiliary parameters (Xiao, Wang, Rajasekaran, NeurIPS 2019), as plain PyTorch.

Every pruned weight tensor ``W`` gets an auxiliary tensor ``M`` — one entry per weight
(``granularity="element"``) or one per output channel of a coupled channel group
(``granularity="channel"``). The network computes with

    T = W ⊙ h(M),    h(m) = 1[m > 0]

through a :mod:`torch.nn.utils.parametrize` parametrization, so ``W`` keeps every value (a weight
switched off comes back with its old value when its ``m`` turns positive) and ``M`` is no parameter
of the model (the model's optimizer never sees it). Backward: ``∂L/∂W = ∂L/∂T ⊙ h(M)``;
``∂L/∂M = ∂L/∂T ⊙ W ⊙ h̃'(M)`` with ``h̃'`` a straight-through estimator (:func:`ste_derivative`).

The update of ``M`` (:func:`auxiliary_gradient`) is our reading of the paper's Section 3: its exact
formulas for R(M) and for the three consistency rules could not be retrieved (no public text of
Section 3 / Algorithm 1 was in reach), so each term is documented there as implemented, can be
switched off, and was measured by ablation (README, "AutoPrune").
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Mapping, Optional, Sequence

import torch
import torch.nn.utils.parametrize as parametrize
from torch import nn

from lightning_prune.structure import ChannelGroup

Ste = Literal["linear", "leaky_relu", "softplus"]
STES: tuple[str, ...] = ("linear", "leaky_relu", "softplus")
Granularity = Literal["element", "channel"]
GRANULARITIES: tuple[str, ...] = ("element", "channel")
AuxOptimizer = Literal["sgd", "adam"]
AUX_OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")
_EPS = 1e-12


def ste_derivative(aux: torch.Tensor, ste: Ste = "leaky_relu", slope: float = 0.5) -> torch.Tensor:
    r"""The straight-through estimate h̃'(m) of the indicator's derivative.

    ``"linear"``: 1 (identity STE); ``"leaky_relu"``: 1 for m > 0, ``slope`` for m ≤ 0;
    ``"softplus"``: σ(m), the derivative of softplus.
    """
    if ste == "linear":
        return torch.ones_like(aux)
    if ste == "leaky_relu":
        return torch.where(aux > 0, torch.ones_like(aux), torch.full_like(aux, slope))
    if ste == "softplus":
        return torch.sigmoid(aux)
    raise ValueError(f"`ste` must be one of {STES}, got {ste!r}.")


class _Indicator(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, aux: torch.Tensor, ste: str, slope: float) -> torch.Tensor:  # noqa: ANN401
        ctx.save_for_backward(aux)
        ctx.ste, ctx.slope = ste, slope
        return (aux > 0).to(aux.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], None, None]:  # noqa: ANN401
        (aux,) = ctx.saved_tensors
        return grad * ste_derivative(aux, ctx.ste, ctx.slope), None, None


def indicator(aux: torch.Tensor, ste: Ste = "leaky_relu", slope: float = 0.5) -> torch.Tensor:
    r"""h(m) = 1[m > 0] in the forward pass; the straight-through estimate h̃'(m) in the backward pass."""
    return _Indicator.apply(aux, ste, slope)


def loss_signal(gate_grad: torch.Tensor, magnitude: torch.Tensor, correlation: bool = True) -> torch.Tensor:
    r"""The loss part ``C`` of the auxiliary update, before normalisation.

    ``gate_grad`` is ``∂L/∂h = Σ ∂L/∂T ⊙ W`` (summed over the weights an entry of ``M`` gates);
    ``magnitude`` is ``‖w‖`` of those weights (``|w|``, or a channel's L2 norm). Correlation
    consistency: ``C = ∂L/∂h / ‖w‖ = Σ ∂L/∂T ⊙ ∂‖w‖/∂w``, the rate at which the weights' own
    loss-descent update would grow (−) or shrink (+) their magnitude, so ``m`` moves the way the
    weights' magnitude would, whatever its size. Off: ``C = ∂L/∂h``, the literal chain rule (the
    first-order loss change of switching the weights off, scaled by ``‖w‖``).
    """
    signal = gate_grad.float()
    if not correlation:
        return signal
    magnitude = magnitude.float()
    return torch.where(magnitude > 0, signal / magnitude.clamp_min(_EPS), torch.zeros_like(signal))


def auxiliary_gradient(
    gate_grad: torch.Tensor,
    aux: torch.Tensor,
    magnitude: torch.Tensor,
    reg: float,
    ste: Ste = "leaky_relu",
    slope: float = 0.5,
    sensitivity: bool = True,
    correlation: bool = True,
    direction: bool = True,
    scale: Optional[float] = None,
) -> torch.Tensor:
    r"""The update direction of one auxiliary tensor ``M`` (what its optimizer steps along).

        ∂M = h̃'(M) ⊙ C / s + reg · S(‖w‖) ⊙ D(M)

    - ``C``: the loss signal of :func:`loss_signal` (correlation consistency switches it); the
      literal chain rule is ``∂L/∂M = ∂L/∂h ⊙ h̃'(M)``.
    - ``s = scale``: the mean of |C| over *all* auxiliary tensors (one scale for the network, so
      layers whose weights matter more keep more of them); ``None``: the mean over this tensor.
      ``reg`` is relative to it: without normalising, the paper's ``reg`` switches every weight
      off on the digits data. It is taken before the STE factor, so it does not drift as weights
      switch off.
    - The regulariser is R(M) = Σ h(M), the number of weights kept (‖T‖₀ of the pruned tensors).
      Direction consistency (``direction``): its gradient goes through the same STE as the loss,
      ``D(M) = h̃'(M)``, so below zero the pull is as weak as the loss's push back (a switched-off
      weight can return; with the linear STE this term changes nothing). Off: ``D = 1``
      (R = Σ m, a constant pull that drives switched-off entries ever lower).
    - Sensitivity consistency (``sensitivity``): ``S = 1 / (1 + ‖w‖ / mean‖w‖)`` (mean over the
      tensor), so an important, large-magnitude weight is harder to switch off. Off: ``S = 1/2``
      (its value at the mean).
    """
    signal = loss_signal(gate_grad, magnitude, correlation)
    scale = float(signal.abs().mean()) if scale is None else scale
    signal = signal / max(scale, _EPS)
    derivative = ste_derivative(aux.float(), ste, slope)
    magnitude = magnitude.float()
    pull = torch.full_like(signal, 0.5)
    if sensitivity:
        pull = 1.0 / (1.0 + magnitude / magnitude.mean().clamp_min(_EPS))
    if direction:
        pull = pull * derivative
    return (derivative * signal + reg * pull).to(aux.dtype)


@dataclass(frozen=True)
class _Slice:
    """Entries of one parameter gated by one auxiliary tensor: ``positions`` along dim 0 take ``channels``
    of the tensor (channel granularity); both ``None`` for element granularity (same shape)."""

    key: str
    positions: Optional[torch.Tensor] = None
    channels: Optional[torch.Tensor] = None


class _Gate(nn.Module):
    """The parametrization ``W -> W ⊙ gate`` of one parameter (``gate`` from :class:`AuxiliaryParameters`)."""

    def __init__(self, owner: "AuxiliaryParameters", target: tuple[str, str]) -> None:
        super().__init__()
        self.__dict__["owner"] = owner  # a plain reference: not a submodule, not in state_dict
        self.target = target

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.owner.gate(self.target, weight)


class AuxiliaryParameters:
    r"""Auxiliary tensors ``M`` for chosen weights of ``model`` and the parametrizations ``T = W ⊙ h(M)``.

    Args:
        model: the model; parameters are addressed by their names in it.
        modules: names of the Conv/Linear modules whose weights are pruned (element granularity).
        granularity: ``"element"`` or ``"channel"``.
        groups: channel granularity: the coupled channel groups to gate (one ``M`` entry per channel,
            keyed by the group's root layer); every out-layer of a group (weight and bias) and every
            BatchNorm in it is gated, so the gated model computes what the physically pruned one does.
        ste, slope: the straight-through estimator of h (:func:`ste_derivative`).
        init: initial value of every entry of ``M`` (positive: every weight starts switched on).

    While attached, ``model.state_dict()`` holds plain ``<module>.weight`` keys with ``W ⊙ h(M)``
    (so a mid-training checkpoint loads into a fresh, unpruned model), and ``load_state_dict`` of
    such keys fills ``W``; :meth:`state_dict` holds ``M`` and the values of the switched-off weights,
    which :meth:`load_state_dict` writes back, so a resumed run continues from exactly the same ``W``.
    """

    def __init__(
        self,
        model: nn.Module,
        modules: Sequence[str] = (),
        granularity: Granularity = "element",
        groups: Sequence[ChannelGroup] = (),
        ste: Ste = "leaky_relu",
        slope: float = 0.5,
        init: float = 1.0,
    ) -> None:
        if granularity not in GRANULARITIES:
            raise ValueError(f"`granularity` must be one of {GRANULARITIES}, got {granularity!r}.")
        if ste not in STES:
            raise ValueError(f"`ste` must be one of {STES}, got {ste!r}.")
        self.model = model
        self.granularity = granularity
        self.ste, self.slope = ste, slope
        self._backward_ste: Ste = ste
        self.targets: dict[tuple[str, str], list[_Slice]] = defaultdict(list)
        self.values: dict[str, torch.Tensor] = {}
        if granularity == "element":
            for name in modules:
                weight = model.get_submodule(name).weight
                self.values[name] = torch.full_like(weight.detach(), init)
                self.targets[(name, "weight")].append(_Slice(name))
        else:
            for group in groups:
                key = group.root
                device = model.get_submodule(key).weight.device
                self.values[key] = torch.full((group.size,), float(init), device=device)
                for member in group.members:
                    module = model.get_submodule(member.module)
                    if member.kind == "in" or next(module.parameters(recurse=False), None) is None:
                        continue
                    for parameter, tensor in module.named_parameters(recurse=False):
                        if tensor is not None:
                            piece = _Slice(key, member.positions, member.channels)
                            self.targets[(member.module, parameter)].append(piece)
        if not self.values:
            raise ValueError("Nothing to prune: no module (element) or channel group (channel) was given.")
        self._handles: list[Any] = []
        self._frozen: dict[tuple[str, str], torch.Tensor] = {}
        self.optimizer: Optional[torch.optim.Optimizer] = None

    # ------------------------------------------------------------------ gates
    def gate(self, target: tuple[str, str], like: torch.Tensor) -> torch.Tensor:
        """The 0/1 gate ``h(M)`` of one parameter, broadcastable to it (differentiable through the STE)."""
        slices = self.targets[target]
        if self.granularity == "element":
            return indicator(self.values[slices[0].key].to(like.device), self._backward_ste, self.slope).to(like.dtype)
        gate = torch.ones(like.shape[0], device=like.device, dtype=like.dtype)
        for piece in slices:
            h = indicator(self.values[piece.key].to(like.device), self._backward_ste, self.slope).to(like.dtype)
            gate = gate.index_copy(0, piece.positions.to(like.device), h[piece.channels.to(like.device)])
        return gate.view(-1, *([1] * (like.dim() - 1)))

    def keep_masks(self) -> dict[str, torch.Tensor]:
        """Boolean ``h(M)`` of every auxiliary tensor (``True`` = switched on)."""
        return {key: value.detach() > 0 for key, value in self.values.items()}

    def original(self, target: tuple[str, str]) -> torch.Tensor:
        """``W`` itself (the unmasked parameter) of a gated parameter."""
        module, parameter = target
        return getattr(self.model.get_submodule(module).parametrizations, parameter).original

    @torch.no_grad()
    def _gate_value(self, target: tuple[str, str]) -> torch.Tensor:
        return self.gate(target, self.original(target)).expand_as(self.original(target))

    # ------------------------------------------------------------------ attach / detach
    def attach(self) -> None:
        """Register the parametrizations and the state-dict hooks on the model."""
        for module_name, parameter in self.targets:
            module = self.model.get_submodule(module_name)
            parametrize.register_parametrization(module, parameter, _Gate(self, (module_name, parameter)))
        for module_name in dict.fromkeys(name for name, _ in self.targets):
            module = self.model.get_submodule(module_name)
            names = [parameter for owner, parameter in self.targets if owner == module_name]
            self._handles.append(module.register_state_dict_post_hook(_plain_keys(self, module_name, names)))
            self._handles.append(module.register_load_state_dict_pre_hook(_parametrized_keys(names)))

    @torch.no_grad()
    def detach(self) -> None:
        """Make the masks permanent: write ``W ⊙ h(M)`` into ``W`` (the same ``nn.Parameter``, so any
        optimizer keeps training it), remove the parametrizations and hooks. ``M`` leaves the model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for target in self.targets:
            module = self.model.get_submodule(target[0])
            self.original(target).masked_fill_(self._gate_value(target) == 0, 0.0)
            parametrize.remove_parametrizations(module, target[1], leave_parametrized=False)
        self.optimizer = None

    # ------------------------------------------------------------------ switched-off weights keep their values
    @torch.no_grad()
    def freeze(self) -> None:
        """Remember the values of the switched-off weights (call before the model's optimizer step)."""
        self._frozen = {target: self.original(target).detach().clone() for target in self.targets}

    @torch.no_grad()
    def restore_frozen(self) -> None:
        """Write the remembered values back where the gate is 0, undoing weight decay and momentum there."""
        for target, saved in self._frozen.items():
            weight = self.original(target)
            weight.copy_(torch.where(self._gate_value(target) > 0, weight, saved))
        self._frozen = {}

    # ------------------------------------------------------------------ the auxiliary step
    @contextlib.contextmanager
    def tracking(self) -> Iterator[list[torch.Tensor]]:
        """Let autograd track ``M`` (it does not while the model trains); yields the tensors. Inside,
        the gates back-propagate with the identity, so ``autograd.grad`` gives ``∂L/∂h(M)``; the STE
        is applied in :func:`auxiliary_gradient`."""
        tensors = list(self.values.values())
        for tensor in tensors:
            tensor.requires_grad_(True)
        self._backward_ste = "linear"
        try:
            yield tensors
        finally:
            self._backward_ste = self.ste
            for tensor in tensors:
                tensor.requires_grad_(False)
                tensor.grad = None

    @torch.no_grad()
    def magnitudes(self) -> dict[str, torch.Tensor]:
        """``‖w‖`` behind every entry of every ``M``: ``|w|`` (element) or each channel's L2 norm (channel)."""
        if self.granularity == "element":
            return {key: self.original((key, "weight")).detach().abs() for key in self.values}
        squares = {key: torch.zeros_like(value) for key, value in self.values.items()}
        for target, slices in self.targets.items():
            rows = self.original(target).detach().float().pow(2).reshape(self.original(target).shape[0], -1).sum(1)
            for piece in slices:
                square = squares[piece.key]
                square.index_add_(0, piece.channels.to(square.device), rows[piece.positions.to(rows.device)].to(square))
        return {key: value.sqrt() for key, value in squares.items()}

    def build_optimizer(self, kind: AuxOptimizer, lr: float) -> torch.optim.Optimizer:
        """The optimizer of ``M`` (plain SGD or Adam at ``lr``)."""
        tensors = list(self.values.values())
        self.optimizer = torch.optim.SGD(tensors, lr=lr) if kind == "sgd" else torch.optim.Adam(tensors, lr=lr)
        return self.optimizer

    @torch.no_grad()
    def step(self, gate_grads: Mapping[str, torch.Tensor], reg: float, **consistency: bool) -> tuple[int, int]:
        """One optimizer step of ``M`` along :func:`auxiliary_gradient`; returns how many entries
        switched back on (revived) and how many switched off."""
        if self.optimizer is None:
            raise RuntimeError("AuxiliaryParameters.step needs build_optimizer() first.")
        before = self.keep_masks()
        magnitudes = self.magnitudes()
        correlation = consistency.get("correlation", True)
        signals = [loss_signal(gate_grads[key], magnitudes[key], correlation).flatten() for key in self.values]
        scale = float(torch.cat(signals).abs().mean())
        for key, value in self.values.items():
            value.grad = auxiliary_gradient(
                gate_grads[key], value, magnitudes[key], reg, self.ste, self.slope, **consistency, scale=scale
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        after = self.keep_masks()
        revived = sum(int((after[key] & ~before[key]).sum()) for key in self.values)
        return revived, sum(int((before[key] & ~after[key]).sum()) for key in self.values)

    # ------------------------------------------------------------------ device and checkpoints
    def to(self, device: torch.device) -> None:
        """Move ``M`` to ``device`` (before :meth:`build_optimizer`)."""
        self.values = {key: value.detach().to(device) for key, value in self.values.items()}

    def state_dict(self) -> dict[str, Any]:
        """``M``, the values of the switched-off weights, and ``M``'s optimizer state."""
        off = {}
        for target in self.targets:
            gate = self._gate_value(target)
            off[target] = self.original(target).detach()[gate == 0].cpu().clone()
        return {
            "values": {key: value.detach().cpu().clone() for key, value in self.values.items()},
            "switched_off": off,
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
        }

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load ``M`` and write the switched-off weights' values back into ``W`` (the model's own
        ``load_state_dict`` saw only ``W ⊙ h(M)``). Load the optimizer state separately once it exists."""
        missing = sorted(set(self.values) ^ set(state["values"]))
        if missing:
            raise ValueError(f"The checkpoint's auxiliary parameters do not match this model: {missing}.")
        for key, value in state["values"].items():
            if value.shape != self.values[key].shape:
                raise ValueError(
                    f"Auxiliary tensor {key!r} has shape {tuple(value.shape)} in the checkpoint, "
                    f"{tuple(self.values[key].shape)} here."
                )
            self.values[key].copy_(value)
        for target, values in state["switched_off"].items():
            weight = self.original(tuple(target))
            weight[self._gate_value(tuple(target)) == 0] = values.to(weight.device, weight.dtype)


def _original_key(prefix: str, parameter: str) -> str:
    return f"{prefix}parametrizations.{parameter}.original"


def _plain_keys(owner: AuxiliaryParameters, module_name: str, parameters: Sequence[str]):  # noqa: ANN202
    """State-dict post hook: ``<p>`` = ``W ⊙ h(M)`` (zeros written as +0.0) in place of ``parametrizations.<p>.original``."""

    def hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
        for parameter in parameters:
            key = _original_key(prefix, parameter)
            if key in state_dict:
                weight = state_dict.pop(key).detach()
                off = owner._gate_value((module_name, parameter)) == 0
                state_dict[prefix + parameter] = weight.masked_fill(off.to(weight.device), 0.0)

    return hook


def _parametrized_keys(parameters: Sequence[str]):  # noqa: ANN202 - a load_state_dict pre hook
    """Load-state-dict pre hook: a plain ``<p>`` key fills ``parametrizations.<p>.original``."""

    def hook(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
        for parameter in parameters:
            if prefix + parameter in state_dict and _original_key(prefix, parameter) not in state_dict:
                state_dict[_original_key(prefix, parameter)] = state_dict.pop(prefix + parameter)

    return hook
