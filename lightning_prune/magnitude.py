r"""Magnitude pruning without a framework: what to prune and how (when, and which target when, is
:class:`~lightning_prune.schedules.PruningSchedule`'s: its ``target`` blends AGP's s_i into the final target).

Told a target :math:`s` (:meth:`MagnitudePruner.update`), :class:`MagnitudePruner`

- ``criterion="magnitude"``, ``scope="global"``: drops the :math:`\mathrm{round}(s N)` smallest
  :math:`|w|` over the :math:`N` pruned weights (one threshold; Han et al. 2015), each layer held to at
  most ``max_layer_sparsity`` (the per-layer floor);
- ``scope="layer"``: each layer :math:`l` loses its :math:`\mathrm{round}(s_l n_l)` smallest :math:`|w|`
  (Distiller's Level pruner);
- ``criterion="sensitivity"``: drops :math:`|w| < \lambda_l = s_l \sigma_l`, :math:`\sigma_l` the
  standard deviation of the dense layer, cached at the first event (Distiller's Sensitivity pruner);
- ``granularity="channel"``: drops whole channels of coupled groups, and whole attention heads, ranked by
  their L1/L2 norm relative to their group's mean (:class:`ChannelMagnitude`); with ``hidden=True`` also the
  residual-stream (hidden) width, its norms normalising over the kept channels while masked
  (:func:`~lightning_prune.structure.norm_masks`).

Targets are absolute (never compounded) and weights once dropped stay dropped. Each shared (tied)
parameter is counted once. Decisions run on the weights' device; under DDP the decision of rank 0 is
broadcast as a packed bit vector (one bit per weight, or per channel), so every rank holds the same
masks even if its weights drifted.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence, Union

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_prune.criteria import ChannelNorm, Criterion, Scope, count_to_prune, global_magnitude_masks, layer_magnitude_masks, lowest_k_masks
from lightning_prune.inputs import ExampleInput, model_input
from lightning_prune.masks import MaskSet
from lightning_prune.pruner import Target
from lightning_prune.structure import (
    ChannelGroup, ChannelPlan, StructureRecord, apply_plan, channel_masks, find_channel_groups, layer_channel_ratios, norm_masks,
    refused_channel_groups, zeroed_channel_plan,
)
from lightning_prune.structure.plans import _weight_dim
from lightning_prune.targets import prunable_types, stored_weight

Broadcast = Callable[[torch.Tensor], torch.Tensor]
"""Sends rank 0's uint8 tensor to every rank and returns it (identity without distribution)."""


def pack_bits(flags: torch.Tensor) -> torch.Tensor:
    """A bool vector as uint8 bytes, 8 flags a byte (on the flags' device)."""
    padded = torch.nn.functional.pad(flags.flatten().to(torch.uint8), (0, -flags.numel() % 8))
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=flags.device)
    return (padded.view(-1, 8) * weights).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """The first ``count`` flags of :func:`pack_bits`' bytes."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(1) >> shifts) & 1).flatten()[:count].bool()


def broadcast_flags(flags: Sequence[torch.Tensor], broadcast: Optional[Broadcast]) -> list[torch.Tensor]:
    """Every rank gets rank 0's bool tensors, sent as one packed byte vector (not pickled)."""
    if broadcast is None or not flags:
        return list(flags)
    flat = torch.cat([f.flatten() for f in flags])
    received = unpack_bits(broadcast(pack_bits(flat)), flat.numel())
    return [part.view_as(f) for part, f in zip(received.split([f.numel() for f in flags]), flags)]


def distributed_broadcast() -> Optional[Broadcast]:
    """Rank 0's bytes to every rank through the default process group (on its backend's device), or
    ``None`` outside ``torch.distributed``."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None

    def broadcast(packed: torch.Tensor) -> torch.Tensor:
        device = torch.device("cpu") if torch.distributed.get_backend() == "gloo" else packed.device
        buffer = packed.to(device)
        torch.distributed.broadcast(buffer, src=0)
        return buffer.to(packed.device)

    return broadcast


def unique_weights(model: nn.Module, layers: Sequence[str]) -> dict[str, str]:
    """``{weight name: layer}`` for the layers' weights, each shared (tied) parameter once (its first layer)."""
    seen: set[int] = set()
    names = {}
    for layer in layers:
        weight = stored_weight(model.get_submodule(layer))
        if id(weight) not in seen:
            seen.add(id(weight))
            names[f"{layer}.weight"] = layer
    return names


