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
import itertools
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal, Mapping, Optional, Sequence, Union

import torch
import torch.nn.utils.parametrize as parametrize
from torch import nn

from lightning_prune.choices import check_choice, choices
from lightning_prune.criteria import Granularity
from lightning_prune.structure import ChannelGroup
from lightning_prune.structure.plans import _weight_dim

Ste = Literal["linear", "leaky_relu", "softplus"]
AuxOptimizer = Literal["sgd", "adam"]
_EPS = 1e-12


def ste_derivative(aux: torch.Tensor, ste: Ste = "leaky_relu", slope: float = 0.5) -> torch.Tensor:
    r"""The straight-through estimate h̃'(m) of the indicator's derivative.

    ``"linear"``: 1 (identity STE); ``"leaky_relu"``: 1 for m > 0, ``slope`` for m ≤ 0;
    ``"softplus"``: σ(m), the derivative of softplus.
    """
    if ste == "linear":
        return torch.ones_like(aux)
    if ste == "leaky_relu":
        return torch.where(aux > 0, 1.0, slope).to(aux.dtype)
    if ste == "softplus":
        return torch.sigmoid(aux)
    raise ValueError(f"`ste` must be one of {choices(Ste)}, got {ste!r}.")


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


class _PassThrough(torch.autograd.Function):
    """``hard`` (a precomputed h(M)) forward, the identity to ``aux`` backward: the linear STE without a pass over M."""

    @staticmethod
    def forward(ctx: Any, aux: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:  # noqa: ANN401
        return hard.view_as(hard)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ANN401
        return grad, None


class _Gather(torch.autograd.Function):
    """``hard[index]`` (a precomputed h(M), with one always-on entry after M's) forward; backward the identity to ``aux``
    (the flat M) summed over repeated indices: every channel gate of the network in one gather, the linear STE."""

    @staticmethod
    def forward(ctx: Any, aux: torch.Tensor, hard: torch.Tensor, index: torch.Tensor) -> torch.Tensor:  # noqa: ANN401
        ctx.save_for_backward(index)
        ctx.size = hard.numel()
        return hard.index_select(0, index)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # noqa: ANN401
        (index,) = ctx.saved_tensors  # index_put_ with accumulate: deterministic on CUDA too
        return grad.new_zeros(ctx.size).index_put_((index,), grad, accumulate=True)[: ctx.size - 1], None, None


def indicator(aux: torch.Tensor, ste: Ste = "leaky_relu", slope: float = 0.5) -> torch.Tensor:
    r"""h(m) = 1[m > 0] in the forward pass; the straight-through estimate h̃'(m) in the backward pass."""
    return _Indicator.apply(aux, ste, slope)


def loss_signal(gate_grad: torch.Tensor, magnitude: torch.Tensor, correlation: bool = True) -> torch.Tensor:
    r"""The loss part ``C`` of the auxiliary update, before normalisation.

    ``gate_grad`` is ``∂L/∂h = Σ ∂L/∂T ⊙ W`` (summed over the weights an entry of ``M`` gates);
    ``magnitude`` is ``‖w‖`` of those weights (``|w|``, or a channel's L2 norm). Correlation
    consistency: ``C = ∂L/∂h / ‖w‖ = Σ ∂L/∂T ⊙ ∂‖w‖/∂w``, the rate at which the weights' own
    loss-descent update would grow (−) or shrink (+) their magnitude, so ``m`` moves the way the
    weights' magnitude would, whatever its size (‖w‖ is taken at least 1e-12; where ‖w‖ = 0 the weights
    are 0 and so is ``∂L/∂h``). Off: ``C = ∂L/∂h``, the literal chain rule (the first-order loss change
    of switching the weights off, scaled by ``‖w‖``).
    """
    out = torch.empty(gate_grad.numel(), dtype=torch.float32, device=gate_grad.device)
    _write_loss_signal([gate_grad.reshape(-1)], magnitude.reshape(-1).float().clone(), correlation, [out.numel()], out)
    return out.view(gate_grad.shape)


def _write_loss_signal(
    gate_grads: Sequence[torch.Tensor], magnitude: torch.Tensor, correlation: bool, segments: Sequence[int], out: torch.Tensor
) -> None:
    """:func:`loss_signal` of flat segments (``gate_grads``, lengths ``segments``) written into the flat ``out``,
    without concatenating them first; ``magnitude`` (flat float32) is clamped in place."""
    if correlation:
        magnitude.clamp_min_(_EPS)
    for grad, piece, target in zip(gate_grads, magnitude.split(segments), out.split(segments)):
        torch.div(grad, piece, out=target) if correlation else target.copy_(grad)


def auxiliary_gradient(
    gate_grad: torch.Tensor,
    aux: torch.Tensor,
    magnitude: torch.Tensor,
    reg: Union[float, torch.Tensor],
    ste: Ste = "leaky_relu",
    slope: float = 0.5,
    sensitivity: bool = True,
    correlation: bool = True,
    direction: bool = True,
    scale: Optional[Union[float, torch.Tensor]] = None,
    normalize: bool = True,
) -> torch.Tensor:
    r"""The update direction of one auxiliary tensor ``M`` (what its optimizer steps along).

        ∂M = h̃'(M) ⊙ C / s + reg · S(‖w‖) ⊙ D(M)

    - ``C``: the loss signal of :func:`loss_signal` (correlation consistency switches it); the
      literal chain rule is ``∂L/∂M = ∂L/∂h ⊙ h̃'(M)``.
    - ``s = scale``: the mean of |C| over *all* auxiliary tensors (one scale for the network, so
      layers whose weights matter more keep more of them); ``None``: the mean over this tensor.
      ``reg`` is relative to it: without normalising, the paper's ``reg`` switches every weight
      off on the digits data. It is taken before the STE factor, so it does not drift as weights
      switch off. ``normalize=False``: ``s = 1``, the loss signal in its own units (the paper's
      literal reading, ``paper_defaults=True`` of the callback).
    - The regulariser is R(M) = Σ h(M), the number of weights kept (‖T‖₀ of the pruned tensors).
      Direction consistency (``direction``): its gradient goes through the same STE as the loss,
      ``D(M) = h̃'(M)``, so below zero the pull is as weak as the loss's push back (a switched-off
      weight can return; with the linear STE this term changes nothing). Off: ``D = 1``
      (R = Σ m, a constant pull that drives switched-off entries ever lower).
    - Sensitivity consistency (``sensitivity``): ``S = 1 / (1 + ‖w‖ / mean‖w‖)``, so an important,
      large-magnitude weight is harder to switch off. Off: ``S = 1/2`` (its value at the mean).

    A non-finite ``C`` anywhere gives a zero update. :meth:`AuxiliaryParameters.step` computes the same
    with its own buffers (:func:`_factored_gradient`).
    """
    check_choice("ste", ste, Ste)
    flat = aux.detach().reshape(-1).float()
    out, magnitude = torch.empty_like(flat), magnitude.reshape(-1).float().clone()
    base, factor, _ = _factored_gradient(
        [gate_grad.reshape(-1)], flat, magnitude, torch.empty_like(flat), (flat > 0).float(), reg, ste, slope,
        [flat.numel()], out, sensitivity, correlation, direction, scale, normalize,
    )
    return base.mul_(factor).view(aux.shape).to(aux.dtype)


def _factored_gradient(
    gate_grads: Sequence[torch.Tensor],
    aux: torch.Tensor,
    magnitude: torch.Tensor,
    scratch: torch.Tensor,
    hard: torch.Tensor,
    reg: Union[float, torch.Tensor],
    ste: Ste,
    slope: float,
    segments: Sequence[int],
    out: torch.Tensor,
    sensitivity: bool = True,
    correlation: bool = True,
    direction: bool = True,
    scale: Optional[Union[float, torch.Tensor]] = None,
    normalize: bool = True,
    reduce: Optional[Reduce] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r""":func:`auxiliary_gradient` of a flat ``M`` (``aux``, float32) as ``∂M = base ⊙ factor``, so that plain SGD
    takes its step in one ``addcmul``, and a 0-dim ``finite`` flag (``base`` is zero where it is false).

    With direction consistency ``base = C + s·reg·S`` and ``factor = h̃'(M)/s`` (0-dim for the linear STE);
    without it ``base = C ⊙ h̃'/s + reg·S`` and ``factor = 1``. ``gate_grads``: flat ``∂L/∂h`` per segment
    (``segments``: their lengths; the mean of ``S`` is per segment); ``hard``: ``h(M)`` as float;
    ``reduce``: averages ``C`` over processes (``‖w‖`` is the same on every rank). Buffers (float32, ``M``'s
    size): ``out`` gets ``base``, ``magnitude`` holds ``‖w‖`` and is overwritten, ``scratch`` ends holding
    ``h̃'/s`` (except for the linear STE). Nothing else of ``M``'s size is allocated and nothing is read to the host.
    """
    _write_loss_signal(gate_grads, magnitude, correlation, segments, out)  # C, in out
    if reduce is not None:
        out = reduce(out)
    # ‖C‖₁ (abs into scratch, then sum: twice as fast as a 1-norm on CPU); NaN/inf anywhere makes it non-finite
    total = torch.abs(out, out=scratch).sum() if normalize and scale is None else out.sum()
    finite = torch.isfinite(total)
    if not normalize:
        scale = torch.ones((), device=out.device)
    elif scale is None:
        scale = total / out.numel()
    scale = torch.where(finite, torch.as_tensor(scale, dtype=torch.float32, device=out.device).clamp_min(_EPS), 1.0)
    if ste == "linear":  # h̃'/s
        factor = scale.reciprocal()
    elif ste == "leaky_relu":  # (slope + (1 − slope)·h(m)) / s
        factor = torch.mul(hard, (1.0 - slope) / scale, out=scratch).add_(slope / scale)
    else:  # softplus: σ(m) / s
        factor = torch.sigmoid(aux, out=scratch).div_(scale)
    if not direction:  # ∂M = C ⊙ h̃'/s + reg·S
        out.mul_(factor)
    pull = scale * reg if direction else torch.as_tensor(reg, dtype=torch.float32, device=out.device)
    if sensitivity:  # reg·S = reg·mean / (mean + ‖w‖), per segment
        pieces, outs = magnitude.split(segments), out.split(segments)
        means = [piece.sum() for piece in pieces]  # ‖w‖ ≥ 0; sum is several times faster than a 1-norm on CPU
        torch._foreach_div_(means, list(segments))
        torch._foreach_clamp_min_(means, _EPS)
        torch._foreach_add_(pieces, means)
        torch._foreach_addcdiv_(outs, torch._foreach_mul(means, pull), pieces)
    else:
        out.add_(pull * 0.5)
    out.masked_fill_(~finite, 0.0)
    return out, factor if direction else torch.ones((), device=out.device), finite


class PullController:
    r"""Steers the pull µ (``reg``) so that the fraction of switched-off entries of ``M`` reaches ``target`` by the end
    of the learning window: AutoPrune's own mechanism, a stronger pull switches more weights off.

    The fraction switched off lags µ (an entry must travel from ``init`` to 0 first), so the controller watches what
    responds at once: ``q``, the ``goal``-quantile of ``M`` (the value below which the fraction ``goal`` of the entries
    lie; the fraction switched off is ``goal`` exactly when ``q`` = 0). Around every auxiliary step (:meth:`step`, on
    the device: no host read), at window progress ``p`` (0 → 1)::

        goal(p) = target · (1 − (1 − min(1, p / reach))³)       (Zhu & Gupta's AGP curve, flat at its end)
        Δq      = q(after) − q(before),   wanted = −q(before) / horizon
        u      += gain · (Δq − wanted) / (|Δq| + |wanted| + ε),    µ = µ₀ · sinh(u)   (u₀ = asinh(1), |u| ≤ 12)

    so µ grows while ``q`` falls toward 0 slower than it should and shrinks while it falls faster (or overshoots
    below 0): multiplicatively (by at most ``gain``, 30% of ``u``'s scale, per step) while ``|µ| ≫ µ₀``, additively near 0, and below 0
    if need be. A negative µ rewards the entries kept: the loss signal alone switches weights off (about 60% of
    LeNet-300-100's on the digits data), so a lower target needs a push the other way. ``q`` is taken on at most
    65,536 entries of ``M`` (a fixed random subset) with ``torch.kthvalue``.

    At the window's last step (progress 1) :meth:`settle` switches off exactly ``target`` (the entries of smallest
    ``m``; :attr:`landed` keeps where the controller itself had got). Measured on the digits data, the controller
    itself lands within ±0.5% (two seeds each): LeNet-300-100 weights, 10 epochs, 0.9018/0.8995 for 0.9,
    0.5017/0.5039 for 0.5, 0.9804/0.9799 for 0.98 (6 epochs: 0.9001/0.8996 for 0.9); LeNet-5's 226 channels,
    8 epochs, 0.5044/0.4956 for 0.5. The correction makes the target exact wherever it would not be.

    Everything is a function of ``M``, which is the same on every rank (its loss signal is averaged), and of the
    window's progress, so every rank takes the same decisions. :meth:`state_dict` holds ``u``: a resumed run
    continues with the same µ.
    """

    def __init__(self, target: float, reg: float, gain: float = 0.3, horizon: float = 10.0, reach: float = 0.8) -> None:
        self.target, self.gain, self.horizon, self.reach = target, gain, horizon, reach
        self.scale = reg if reg > 0 else 1.0
        self.control = torch.tensor(math.asinh(reg / self.scale))
        self._sample: Optional[torch.Tensor] = None
        self.landed: Optional[torch.Tensor] = None

    @property
    def reg(self) -> torch.Tensor:
        """The current µ, a 0-dim tensor on ``M``'s device."""
        return self.control.sinh() * self.scale

    def goal(self, progress: float) -> float:
        """The fraction of ``M`` to be switched off at window progress ``progress``."""
        return self.target * (1.0 - (1.0 - min(1.0, progress / self.reach)) ** 3)

    def _quantile(self, flat: torch.Tensor, k: int) -> torch.Tensor:
        sample = flat if self._sample is None else flat[self._sample]
        return sample.kthvalue(k).values

    @torch.no_grad()
    def step(self, aux: "AuxiliaryParameters", progress: float, learn: Callable[[torch.Tensor], None]) -> None:
        """``learn(µ)`` (one auxiliary step), then one multiplicative step of µ (a few device ops)."""
        flat = aux.values_flat
        if self.control.device != flat.device:
            self.control = self.control.to(flat.device)
        if self._sample is None and flat.numel() > 65536:
            generator = torch.Generator().manual_seed(0)  # the same subset on every rank
            self._sample = torch.randperm(flat.numel(), generator=generator)[:65536].to(flat.device)
        n = flat.numel() if self._sample is None else self._sample.numel()
        k = round(self.goal(progress) * n)
        before = self._quantile(flat, k) if k > 0 else None
        learn(self.reg)
        if before is not None:
            moved, wanted = self._quantile(flat, k) - before, before / -self.horizon
            error = (moved - wanted) / (moved.abs() + wanted.abs() + _EPS)
            self.control.add_(error, alpha=self.gain).clamp_(-12.0, 12.0)
        if progress >= 1.0:
            self.settle(aux)

    @torch.no_grad()
    def settle(self, aux: "AuxiliaryParameters") -> None:
        """At the window's end: remember where the controller landed (:attr:`landed`, on the device), then switch off
        exactly the target (:meth:`AuxiliaryParameters.update`). Calling it again changes nothing."""
        if self.landed is None:
            self.landed = aux.switched_off_fraction()
        aux.update(self.target)

    def state_dict(self) -> dict[str, Any]:
        landed = None if self.landed is None else self.landed.detach().cpu().clone()
        return {"control": self.control.detach().cpu().clone(), "target": self.target, "landed": landed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.control = state["control"].to(self.control.device, torch.float32).clone()
        self.landed = state.get("landed")


@dataclass(frozen=True)
class _Slice:
    """Entries of one parameter gated by one auxiliary tensor: ``positions`` along dim 0 take ``channels``
    of the tensor (channel granularity); both ``None`` for element granularity (same shape)."""

    key: str
    positions: Optional[torch.Tensor] = None
    channels: Optional[torch.Tensor] = None


@dataclass
class _GateCache:
    """``h(M)`` (``on``) and ``1 − h(M)`` (``off``) of every gated tensor in one dtype, broadcastable to it, as views of
    buffers (``buffers``) refreshed in place when ``M`` changed (``version``: of :meth:`AuxiliaryParameters._hard_mask`)."""

    version: int
    on: dict[tuple[str, str], torch.Tensor]
    off: dict[tuple[str, str], torch.Tensor]
    buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # h(M) with its always-on entry (in dtype), on, off


class _Gate(nn.Module):
    """The parametrization ``W -> W ⊙ gate`` of one parameter (``gate`` from :class:`AuxiliaryParameters`)."""

    def __init__(self, owner: "AuxiliaryParameters", target: tuple[str, str]) -> None:
        super().__init__()
        self.__dict__["owner"] = owner  # a plain reference: not a submodule, not in state_dict
        self.target = target

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.owner.gate(self.target, weight)


LossClosure = Callable[[], torch.Tensor]
"""``() -> loss`` of one held-out batch, computed through the (gated) model."""
Reduce = Callable[[torch.Tensor], torch.Tensor]
"""Averages a tensor over processes (e.g. ``trainer.strategy.reduce(t, reduce_op="mean")``)."""


class AuxiliaryParameters:
    r"""Auxiliary tensors ``M`` for chosen weights of ``model``, their optimizer, and the parametrizations
    ``T = W ⊙ h(M)``: AutoPrune's whole algorithm without a Trainer.

    A :class:`~lightning_prune.pruner.Pruner`. One call per held-out batch, :meth:`learn` (loss → ``∂L/∂h`` →
    :func:`auxiliary_gradient` → one optimizer step of ``M``); :meth:`before_step`/:meth:`after_step` around every
    optimizer step of the model keep the switched-off weights' values. All of ``M`` lives in one flat float32 tensor (``values``
    holds views of it), so a step is a handful of fused tensor ops without host synchronisation: the
    non-finite flag stays on the device until :meth:`take_counts`, which also counts the weights revived
    and switched off since its last call. A step writes into preallocated ``M``-sized buffers (no
    temporaries of ``M``'s size), and the float ``h(M)`` is recomputed only when ``M`` changed (its version
    counter), so the gates cost no compare per forward. Per step and training batch that is about 19
    elementwise passes over ``M``-sized tensors (``benchmarks/autoprune_step.py`` counts them): the gating
    multiply in two forwards and two backwards, the copy and ``lerp`` around the model's optimizer step,
    and 13 in :meth:`step`.

    In a plain PyTorch loop: :meth:`prepare` and :meth:`build_optimizer` once; :meth:`before_step` and
    :meth:`after_step` around each optimizer step of the model (:func:`~lightning_prune.pruner.hook_optimizer`);
    :meth:`learn` on a held-out batch after it; :meth:`update` to switch off an exact fraction; :meth:`finalize`
    to make the masks permanent.

    Example::

        import torch
        from torch import nn
        from lightning_prune import AuxiliaryParameters, hook_optimizer

        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
        aux = AuxiliaryParameters(model, modules=["0", "2"])  # one entry of M per weight
        aux.prepare()  # the model computes with W * h(M) from now on
        aux.build_optimizer("sgd", lr=0.05)
        handle = hook_optimizer(optimizer, aux)  # switched-off weights keep their values through each step

        def loss_on(x):
            return nn.functional.mse_loss(model(x), x[:, :4])

        for step in range(40):
            loss = loss_on(torch.randn(32, 16))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            held_out = torch.randn(32, 16)
            aux.learn(lambda: loss_on(held_out), reg=2.0)  # one step of M on a held-out batch
        learned = float(aux.switched_off_fraction())  # one host read: the fraction M switched off
        aux.update(0.8)  # exactly 80% of the weights off (switched-on ones come back with their values)
        handle.remove()
        aux.finalize()  # W * h(M) written into W, the parametrizations removed: 80% of the weights are zero

    Args:
        model: the model; parameters are addressed by their names in it.
        modules: names of the Conv/Linear modules whose weights are pruned (element granularity).
            Modules sharing one weight tensor (tied weights) share one ``M``, keyed by the first name.
        granularity: ``"element"`` or ``"channel"``.
        groups: channel granularity: the coupled channel groups to gate (one ``M`` entry per channel,
            keyed by the group's root layer); every out-layer of a group (weight and bias) and every
            BatchNorm in it is gated (a head's q/k/v rows, not its position-bias column), so the gated model computes what the physically pruned one does.
            At least one channel of every group stays on (see :meth:`step`).
        ste: the straight-through estimator of h (:func:`ste_derivative`).
        slope: the leaky-ReLU estimator's slope for m ≤ 0.
        init: initial value of every entry of ``M`` (positive: every weight starts switched on).

    While attached, ``model.state_dict()`` holds plain ``<module>.weight`` keys with ``W ⊙ h(M)``
    (so a mid-training checkpoint loads into a fresh, unpruned model), and ``load_state_dict`` of
    such keys fills ``W``; :meth:`state_dict` holds ``M``, the values of the switched-off weights and
    ``M``'s optimizer state, which :meth:`load_state_dict` writes back, so a resumed run continues
    from exactly the same ``W``.
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
        check_choice("granularity", granularity, Granularity)
        check_choice("ste", ste, Ste)
        self.model = model
        self.granularity = granularity
        self.groups = list(groups) if granularity == "channel" else []
        self.ste, self.slope = ste, slope
        self.targets: dict[tuple[str, str], list[_Slice]] = defaultdict(list)
        self._target_shapes: dict[tuple[str, str], tuple[int, ...]] = {}  # channel granularity
        self._channel_dims: dict[tuple[str, str], int] = {}  # the dim of a parameter holding output channels
        shapes: dict[str, tuple[int, ...]] = {}
        if granularity == "element":
            owners: dict[int, str] = {}
            for name in modules:
                weight = model.get_submodule(name).weight
                key = owners.setdefault(id(weight), name)  # tied weights: one M, keyed by the first module
                shapes.setdefault(key, tuple(weight.shape))
                self.targets[(name, "weight")].append(_Slice(key))
        else:
            for group in groups:
                shapes[group.root] = (group.size,)
                for member in group.members:
                    module = model.get_submodule(member.module)
                    if member.kind in ("in", "table") or next(module.parameters(recurse=False), None) is None:
                        continue
                    for parameter, tensor in module.named_parameters(recurse=False):
                        if tensor is not None:
                            self.targets[(member.module, parameter)].append(_Slice(group.root, member.positions, member.channels))
                            self._target_shapes[(member.module, parameter)] = tuple(tensor.shape)
                            # a transposed conv's or Hugging Face Conv1D's weight holds them in dim 1
                            dim = _weight_dim(module, "out") if parameter == "weight" and member.kind == "out" else 0
                            self._channel_dims[(member.module, parameter)] = dim
        if not shapes:
            raise ValueError("Nothing to prune: no module (element) or channel group (channel) was given.")
        self._shapes = shapes
        self._counts = [math.prod(shape) for shape in shapes.values()]
        ends = list(itertools.accumulate(self._counts))
        self._spans = {key: slice(end - count, end) for key, count, end in zip(shapes, self._counts, ends)}
        device = next(iter(model.parameters())).device
        self._flat = torch.full((sum(self._counts),), float(init), device=device)
        self._views()
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self._handles: list[Any] = []
        self._originals: list[torch.Tensor] = []
        self._restore_targets: list[tuple[str, str]] = []  # the first target of each of _originals
        self._saved: Optional[list[torch.Tensor]] = None
        self._buffer_store: Optional[list[torch.Tensor]] = None
        self._pending_optimizer: Optional[dict[str, Any]] = None
        self._tracked: Optional[dict[str, torch.Tensor]] = None
        self._tracked_gates: Optional[dict[tuple[str, str], torch.Tensor]] = None

    def _views(self) -> None:
        """``values``, per-key views of the flat ``M``; device-side masks, buffers and counters."""
        self.values: dict[str, torch.Tensor] = dict(zip(self._shapes, (
            chunk.view(shape) for chunk, shape in zip(self._flat.split(self._counts), self._shapes.values())
        )))
        device = self._flat.device
        self._hard_ext = torch.ones(self._flat.numel() + 1, device=device)  # h(M), then an always-on entry
        self._hard, self._hard_version = self._hard_ext[:-1], -1
        self._gate_caches: dict[torch.dtype, _GateCache] = {}
        self._reported = self._hard_mask() > 0  # h(M) at the last take_counts
        self._work, self._scratch, self._abs = (torch.empty_like(self._flat) for _ in range(3))  # the step's buffers
        self._nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        self._collapsed = torch.zeros((), dtype=torch.bool, device=device)
        self.targets = defaultdict(list, {
            target: [_Slice(s.key, *(None if t is None else t.to(device) for t in (s.positions, s.channels))) for s in slices]
            for target, slices in self.targets.items()
        })
        if self.granularity == "channel":
            self._channel_layout()

    def _channel_layout(self) -> None:
        """Channel granularity: index tensors that compute every gate, magnitude and group floor in a few ops for the
        whole network. The gated tensors are ordered by rank (``_ranks``: rank, targets, their rows), so that one
        gather of ``_rows`` (per row of each tensor, its entry of the flat ``M``; the always-on entry ``n`` where no
        group gates the row) splits into gates shaped for broadcasting; ``_gated``/``_entries``: the gated rows and
        their entries (for the magnitudes); ``_groups``: each key's entries, padded with ``n`` (for the floor)."""
        n, device = self._flat.numel(), self._flat.device
        order = sorted(self.targets, key=self._layout_key)
        rows = []
        for target in order:
            row = torch.full((self._rows_of(target),), n, dtype=torch.long, device=device)
            for piece in self.targets[target]:
                row[piece.positions] = piece.channels + self._spans[piece.key].start
            rows.append(row)
        self._rows = torch.cat(rows)
        self._gated = (self._rows < n).nonzero().flatten()
        self._entries = self._rows[self._gated]
        self._ranks = [(layout, [t for t in order if self._layout_key(t) == layout]) for layout in dict.fromkeys(map(self._layout_key, order))]
        width = max(self._counts)
        self._groups = torch.full((len(self._counts), width), n, dtype=torch.long, device=device)
        for index, span in enumerate(self._spans.values()):
            self._groups[index, : span.stop - span.start] = torch.arange(span.start, span.stop, device=device)

    def _layout_key(self, target: tuple[str, str]) -> tuple[int, int]:
        """A gated tensor's rank and the dim holding its output channels (1 for a transposed conv's or ``Conv1D``'s
        weight): tensors of one key share one broadcast shape of their gates."""
        return len(self._target_shapes[target]), self._channel_dims[target]

    def _rows_of(self, target: tuple[str, str]) -> int:
        """The output channels of a gated tensor (its size along the channel dim)."""
        return self._target_shapes[target][self._channel_dims[target]]

    def _shaped(self, gates: torch.Tensor) -> dict[tuple[str, str], torch.Tensor]:
        """The gate of every target as views of ``gates`` (flat, the rows of :meth:`_channel_layout`'s order): a few
        ops per rank and channel dim, none per tensor."""
        out = {}
        blocks = gates.split([sum(map(self._rows_of, targets)) for _, targets in self._ranks])
        for ((rank, dim), targets), block in zip(self._ranks, blocks):
            shape = (*([1] * dim), -1, *([1] * (rank - dim - 1)))
            pieces = block.view(shape).split([self._rows_of(t) for t in targets], dim=dim)
            out.update(zip(targets, pieces))
        return out

    # ------------------------------------------------------------------ gates
    def gate(self, target: tuple[str, str], like: torch.Tensor) -> torch.Tensor:
        """The 0/1 gate ``h(M)`` of one parameter, broadcastable to it (differentiable through the STE)."""
        if self._tracked is None:  # cached in the weights' dtype: no op per forward while M is unchanged
            return self._gates(like.dtype).on[target]
        if self.granularity == "element":  # M learns: ∂L/∂h(M) flows to it (the linear STE of tracking)
            key = self.targets[target][0].key
            return _PassThrough.apply(self._tracked[key], self._hard_mask()[self._spans[key]].view(self._shapes[key])).to(like.dtype)
        if self._tracked_gates is None:  # every channel gate of this forward from one gather (the linear STE)
            self._hard_mask()
            self._tracked_gates = self._shaped(_Gather.apply(self._flat, self._hard_ext, self._rows).to(like.dtype))
        return self._tracked_gates[target]

    def _hard_mask(self) -> torch.Tensor:
        """Flat float ``h(M)`` (the gates of every forward, 0.0 or 1.0), recomputed only when ``M`` changed (its
        version counter moved: a step, a load, a direct write into ``values``); one compare written as float
        (several times faster on CPU than a boolean mask, which the gates would convert anyway)."""
        if self._hard_version != self._flat._version:
            torch.gt(self._flat, 0, out=self._hard)
            self._hard_version = self._flat._version
        return self._hard

    def _gates(self, dtype: torch.dtype) -> _GateCache:
        """``h(M)`` and ``1 − h(M)`` of every gated tensor in ``dtype``, refreshed once per change of ``M`` (a cast for
        bf16/fp16 weights, the channel gather, the complement: a few ops for the whole network)."""
        self._hard_mask()
        cache = self._gate_caches.get(dtype)
        if cache is None:
            hard = self._hard_ext if dtype == self._hard_ext.dtype else torch.empty_like(self._hard_ext, dtype=dtype)
            on = hard if self.granularity == "element" else torch.empty(self._rows.numel(), dtype=dtype, device=hard.device)
            off = torch.empty_like(on)
            cache = self._gate_caches[dtype] = _GateCache(-1, self._gate_views(on), self._gate_views(off), (hard, on, off))
        if cache.version != self._hard_version:
            hard, on, off = cache.buffers
            if hard is not self._hard_ext:
                hard.copy_(self._hard_ext)
            if self.granularity == "channel":
                torch.index_select(hard, 0, self._rows, out=on)
            torch.mul(on, -1, out=off).add_(1)
            cache.version = self._hard_version
        return cache

    def _gate_views(self, buffer: torch.Tensor) -> dict[tuple[str, str], torch.Tensor]:
        """Every target's gate as a view of ``buffer`` (element: ``h(M)`` laid out as ``M``; channel: rows in layout order)."""
        if self.granularity == "channel":
            return self._shaped(buffer)
        keys = {target: slices[0].key for target, slices in self.targets.items()}
        return {target: buffer[self._spans[key]].view(self._shapes[key]) for target, key in keys.items()}

    @property
    def values_flat(self) -> torch.Tensor:
        """All of ``M``, flat (``values`` are views of it)."""
        return self._flat

    def switched_off_fraction(self) -> torch.Tensor:
        """The fraction of entries of ``M`` that are ≤ 0 (weights, or channels), a 0-dim device tensor (no host read)."""
        return 1.0 - self._hard_mask().mean()

    def plan(self) -> dict[int, torch.Tensor]:
        """Channel granularity: the kept channels of every gated group, ``{group index: indices}`` on the CPU
        (the floor of :meth:`step` keeps at least one); a host read, for the end of an epoch."""
        return {group.index: (self.values[group.root].detach() > 0).nonzero().flatten().cpu() for group in self.groups}

    @torch.no_grad()
    def parameter_masks(self) -> dict[str, torch.Tensor]:
        """Boolean keep-mask of every gated parameter, shaped like it and keyed by its name in the model (one entry per
        shared parameter): what a :class:`lightning_prune.masks.MaskSet` enforces once ``M`` is fixed. Needs :attr:`attached`."""
        masks, seen = {}, set()
        for module, parameter in self.targets:
            if id(self.original((module, parameter))) not in seen:
                seen.add(id(self.original((module, parameter))))
                masks[f"{module}.{parameter}" if module else parameter] = self._gate_value((module, parameter)) != 0
        return masks

    @property
    def attached(self) -> bool:
        """Whether the parametrizations ``W ⊙ h(M)`` are on the model (between :meth:`prepare` and :meth:`finalize`)."""
        return bool(self._handles)

    def original(self, target: tuple[str, str]) -> torch.Tensor:
        """``W`` itself (the unmasked parameter) of a gated parameter."""
        module, parameter = target
        return getattr(self.model.get_submodule(module).parametrizations, parameter).original

    @torch.no_grad()
    def _gate_value(self, target: tuple[str, str]) -> torch.Tensor:
        return self.gate(target, self.original(target)).expand_as(self.original(target))

    @torch.no_grad()
    def _refresh_masks(self) -> None:
        """Compute ``h(M)`` and the gates now (after :meth:`prepare`, a move or a load), not in the next forward."""
        for dtype in {weight.dtype for weight in self._originals}:
            self._gates(dtype)

    # ------------------------------------------------------------------ prepare / finalize
    def prepare(self) -> None:
        """Register the parametrizations and the state-dict hooks on the model."""
        for module_name, parameter in self.targets:
            module = self.model.get_submodule(module_name)
            parametrize.register_parametrization(module, parameter, _Gate(self, (module_name, parameter)))
        for module_name in dict.fromkeys(name for name, _ in self.targets):
            module = self.model.get_submodule(module_name)
            names = [parameter for owner, parameter in self.targets if owner == module_name]
            self._handles.append(module.register_state_dict_post_hook(_plain_keys(self, module_name, names)))
            self._handles.append(module.register_load_state_dict_pre_hook(_parametrized_keys(names)))
        firsts: dict[int, tuple[str, str]] = {}
        for target in self.targets:
            firsts.setdefault(id(self.original(target)), target)
        self._restore_targets = list(firsts.values())
        self._originals = [self.original(target) for target in self._restore_targets]
        self._refresh_masks()

    @torch.no_grad()
    def finalize(self, permanent: bool = True) -> None:
        """Make the masks permanent: write ``W ⊙ h(M)`` into ``W`` (the same ``nn.Parameter``, so any
        optimizer keeps training it), remove the parametrizations and hooks. ``M`` leaves the model.
        ``permanent=False`` leaves ``W`` as it is (for a model reshaped under ``M``, whose gates no longer fit).
        ``M`` stays readable (:attr:`values`, :meth:`plan`, :meth:`take_counts`, :meth:`state_dict`); a second call
        changes nothing."""
        if not self.attached:
            return
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for target in self.targets if permanent else ():
            self.original(target).masked_fill_(self._gate_value(target) == 0, 0.0)
        for target in self.targets:
            parametrize.remove_parametrizations(self.model.get_submodule(target[0]), target[1], leave_parametrized=False)
        self.optimizer = None
        self._originals, self._restore_targets, self._saved, self._buffer_store = [], [], None, None

    # ------------------------------------------------------------------ switched-off weights keep their values
    @torch.no_grad()
    def before_step(self) -> None:
        """Copy every gated ``W`` into one preallocated buffer (call before each optimizer step of the model)."""
        if self._saved is None:
            self._saved = [torch.empty_like(weight) for weight in self._originals]
        torch._foreach_copy_(self._saved, self._originals)

    @torch.no_grad()
    def after_step(self) -> None:
        """Write the saved values back where the gate is 0, undoing weight decay and momentum there: one fused
        ``lerp(W, saved, 1 − h)`` over every gated ``W``, in place (exactly ``W`` at 1 − h = 0 and ``saved`` at
        1 − h = 1, and on CPU three times as fast as a ``where`` on a boolean mask)."""
        if self._saved is None:
            return
        offs = [self._gates(weight.dtype).off[target] for weight, target in zip(self._originals, self._restore_targets)]
        torch._foreach_lerp_(self._originals, self._saved, offs)

    # ------------------------------------------------------------------ the auxiliary step
    @contextlib.contextmanager
    def tracking(self) -> Iterator[list[torch.Tensor]]:
        """Let autograd track ``M`` (it does not while the model trains); yields what to take gradients with respect to:
        element granularity, the per-key pieces of the flat ``M`` (outputs of one ``split``: one backward node for all
        keys, where per-key slices would each back-propagate a flat-sized zero tensor); channel granularity, the flat
        ``M`` itself (its gates are one gather). Inside, the gates back-propagate with the identity, so
        ``autograd.grad`` gives ``∂L/∂h(M)``; the STE is applied in :func:`auxiliary_gradient`."""
        self._flat.requires_grad_(True)
        if self.granularity == "element":
            self._tracked = {key: chunk.view(shape) for (key, shape), chunk in zip(self._shapes.items(), self._flat.split(self._counts))}
        else:
            self._tracked = {}
        try:
            yield list(self._tracked.values()) or [self._flat]
        finally:
            self._tracked, self._tracked_gates = None, None
            self._flat.requires_grad_(False)
            self._flat.grad = None

    @torch.no_grad()
    def magnitudes(self) -> dict[str, torch.Tensor]:
        """``‖w‖`` behind every entry of every ``M``: ``|w|`` (element) or each channel's L2 norm (channel)."""
        flat = self._flat_magnitudes(torch.empty_like(self._flat))
        return dict(zip(self._shapes, (c.view(s) for c, s in zip(flat.split(self._counts), self._shapes.values()))))

    @torch.no_grad()
    def _flat_magnitudes(self, out: torch.Tensor) -> torch.Tensor:
        """``‖w‖`` of every entry of the flat ``M``, written into ``out`` (one pass over the weights)."""
        if self.granularity == "element":
            for key, piece in zip(self._shapes, out.split(self._counts)):
                weight = self.original((key, "weight")).reshape(-1)
                torch.abs(weight, out=piece) if weight.dtype == piece.dtype else piece.copy_(weight).abs_()
            return out
        weights = [self.original(target).float() for _, targets in self._ranks for target in targets]  # layout order
        squares = torch._foreach_mul(weights, weights)  # one op for the network, then one sum per tensor of rank > 1
        dims = [self._channel_dims[target] for _, targets in self._ranks for target in targets]
        rows = torch.cat([square.sum(tuple(d for d in range(square.dim()) if d != dim)) if square.dim() > 1 else square
                          for square, dim in zip(squares, dims)])
        return out.zero_().index_add_(0, self._entries, rows.index_select(0, self._gated)).sqrt_()

    def build_optimizer(self, kind: AuxOptimizer, lr: float) -> torch.optim.Optimizer:
        """The optimizer of ``M`` (plain SGD or Adam at ``lr``, one flat tensor)."""
        self.optimizer = torch.optim.SGD([self._flat], lr=lr) if kind == "sgd" else torch.optim.Adam([self._flat], lr=lr)
        if self._pending_optimizer is not None:
            self.optimizer.load_state_dict(self._pending_optimizer)
            self._pending_optimizer = None
        return self.optimizer

    def learn(
        self, compute_loss: LossClosure, reg: Union[float, torch.Tensor], reduce: Optional[Reduce] = None, normalize: bool = True, **consistency: bool
    ) -> None:
        """One auxiliary step on one held-out batch: ``compute_loss()`` through the gated model, ``∂L/∂h(M)``
        (averaged by ``reduce`` across processes), then :meth:`step`. ``W`` and its gradients are untouched
        and the model's buffers (BatchNorm statistics) are restored; nothing is read back to the host."""
        buffers = [buffer for buffer in self.model.buffers()]
        with torch.no_grad():
            if self._buffer_store is None or len(self._buffer_store) != len(buffers):
                self._buffer_store = [torch.empty_like(b) for b in buffers]
            if buffers:
                torch._foreach_copy_(self._buffer_store, buffers)
        try:
            with torch.enable_grad(), self.tracking() as inputs:
                grads = torch.autograd.grad(compute_loss(), inputs, allow_unused=True)
        finally:
            if buffers:
                with torch.no_grad():
                    torch._foreach_copy_(buffers, self._buffer_store)
        zero = torch.zeros((), device=self._flat.device)
        grads = [zero.expand(t.numel()) if g is None else g for g, t in zip(grads, inputs)]  # unused: no allocation
        self.step(grads if len(grads) == len(self._counts) else grads[0], reg, normalize, reduce=reduce, **consistency)

    @torch.no_grad()
    def step(
        self,
        gate_grad: Union[torch.Tensor, Sequence[torch.Tensor]],
        reg: Union[float, torch.Tensor],
        normalize: bool = True,
        reduce: Optional[Reduce] = None,
        **consistency: bool,
    ) -> None:
        """One optimizer step of the flat ``M`` along :func:`auxiliary_gradient`.

        ``gate_grad``: ``∂L/∂h``, flat or one tensor per key; ``normalize``: divide the loss signal by its mean
        over the network; ``reduce``: averages the loss signal over processes. Plain SGD (the ``"sgd"`` of
        :meth:`build_optimizer`) steps ``M ← M − lr · base ⊙ factor`` in one ``addcmul`` (what ``SGD.step``
        does with that gradient, without writing it first); other optimizers step on the gradient. A
        non-finite loss signal leaves ``M`` as it is and raises a device flag (:meth:`take_counts` reports
        it). With channel granularity a group whose every channel would be switched off keeps its
        largest-``m`` channel on (``m`` set to 1e-6) and raises a device flag."""
        if self.optimizer is None:
            raise RuntimeError("AuxiliaryParameters.step needs build_optimizer() first.")
        grads = gate_grad.split(self._counts) if isinstance(gate_grad, torch.Tensor) else gate_grad
        base, factor, finite = _factored_gradient(
            [grad.reshape(-1) for grad in grads], self._flat, self._flat_magnitudes(self._scratch), self._abs,
            self._hard_mask(), reg, self.ste, self.slope, self._counts, self._work, **consistency,
            normalize=normalize, reduce=reduce,
        )
        self._nonfinite |= ~finite
        lr = self._plain_sgd_lr()
        if lr is not None:
            self._flat.addcmul_(base, factor, value=-lr)
        else:
            self._flat.grad = base.mul_(factor)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self._keep_a_channel()

    @torch.no_grad()
    def _keep_a_channel(self) -> None:
        """Channel granularity: a group whose every ``m`` is ≤ 0 gets its largest-``m`` channel back (``m`` = 1e-6)."""
        if self.granularity == "channel":  # every group at once: its entries padded with -inf, one max per row
            padded = torch.cat([self._flat, self._flat.new_full((1,), -math.inf)])[self._groups]
            top, where = padded.max(dim=1)
            collapsed = top <= 0
            self._collapsed |= collapsed.any()
            self._flat.index_put_((self._groups.gather(1, where.unsqueeze(1)).squeeze(1),), torch.where(collapsed, 1e-6, top))

    @torch.no_grad()
    def update(self, target: float) -> None:
        """Switch off exactly ``round(target · n)`` of the ``n`` entries of ``M``: those with the smallest ``m``
        (ties by position). An entry of that set still on gets ``m`` = 0, an entry outside it still off gets
        ``m`` = 1e-6 (its weights return with their kept values); the others keep their ``m``. Channel
        granularity then keeps one channel per group (:meth:`step`'s floor), which can leave a few more on."""
        k = round(target * self._flat.numel())
        order = torch.sort(self._flat, stable=True).indices
        off, on = order[:k], order[k:]
        self._flat[off] = self._flat[off].clamp_max(0.0)
        self._flat[on] = self._flat[on].clamp_min(1e-6)
        self._keep_a_channel()

    def _plain_sgd_lr(self) -> Optional[float]:
        """The learning rate of a plain SGD optimizer of ``M`` (no momentum, weight decay, Nesterov or maximize), else ``None``."""
        if type(self.optimizer) is not torch.optim.SGD:
            return None
        group = self.optimizer.param_groups[0]
        plain = not (group["momentum"] or group["weight_decay"] or group["nesterov"] or group["maximize"])
        return float(group["lr"]) if plain and not isinstance(group["lr"], torch.Tensor) else None

    def take_counts(self, raise_nonfinite: Optional[str] = None) -> dict[str, Any]:
        """Read (one host synchronisation) and reset what happened since the last call: ``revived`` and
        ``switched_off``, the entries of ``M`` switched on (off) now that were off (on) at the last call — net
        changes, counted here rather than per step; ``nonfinite`` (a step met a NaN/inf loss signal and was
        skipped), ``collapsed`` (a channel group was kept alive by the one-channel floor). With
        ``raise_nonfinite`` (where those steps were, e.g. a step range), a skipped step raises
        ``FloatingPointError`` instead."""
        on = self._hard_mask() > 0
        changed = on != self._reported
        revived = torch.count_nonzero(changed & on)
        counts = torch.stack([revived, torch.count_nonzero(changed) - revived, self._nonfinite.long(), self._collapsed.long()])
        values = counts.tolist()
        self._reported = on
        for flag in (self._nonfinite, self._collapsed):
            flag.zero_()
        if raise_nonfinite is not None and values[2]:
            raise FloatingPointError(
                f"AutoPrune auxiliary step {raise_nonfinite}: the loss gradient of the auxiliary parameters was NaN or "
                "infinite; M was not updated on those steps. Check the held-out batches, the loss and the learning rates."
            )
        return dict(zip(("revived", "switched_off", "nonfinite", "collapsed"), (values[0], values[1], bool(values[2]), bool(values[3]))))

    # ------------------------------------------------------------------ device and checkpoints
    def to(self, device: torch.device) -> None:
        """Move ``M`` and its index tensors to ``device`` (before :meth:`build_optimizer`)."""
        self._flat = self._flat.detach().to(device)
        self._views()
        if self._originals:
            self._refresh_masks()

    def state_dict(self) -> dict[str, Any]:
        """``M``, the values of the switched-off weights (one entry per shared parameter; none once detached: they
        are zeros then), ``M``'s optimizer state."""
        off, seen = {}, set()
        for target in self.targets if self.attached else ():
            weight = self.original(target)
            if id(weight) not in seen:
                seen.add(id(weight))
                off[target] = weight.detach()[self._gate_value(target) == 0].cpu().clone()
        optimizer = self.optimizer.state_dict() if self.optimizer is not None else self._pending_optimizer
        return {
            "granularity": self.granularity,
            "values": {key: value.detach().cpu().clone() for key, value in self.values.items()},
            "switched_off": off,
            "optimizer": optimizer,
        }

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load ``M`` and write the switched-off weights' values back into ``W`` (the model's own
        ``load_state_dict`` saw only ``W ⊙ h(M)``). The optimizer state is loaded now, or by
        :meth:`build_optimizer` when there is no optimizer yet."""
        granularity = state.get("granularity", self.granularity)
        mismatch = sorted(set(self.values) ^ set(state["values"]))
        if granularity != self.granularity or mismatch:
            raise ValueError(
                f"The checkpoint's auxiliary parameters (granularity {granularity!r}, {sorted(state['values'])}) do not "
                f"match this run's (granularity {self.granularity!r}, {sorted(self.values)}): resume with the "
                "`granularity`, `parameters` and `exclude` of the run that wrote the checkpoint."
            )
        for key, value in state["values"].items():
            if value.shape != self.values[key].shape:
                raise ValueError(
                    f"Auxiliary tensor {key!r} has shape {tuple(value.shape)} in the checkpoint, "
                    f"{tuple(self.values[key].shape)} here."
                )
            self.values[key].copy_(value)
        self._refresh_masks()
        self._reported = self._hard_mask() > 0  # counts after a resume start from the checkpoint's M
        for target, values in state["switched_off"].items():
            weight = self.original(tuple(target))
            weight[self._gate_value(tuple(target)) == 0] = values.to(weight.device, weight.dtype)
        if state.get("optimizer") is not None:
            if self.optimizer is not None:
                self.optimizer.load_state_dict(state["optimizer"])
            else:
                self._pending_optimizer = state["optimizer"]


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