def max_zeros(numel: int, max_layer_sparsity: float) -> int:
    """Most zeros a layer of ``numel`` weights may hold: floor(cap · n), and one weight always stays when cap < 1."""
    if max_layer_sparsity >= 1.0:
        return numel
    return min(int(max_layer_sparsity * numel), numel - 1)


class ChannelMagnitude:
    """Channel decisions over coupled channel groups, in O(#channels) per event.

    A channel's importance is the L1/L2 norm of its output weights summed over its group's out-layers,
    divided by the group's mean (layers of different fan-in compete fairly; an attention head, a channel of
    ``head_dim`` rows in each of q, k and v, is scored by the sum of its rows' norms, so heads compete with
    channels through that ratio too; a hidden group's channel, by its rows of every out-layer, its embedding
    columns and its slices of loose parameters such as a class token or position embedding: all that writes it
    into the residual stream, so the hidden width competes through the same ratio). ``out_dims`` (weight name -> dimension of its output channels, 0
    where missing) knows a Hugging Face ``Conv1D``'s or a transposed conv's weight. Removing channels only
    slices dims 0 and 1 of a Conv/Linear weight, so a weight of shape ``(R, C, *k)`` with ``r`` rows and
    ``c`` columns removed holds ``R·C·K − (R − r)(C − c)·K`` zeros: the zeros of a plan follow from
    per-channel position counts, without building a mask. The global search drops channels from the
    lowest score up, updating that count per channel, until round(s·N) of the N pruned weights are zero.
    Every group keeps at least one channel, and at most ``max_layer_sparsity`` of its channels go.
    """

    def __init__(
        self, groups: Sequence[ChannelGroup], weights: Sequence[str], shapes: Mapping[str, torch.Size], norm: ChannelNorm, max_layer_sparsity: float,
        out_dims: Optional[Mapping[str, int]] = None,
    ) -> None:
        self.groups = list(groups)
        self.weights = list(weights)
        self.norm = norm
        self.max_layer_sparsity = max_layer_sparsity
        self.shapes = {name: (s[0], s[1], int(torch.Size(s[2:]).numel())) for name, s in shapes.items() if name in weights}
        # effects[g] = [(weight name, dim, positions per channel of g)] for the pruned weights the group slices
        self.effects: list[list[tuple[str, int, list[int]]]] = []
        for group in self.groups:
            effects = []
            for member in group.members:
                name = f"{member.module}.weight" if member.module else "weight"
                if member.kind in ("out", "in") and name in self.shapes:
                    counts = torch.bincount(member.channels, minlength=group.size).tolist()
                    out_dim = (out_dims or {}).get(name, 0)
                    effects.append((name, out_dim if member.kind == "out" else 1 - out_dim, counts))
            self.effects.append(effects)

    @classmethod
    def for_model(
        cls, model: nn.Module, example_input: ExampleInput, layers: Sequence[str], norm: ChannelNorm, max_layer_sparsity: float,
        hidden: bool = False,
    ) -> "ChannelMagnitude":
        """Find the coupled channel groups, attention heads included (and with ``hidden`` the residual-stream
        width), whose out-layers are all among ``layers`` (tracing the model on ``example_input``)."""
        unselected = [n for n, m in model.named_modules() if isinstance(m, prunable_types()) and n not in layers]
        groups = find_channel_groups(model, example_input, ignored_layers=unselected, heads=True, hidden=hidden)
        if hidden and not any(group.hidden for group in groups):
            refused = refused_channel_groups(model, example_input, ignored_layers=unselected, heads=True, hidden=True)
            raise ValueError(
                "`hidden`=True found no hidden (residual-stream) group among the selected layers; the groups left out: "
                + ("; ".join(f"{r.root} ({r.size} channels): {r.reason}" for r in refused) or "none")
            )
        if not groups:
            raise ValueError(
                f"`granularity`='channel' found no prunable channel group among the selected layers {list(layers)} "
                "(the output layer and layers coupled to it are never pruned)."
            )
        shapes = {name: p.shape for name, p in model.named_parameters()}
        out_dims = {f"{name}.weight": _weight_dim(model.get_submodule(name), "out") for name in layers}
        return cls(groups, list(unique_weights(model, layers)), shapes, norm, max_layer_sparsity, out_dims)

    @torch.no_grad()
    def scores(self, model: nn.Module) -> list[torch.Tensor]:
        """Per group, each channel's norm / the group's mean norm (one copy to the host for all groups)."""
        parameters = dict(model.named_parameters())
        device = next(iter(parameters.values())).device
        scores = []
        for group in self.groups:
            score = torch.zeros(group.size, device=device)
            for member in group.members:
                if member.kind not in ("out", "parameter"):
                    continue
                module = model.get_submodule(member.module)
                if member.kind == "out":
                    weight = module.weight.detach().movedim(_weight_dim(module, "out"), 0)  # a transposed conv's are dim 1
                else:  # a hidden group's loose parameter: its channels on the last dimension
                    weight = module.get_parameter(member.parameter).detach().movedim(-1, 0)
                rows = weight.reshape(weight.shape[0], -1)[member.positions.to(weight.device)].float()  # a 1-d parameter too
                values = rows.abs().sum(1) if self.norm == "l1" else rows.norm(dim=1)
                score.index_add_(0, member.channels.to(device), values.to(device))
            scores.append(score / score.mean().clamp_min(1e-12))
        return list(torch.cat(scores).cpu().split([g.size for g in self.groups]))

    def _cap(self, group: ChannelGroup) -> int:
        return min(group.size - 1, int(self.max_layer_sparsity * group.size))

    def decide(self, model: nn.Module, target: Union[float, Mapping[str, float]], plan: Optional[ChannelPlan] = None) -> list[torch.Tensor]:
        """Per group, a bool vector of the channels to drop for a global target sparsity (a float) or
        per-layer channel fractions (a mapping from a group's root layer). Channels an earlier ``plan``
        dropped stay dropped: their weights are zero on both sides, so no gradient revives them, and a plan
        that kept them would describe a wider model than the one computing (and physically removed)."""
        scores = self.scores(model)
        orders = [torch.sort(score, stable=True).indices.tolist() for score in scores]
        drop = [torch.zeros(g.size, dtype=torch.bool) for g in self.groups]
        if plan:
            for group, flags in zip(self.groups, drop):
                flags[:] = True
                flags[plan[group.index]] = False
        if isinstance(target, Mapping):
            for group, order, flags in zip(self.groups, orders, drop):
                flags[order[: min(count_to_prune(group.size, target.get(group.root, 0.0)), self._cap(group))]] = True
            return drop
        values = [score.tolist() for score in scores]  # host lists: the sweep below touches no tensor
        candidates = sorted(
            (values[g][c], g, rank, c) for g, order in enumerate(orders) for rank, c in enumerate(order[: self._cap(self.groups[g])])
        )
        wanted = count_to_prune(sum(R * C * K for R, C, K in self.shapes.values()), target)
        removed = {name: [0, 0] for name in self.shapes}
        earlier = {(g, c) for g, flags in enumerate(drop) for c in flags.nonzero().flatten().tolist()}
        zeros = 0
        for g, c in sorted(earlier) + [(g, c) for _, g, _, c in candidates if (g, c) not in earlier]:
            if zeros >= wanted and (g, c) not in earlier:
                break
            drop[g][c] = True
            for name, dim, counts in self.effects[g]:
                R, C, K = self.shapes[name]
                before = (R - removed[name][0]) * (C - removed[name][1]) * K
                removed[name][dim] += counts[c]
                zeros += before - (R - removed[name][0]) * (C - removed[name][1]) * K
        return drop

    def plan(self, drop: Sequence[torch.Tensor]) -> ChannelPlan:
        """The plan (kept channels per group) that drops ``drop``."""
        return {g.index: (~flags.cpu()).nonzero().flatten() for g, flags in zip(self.groups, drop)}


class MagnitudePruner:
    """Masks a model's Conv/Linear weights by magnitude (see the module docstring for the rules); a
    :class:`~lightning_prune.pruner.Pruner`.

    In a plain PyTorch loop: :meth:`update` with each target of the schedule (it decides new masks and writes
    zeros under them), :meth:`before_step` and :meth:`after_step` around each optimizer step
    (:func:`~lightning_prune.pruner.hook_optimizer`), so zeros stay zeros.

    Example::

        import torch
        from torch import nn
        from lightning_prune import MagnitudePruner, PruningSchedule, hook_optimizer

        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        schedule = PruningSchedule("iterative", start_epoch=10, end_epoch=30, frequency=10)  # steps 10, 20, 30
        pruner = MagnitudePruner(model, layers=["0", "2"], sparsity=0.9)
        pruner.prepare()
        handle = hook_optimizer(optimizer, pruner)  # masked gradients before each step, zeros re-written after
        for step in range(50):
            target = schedule.target(step, pruner.final)  # 0.3, 0.6, 0.9 at the events, else None
            if target is not None:
                pruner.update(target)  # new masks, the weights under them zeroed
                pruner.masks.apply_to_optimizer_state([optimizer])  # no momentum left there
            x = torch.randn(32, 16)
            loss = nn.functional.mse_loss(model(x), x[:, :4])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()  # 90% of the weights are zero after the last event, and stay zero
        handle.remove()
        pruner.finalize()  # the masks dropped: the zeros stay

    Args:
        model: the model whose parameters are masked.
        layers: names of the Conv/Linear modules to prune.
        sparsity: final target, one number or ``{layer: s}`` (``scope="layer"``; unnamed layers: 0).
        scope: ``"global"`` (one threshold) or ``"layer"`` (each layer to its own sparsity).
        criterion: ``"magnitude"`` (|w|) or ``"sensitivity"`` (drop |w| < s·σ of the dense layer).
        sensitivity: ``s`` of the sensitivity criterion: one number or ``{layer: s}``.
        max_layer_sparsity: the per-layer floor: no layer holds more than this fraction of zeros.
        channels: a :class:`ChannelMagnitude` for ``granularity="channel"``.

    After :meth:`remember` (lottery ticket: at init, or at epoch k) the surviving weights are put back to that
    snapshot after each :meth:`update`.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str],
        sparsity: Union[float, Mapping[str, float]],
        scope: Scope = "global",
        criterion: Criterion = "magnitude",
        sensitivity: Union[float, Mapping[str, float], None] = None,
        max_layer_sparsity: float = 0.99,
        channels: Optional[ChannelMagnitude] = None,
    ) -> None:
        self.model = model
        self.weights = unique_weights(model, layers)
        self.sparsity = sparsity
        self.scope = scope
        self.criterion = criterion
        self.sensitivity = sensitivity
        self.max_layer_sparsity = max_layer_sparsity
        self.channels = channels
        self.masks = MaskSet(model)
        self.sigmas: dict[str, float] = {}
        self.rewind_state: Optional[dict[str, torch.Tensor]] = None
        self.plan: ChannelPlan = {}
        self.norm_hooks: list[RemovableHandle] = []
        sizes = {name: model.get_parameter(name).numel() for name in self.weights}
        self.max_drop = {name: max_zeros(n, max_layer_sparsity) for name, n in sizes.items()}
        if criterion == "magnitude" and channels is None and scope == "global":
            wanted = count_to_prune(sum(sizes.values()), float(sparsity))  # type: ignore[arg-type]
            if wanted > sum(self.max_drop.values()):
                raise ValueError(
                    f"`sparsity`={sparsity} asks for {wanted:,} zeros but `max_layer_sparsity`={max_layer_sparsity} "
                    f"lets the layers hold at most {sum(self.max_drop.values()):,}; raise `max_layer_sparsity`."
                )

    @property
    def final(self) -> Target:
        """The final target: ``sparsity``, or ``sensitivity`` for ``criterion="sensitivity"`` (what a schedule's
        ``target`` blends toward)."""
        return (self.sensitivity or 0.0) if self.criterion == "sensitivity" else self.sparsity

    def _per_layer(self, target: Target) -> dict[str, float]:
        """``{weight name: the target of its layer}`` (0 for a layer a mapping does not name)."""
        if isinstance(target, Mapping):
            return {name: float(target.get(layer, 0.0)) for name, layer in self.weights.items()}
        return {name: float(target) for name in self.weights}

    def target_sparsity(self, target: Target) -> float:
        """Fraction of zeros among the pruned weights that ``target`` asks for (NaN for the sensitivity criterion)."""
        if self.criterion == "sensitivity":
            return float("nan")
        sizes = {name: self.model.get_parameter(name).numel() for name in self.weights}
        targets = self._per_layer(target)
        return sum(targets[name] * n for name, n in sizes.items()) / sum(sizes.values())

    @torch.no_grad()
    def decide(self, target: Target) -> dict[str, torch.Tensor]:
        """Keep-masks for ``target`` (a sparsity, or the sensitivity ``s`` of that criterion), on the weights' devices."""
        weights = {name: self.model.get_parameter(name) for name in self.weights}
        previous = {name: mask for name, mask in self.masks.masks.items() if name in weights}
        if self.criterion == "sensitivity":
            if not self.sigmas:
                stds = torch.stack([w.detach().float().std() for w in weights.values()]).cpu().tolist()
                self.sigmas = dict(zip(weights, stds))
            s = self._per_layer(target)
            masks = {}
            for name, w in weights.items():
                keep = w.detach().abs() >= s[name] * self.sigmas[name]
                if name in previous:
                    keep &= previous[name]
                if int((~keep).sum()) > self.max_drop[name]:
                    keep = lowest_k_masks({name: w}, self.max_drop[name], previous)[name]
                masks[name] = keep
            return masks
        if self.scope == "global":
            return global_magnitude_masks(weights, float(target), previous, self.max_drop)  # type: ignore[arg-type]
        return layer_magnitude_masks(weights, self._per_layer(target), previous)

    def prepare(self) -> None:
        """Nothing to insert: the masks start empty, and :meth:`update` fills them."""

    def before_step(self) -> None:
        """Zero the masked weights' gradients (one fused multiply): no optimizer state builds up there."""
        self.masks.apply_to_grads()

    def after_step(self) -> None:
        """Re-write the masked weights' zeros (one fused multiply), undoing momentum and weight decay."""
        self.masks.apply_to_weights()

    @torch.no_grad()
    def update(self, target: Target, broadcast: Optional[Broadcast] = None) -> None:
        """One pruning event to ``target`` (the whole final target, or a schedule's step toward it): decide, take
        rank 0's decision (``broadcast``), mask, and rewind to the :meth:`remember` snapshot if there is one."""
        if self.channels is not None:
            channel_target = {self.weights[name]: value for name, value in self._per_layer(target).items()} if self.scope == "layer" else target
            drop = broadcast_flags(self.channels.decide(self.model, channel_target, self.plan), broadcast)
            self.plan = self.channels.plan(drop)
            masks = {name: mask != 0 for name, mask in channel_masks(self.model, self.channels.groups, self.plan).items()}
            self.hook_norms()
        else:
            decided = self.decide(target)
            masks = dict(zip(decided, broadcast_flags(list(decided.values()), broadcast)))
        self.masks.update(masks)
        if self.rewind_state is not None:
            for name, parameter in self.model.named_parameters():
                parameter.copy_(self.rewind_state[name])
            self.masks.write_zeros()

    def finalize(self, example_input: Optional[ExampleInput] = None) -> Optional[StructureRecord]:
        """Drop the masks (the zeros stay). With ``example_input`` (``granularity="channel"``), first remove the
        zeroed channels physically and return the record that reshapes a fresh model."""
        record = None
        self.unhook_norms()
        if example_input is not None:
            if self.channels is None:
                raise ValueError("`example_input` removes channels physically: it needs `channels` (granularity='channel').")
            example = model_input(example_input).to(next(self.model.parameters()).device)
            record = apply_plan(self.model, self.channels.groups, zeroed_channel_plan(self.model, self.channels.groups), example)
        self.masks = MaskSet(self.model)
        return record

    def hook_norms(self) -> None:
        """Make the hidden groups' norms normalise over the channels the current plan keeps
        (:func:`~lightning_prune.structure.norm_masks`, replacing the hooks of an earlier plan), so the masked model
        computes what the physically pruned one computes. Nothing without a hidden group or a plan."""
        self.unhook_norms()
        if self.channels is not None and self.plan and any(group.hidden for group in self.channels.groups):
            self.norm_hooks = norm_masks(self.model, self.channels.groups, self.plan)

    def unhook_norms(self) -> None:
        """Remove the norm hooks of :meth:`hook_norms` (before removal, on an exception, at teardown)."""
        for handle in self.norm_hooks:
            handle.remove()
        self.norm_hooks = []

    def remember(self) -> None:
        """Snapshot every parameter (on the host) for rewinding (lottery ticket: at init, or at epoch k)."""
        self.rewind_state = {name: p.detach().cpu().clone() for name, p in self.model.named_parameters()}

    def channel_ratios(self) -> dict[str, float]:
        """Kept / original channels per layer under the current plan (the channel-ratio vector)."""
        return layer_channel_ratios(self.channels.groups, self.plan) if self.channels is not None else {}

    def emptied_layers(self) -> list[str]:
        """Layers whose weights are all masked."""
        return [self.weights[name] for name, mask in self.masks.masks.items() if name in self.weights and not bool(mask.any())]

    def state_dict(self) -> dict[str, object]:
        return {
            "masks": self.masks.state_dict(),
            "sigmas": dict(self.sigmas),
            "rewind_state": self.rewind_state,
            "plan": dict(self.plan),
        }

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        self.sigmas = dict(state["sigmas"])  # type: ignore[arg-type]
        self.rewind_state = state["rewind_state"]  # type: ignore[assignment]
        self.plan = dict(state["plan"])  # type: ignore[arg-type]
        self.masks.load_state_dict(dict(state["masks"]))  # type: ignore[arg-type]
        self.hook_norms()
