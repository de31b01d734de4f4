r"""The gate search of Pruning from Scratch (Wang et al., AAAI 2020), framework-free.

On a network whose weights ``W`` stay at their random initialisation, one gate λ ∈ [0, 1] per
prunable channel (:class:`~lightning_prune.gates.ChannelGates`, initialised to 1) learns, with Adam,
the objective

.. math:: L(Λ) = \ell\big(f(x; W, Λ)\big) + γ\,\big(\lVert Λ\rVert_1 / C - r\big)^2 + l_1 \lVert Λ\rVert_1

where ``ℓ`` is the task loss of the batch (any loss: the caller computes it with the gates inserted,
e.g. through the user's ``training_step``), ``C`` the number of gated channels, ``r = gate_ratio``
(authors' code: γ = 0.5, r = 0.2 on CIFAR; the plain L1 term is an option, default 0). After every
step the gates are clamped to [0, 1]. The network runs in training mode with every weight frozen
(BatchNorm batch statistics, as in the authors' code); :meth:`GateSearch.finalize` restores every
buffer and mode afterwards.

**Selection** (the authors' rule): at each validation the caller reports the monitored value; the
snapshot is kept when the gates are sparse enough (fraction of non-zero gates ``<= r``) and the value
is better than the best so far (``mode``: ``"min"`` or ``"max"``); with no kept snapshot, the last gates.

**Threshold**: :meth:`GateSearch.search` ranks channels and attention heads by their selected gate (ties by the
gate's mean over the phase, :func:`~lightning_prune.gates.gate_scores`) and binary-searches one global
threshold for the largest structure within a FLOPs budget (:func:`~lightning_prune.channel_search.search_threshold`;
with ``round_to``, each group's count a multiple of it); the budget a whole head leaves at the threshold's last step
goes to the next-ranked units that fit (its ``fill``).

**Around it** (:class:`GatePruning`): the gated groups, the target's refusal, the removal and the re-initialisation.

A step makes no host synchronisation: the penalty's gradient is added to the gates' (:meth:`GateSearch.before_step`,
Torch-Pruning's ``regularize()`` pattern, after the task loss's backward), and the running sums and the step of a first
non-finite loss live on the device, read once by :meth:`GateSearch.check_finite`. All gates are one flat parameter, so
Adam and the clamp touch one tensor (and DDP reduces its gradient in one bucket). :class:`GateSearch` is a
:class:`~lightning_prune.pruner.Pruner`: ``GatePruningFromScratch`` hooks its ``before_step`` and ``after_step`` on the
gate optimizer inside Lightning's fit loop (:func:`~lightning_prune.pruner.hook_optimizer`).
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_prune.channel_search import ThresholdSearch, search_threshold
from lightning_prune.flops import FlopCount, FlopsPredictor
from lightning_prune.gates import (
    ChannelGates,
    FrozenNetwork,
    GatePhaseResult,
    GatePosition,
    GateSites,
    NonFiniteGateLoss,
    gate_scores,
    gate_sites,
    gated_groups,
)
from lightning_prune.inputs import model_input
from lightning_prune.structure import ChannelGroup, ChannelPlan, ExampleInput, apply_plan, find_channel_groups
from lightning_prune.structure.plans import kept_counts

Mode = Literal["min", "max"]
"""Whether a lower or a higher monitored value is better."""
Select = Literal["best_val", "last"]
"""Which gates decide the structure: the best validated snapshot, or the last gates."""
Init = Literal["random", "inherit"]
"""Weights of the pruned network: the whole network freshly initialised (the authors'), or the surviving
random weights kept."""
Reduce = Callable[[torch.Tensor, str], torch.Tensor]
"""``reduce(tensor, op)`` with ``op`` ``"mean"`` or ``"sum"`` over processes."""


def snapshot_is_better(value: float, nonzero_fraction: float, best: Optional[float], gate_ratio: float, mode: Mode = "min") -> bool:
    """The authors' snapshot rule: sparse enough (non-zero gates ``<= gate_ratio``) and a monitored value
    better than the best so far (lower for ``mode="min"``, higher for ``"max"``)."""
    if nonzero_fraction > gate_ratio:
        return False
    return best is None or (value < best if mode == "min" else value > best)


class GateSearch:
    """The gate phase as an object (a :class:`~lightning_prune.pruner.Pruner`): between :meth:`prepare` and
    :meth:`finalize` (or inside ``with search.prepare():``) the caller runs its own backward and ``optimizer.step()`` on
    :attr:`optimizer` with :meth:`before_step` and :meth:`after_step` hooked on it
    (:func:`~lightning_prune.pruner.hook_optimizer`), reports validation values (:meth:`validated`), then asks for
    the structure (:meth:`search`; :class:`GatePruning` adds the target checks, the removal and the
    re-initialisation). See the module docstring for the objective, the selection rule and the threshold search.

    Example::

        import torch
        from torch import nn
        from lightning_prune import FlopsPredictor, GateSearch, apply_plan, find_channel_groups, hook_optimizer

        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
        )
        x = torch.zeros(1, 3, 16, 16)
        groups = find_channel_groups(model, x)
        search = GateSearch(model, groups, lr=0.2)
        search.prepare()  # weights frozen, one gate per channel inserted
        handle = hook_optimizer(search.optimizer, search)  # the penalty's gradient before each Adam step, the clamp after
        for step in range(20):
            images, labels = torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))
            search.optimizer.zero_grad()
            nn.functional.cross_entropy(model(images), labels).backward()
            search.optimizer.step()
        handle.remove()
        result = search.finalize()  # gates out, every flag and buffer restored: the last gates
        found = search.search(FlopsPredictor(model, x, groups), flops_ratio=0.5)  # the last gates' plan
        apply_plan(model, groups, found.plan, x)  # channels removed: at most 50% of the dense FLOPs

    Args:
        model: the randomly initialised network (its channel ``groups`` found on it).
        groups: :func:`~lightning_prune.structure.find_channel_groups` of ``model``.
        position: where the gates multiply (``"bn"``, ``"conv"``, ``"bn_weight"``; see ``gates``).
        gated: the groups that get gates (:func:`~lightning_prune.gates.gated_groups`; default: all of
            ``groups``); the others keep every channel.
        lr: Adam learning rate of the gates.
        gamma: ``γ``, the weight of the ratio term of the objective.
        gate_ratio: ``r``, the target mean gate ‖Λ‖₁/C (and the snapshot rule's bound on non-zero gates).
        l1: ``l_1``, the weight of the plain L1 term (0: off).
        mode: whether a lower (``"min"``) or higher (``"max"``) monitored value is better.
        reduce: cross-process reduction (identity when ``None``) of the validation's sparsity and the non-finite
            check (the gate gradient is the DDP-wrapped model's to reduce).
    """

    def __init__(
        self,
        model: nn.Module,
        groups: Sequence[ChannelGroup],
        *,
        position: GatePosition = "bn",
        gated: Optional[Sequence[ChannelGroup]] = None,
        lr: float = 0.01,
        gamma: float = 0.5,
        gate_ratio: float = 0.2,
        l1: float = 0.0,
        mode: Mode = "min",
        reduce: Optional[Reduce] = None,
    ) -> None:
        self.model = model
        self.groups = list(groups)
        self.gates = ChannelGates.for_groups(model, self.groups if gated is None else gated, position)
        self.gamma, self.gate_ratio, self.l1, self.mode = gamma, gate_ratio, l1, mode
        self.reduce: Reduce = reduce or (lambda tensor, op: tensor)
        self.optimizer = torch.optim.Adam(self.gates.parameters(), lr=lr, foreach=True)
        device = self.gates.device
        self._sum = torch.zeros_like(self.gates.parameter.detach())  # Σ_steps Λ: the tie-break averages
        self._step = torch.zeros((), dtype=torch.long, device=device)
        self._first_bad = torch.full((), -1, dtype=torch.long, device=device)  # the step of a first non-finite loss
        self.steps = 0
        self.best: Optional[float] = None
        self.chosen: Optional[GatePhaseResult] = None
        self.last_metric: Optional[float] = None
        self._inserted: Optional[ExitStack] = None

    # ------------------------------------------------------------------ learning
    def prepare(self) -> ExitStack:
        """Weights frozen, training mode, gates inserted (until :meth:`finalize`). The returned context undoes it on
        leaving, also on error: ``with search.prepare():``."""
        with ExitStack() as stack:
            stack.callback(FrozenNetwork(self.model).restore)
            stack.enter_context(self.gates.inserted())
            self._inserted = stack.pop_all()
        return self._inserted

    def finalize(self) -> GatePhaseResult:
        """The gates removed and every parameter flag, module mode and buffer restored; returns :meth:`result`."""
        if self._inserted is not None:
            self._inserted.close()
            self._inserted = None
        return self.result()

    def update(self, target: float) -> None:
        """Steer the gates toward the mean gate ``target`` from now on: the ``r`` of the ratio term (and of the snapshot
        rule's sparsity bound), in (0, 1]."""
        if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 < target <= 1.0:
            raise ValueError(f"`target` (the mean gate r) must be a number in (0, 1], got {target!r}.")
        self.gate_ratio = float(target)

    def to(self, device: torch.device) -> "GateSearch":
        """Move the search's own tensors (running sums, step counters) to ``device``, where the gates went
        with the model."""
        for name in ("_sum", "_step", "_first_bad"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def objective(self, task_loss: torch.Tensor) -> torch.Tensor:
        r"""``task_loss + γ(‖Λ‖₁/C − r)² + l1‖Λ‖₁`` (module docstring), differentiable."""
        return task_loss.float() + self.penalty(self.gates.parameter)

    def penalty(self, gates: torch.Tensor) -> torch.Tensor:
        r"""``γ(‖Λ‖₁/C − r)² + l1‖Λ‖₁`` of ``gates`` (the flat parameter, or a detached copy)."""
        value = self.gamma * (gates.abs().mean() - self.gate_ratio) ** 2
        return value + self.l1 * gates.abs().sum() if self.l1 else value

    @torch.no_grad()
    def before_step(self) -> None:
        r"""Add the penalty's gradient to the gates' gradient (after the task loss's backward, before the
        optimizer step; Torch-Pruning's ``regularize()`` pattern): ``sign(Λ)·(2γ(‖Λ‖₁/C − r)/C + l1)``."""
        parameter = self.gates.parameter
        mean = parameter.abs().mean()
        gradient = parameter.sign() * (2 * self.gamma * (mean - self.gate_ratio) / parameter.numel() + self.l1)
        if parameter.grad is None:
            parameter.grad = gradient
        else:
            parameter.grad.add_(gradient)

    @torch.no_grad()
    def after_step(self) -> None:
        """After each optimizer step: clamp the gates to [0, 1] and count the step into the running sum (the
        tie-break averages)."""
        self.gates.parameter.clamp_(0.0, 1.0)
        self._sum.add_(self.gates.parameter)
        self._step.add_(1)
        self.steps += 1

    @torch.no_grad()
    def flag_nonfinite(self, values: torch.Tensor) -> None:
        """Remember the step of a first non-finite value in ``values`` (e.g. each step's loss; on the device, raised by
        :meth:`check_finite`)."""
        self._first_bad = torch.where(~torch.isfinite(values).all() & (self._first_bad < 0), self._step, self._first_bad)

    def check_finite(self) -> None:
        """Raise :class:`NonFiniteGateLoss` if a value flagged since the start was NaN or infinite (one host read)."""
        bad = torch.stack([(self._first_bad >= 0).float(), self._first_bad.clamp(min=0).float()])
        processes, steps = self.reduce(bad, "sum").tolist()  # processes that saw one, and the sum of their steps
        if processes:
            raise NonFiniteGateLoss(
                f"Gate phase of Pruning from Scratch: the gate loss became NaN or infinite (first at gate step "
                f"{int(steps / processes)}); the gates were removed and the model left as it was. Check the inputs, the loss "
                "and the model's initialisation, or lower `gate_lr`."
            )

    # ------------------------------------------------------------------ selection
    def validated(self, value: float) -> bool:
        """Report the monitored validation value of the current gates (identical on every process);
        returns whether this snapshot became the selected one (:func:`snapshot_is_better`)."""
        self.last_metric = value
        nonzero = float(self.reduce(self.gates.nonzero_fraction(), "mean"))
        if not snapshot_is_better(value, nonzero, self.best, self.gate_ratio, self.mode):
            return False
        self.best, self.chosen = value, self._snapshot("best_val", value)
        return True

    def _snapshot(self, selected: str, metric: Optional[float]) -> GatePhaseResult:
        averages = (self._sum / max(self.steps, 1)).cpu()
        split = {g: averages[o : o + self.gates.sizes[g]].clone() for g, o in self.gates.offsets.items()}
        return GatePhaseResult(self.gates.values(), split, selected, self.steps, metric, self.steps)

    def result(self) -> GatePhaseResult:
        """The selected snapshot, or the last gates when none was kept."""
        chosen = self.chosen if self.chosen is not None else self._snapshot("last", self.last_metric)
        chosen.steps = self.steps
        return chosen

    def search(
        self,
        predictor: FlopsPredictor,
        flops_ratio: float,
        scores: Optional[list[torch.Tensor]] = None,
        round_to: Optional[int] = None,
    ) -> ThresholdSearch:
        """The largest structure of the selected gates within ``flops_ratio`` × ``predictor.dense`` FLOPs,
        each group's count a multiple of ``round_to`` or the whole group (``scores``:
        :func:`~lightning_prune.gates.gate_scores` of :meth:`result`, e.g. broadcast from rank 0)."""
        scores = scores if scores is not None else gate_scores(self.result(), self.groups)
        return search_threshold(scores, flops_ratio, predictor, round_to=round_to, fill=True)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        chosen = self.chosen
        return {
            "gates": self.gates.parameter.detach().cpu().clone(),
            "sum": self._sum.cpu().clone(),
            "steps": self.steps,
            "optimizer": self.optimizer.state_dict(),
            "best": self.best,
            "last_metric": self.last_metric,
            "chosen": None if chosen is None else vars(chosen).copy(),
            "first_bad": int(self._first_bad),
            "gate_ratio": self.gate_ratio,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.gates.parameter.copy_(state["gates"])
            self._sum.copy_(state["sum"])
        self.steps = state["steps"]
        self._step.fill_(self.steps)
        self._first_bad.fill_(state.get("first_bad", -1))
        self.optimizer.load_state_dict(state["optimizer"])
        self.best, self.last_metric = state["best"], state["last_metric"]
        self.gate_ratio = state.get("gate_ratio", self.gate_ratio)
        self.chosen = None if state["chosen"] is None else GatePhaseResult(**state["chosen"])


def check_target(
    model: nn.Module,
    groups: Sequence[ChannelGroup],
    gated: Sequence[ChannelGroup],
    position: GatePosition,
    predictor: FlopsPredictor,
    dense_flops: int,
    flops_ratio: float,
    round_to: Optional[int] = None,
) -> Optional[str]:
    """Refuse, before any weight changes, a model with no channel to gate at ``position`` among the ``gated``
    groups, and a FLOPs target below the smallest structure (every gated group at one channel, or
    ``round_to``; the other groups whole; ``dense_flops`` of the unexpanded model). Returns a warning when
    ``position="conv"`` gates layers whose BatchNorm normalises the gate away, else ``None``."""
    if not gate_sites(model, gated, position):
        raise ValueError(
            f"The model has no prunable channel to gate at `gate_position`={position!r}"
            + (" (no BatchNorm in a gated channel group; try 'conv')" if position != "conv" else "")
            + f" among the {len(gated)} gated of {len(groups)} channel groups (`gate_sites`: 'inner' leaves out the"
            " groups of residual connections and linear bottlenecks, 'all' gates every group)."
        )
    indices = {group.index for group in gated}
    fixed = torch.tensor([0 if group.index in indices else group.size for group in groups])
    sizes = torch.tensor([group.size for group in groups])
    smallest = predictor.predict_counts(kept_counts(fixed, sizes, 1, round_to).numpy()) / dense_flops
    if smallest > flops_ratio:
        raise ValueError(
            f"`flops_ratio`={flops_ratio} is unreachable: the smallest structure of the gated network (one channel "
            f"per gated group, `round_to`={round_to}, the other groups whole) has {smallest:.4f} of the dense FLOPs."
        )
    if position != "conv":
        return None
    normalised = [
        group.root
        for group in gated
        if any(isinstance(model.get_submodule(m.module), _BatchNorm) for m in group.members if m.kind == "channel")
    ]
    if not normalised:
        return None
    return (
        f"`gate_position='conv'`: {len(normalised)} gated layers feed a BatchNorm, which normalises their gate "
        "away; those gates learn from the ratio term only. 'bn' is the authors' position."
    )


@torch.no_grad()
def reinitialise(model: nn.Module) -> None:
    """A fresh initialisation of the whole network, as the authors' ``train_pruned.py`` builds the pruned
    configuration anew: every submodule with a ``reset_parameters`` (Conv, Linear, BatchNorm with its running
    statistics, ...) gets PyTorch's default initialisation, pruned or not; parameters of modules without
    one keep their values."""
    for module in model.modules():
        if module is not model and callable(getattr(module, "reset_parameters", None)):
            module.reset_parameters()


@dataclass
class GatePruned:
    """The structure :meth:`GatePruning.prune` chose: the plan, the selected gates, the lowest kept gate
    (``threshold``) and the FLOPs of the pruned model / the dense (unexpanded) model's."""

    plan: ChannelPlan
    gates: dict[int, torch.Tensor]
    threshold: float
    flops_ratio: float


class GatePruning:
    """Pruning from Scratch's decisions around the gate phase, without a Trainer.

    Built on the model the gates learn on (widened already when there is an expansion): its channel groups,
    the groups that get gates (``sites``, :func:`~lightning_prune.gates.gated_groups`) and the FLOPs
    predictor; an unreachable target or a model without a channel to gate is refused here, before any
    weight changes (:func:`check_target`; its warning in :attr:`warning`). :meth:`search` builds the
    :class:`GateSearch`; :meth:`prune` turns the selected gates into the pruned network.

    Example::

        import torch
        from torch import nn
        from lightning_prune import GatePruning, count_flops, hook_optimizer

        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
        )
        x = torch.zeros(1, 3, 16, 16)
        dense = count_flops(model, x)
        pruning = GatePruning(model, x, dense, flops_ratio=0.5)  # an unreachable target is refused here
        search = pruning.search(lr=0.2, gate_ratio=0.3, l1=0.002)
        val_images, val_labels = torch.randn(64, 3, 16, 16), torch.randint(0, 10, (64,))
        handle = hook_optimizer(search.optimizer, search)  # the penalty's gradient before each Adam step, the clamp after
        with search.prepare():  # weights frozen, gates inserted
            for step in range(30):
                images, labels = torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))
                search.optimizer.zero_grad()
                loss = nn.functional.cross_entropy(model(images), labels)
                loss.backward()
                search.optimizer.step()
                search.flag_nonfinite(loss.detach())  # on the device: no host read
                if step % 10 == 9:  # validation: the snapshot rule keeps the best sparse-enough gates
                    with torch.no_grad():
                        search.validated(nn.functional.cross_entropy(model(val_images), val_labels).item())
                    search.check_finite()  # a NaN or infinite loss so far raises NonFiniteGateLoss (one host read)
        handle.remove()
        pruned = pruning.prune(search.result())  # removed and re-initialised: at most 50% of the dense FLOPs
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # train the pruned model as any other

    Args:
        model: the randomly initialised network (widened by any expansion).
        example_input: one sample of its input.
        dense: :func:`~lightning_prune.flops.count_flops` of the dense, unexpanded model: the FLOPs target is
            ``flops_ratio`` × ``dense.total``.
        expanded: whether ``model`` is wider than the model ``dense`` counted (else its count is reused).
        flops_ratio: FLOPs of the pruned model / FLOPs of the dense (unexpanded) model, in (0, 1].
        position: where the gates multiply (``"bn"``, ``"conv"``, ``"bn_weight"``; ``GatePruningFromScratch``'s ``gate_position``);
            ``"bn"`` on a model where no gated group has a BatchNorm gates the layer outputs (``"conv"``), with
            :attr:`warning` saying so. Attention heads (``find_channel_groups(..., heads=True)``) get one gate per
            head at every position, on the heads' context before the output projection
            (:func:`~lightning_prune.gates.gate_sites`), ranked with the channel gates by the one threshold.
        sites: which channel groups get gates (``"all"`` or ``"inner"``; ``GatePruningFromScratch``'s ``gate_sites``).
        round_to: keep each group's channel count a multiple of this, or the whole group (``None``: any count).
    """

    def __init__(
        self,
        model: nn.Module,
        example_input: ExampleInput,
        dense: FlopCount,
        *,
        expanded: bool = False,
        flops_ratio: float = 0.5,
        position: GatePosition = "bn",
        sites: GateSites = "all",
        round_to: Optional[int] = None,
    ) -> None:
        self.model, self.example_input, self.dense_flops = model, example_input, dense.total
        self.groups = find_channel_groups(model, example_input, heads=True)
        self.gated = gated_groups(model, self.groups, example_input, sites)
        channels = [group for group in self.gated if group.heads is None]  # heads are gated per head at any position
        fallback = position == "bn" and not gate_sites(model, channels, "bn") and bool(gate_sites(model, channels, "conv"))
        position = "conv" if fallback else position  # no BatchNorm to gate after (a transformer, an MLP): the layer outputs
        self.flops_ratio, self.position, self.round_to = flops_ratio, position, round_to
        self.predictor = FlopsPredictor(model, example_input, self.groups, None if expanded else dense)
        self.warning = check_target(model, self.groups, self.gated, position, self.predictor, self.dense_flops, flops_ratio, round_to)
        if fallback:
            self.warning = (
                "`gate_position='bn'`: no gated channel group has a BatchNorm (a transformer or an MLP), so the gates multiply "
                "the Conv/Linear layers' outputs, as `gate_position='conv'` does."
            )

    def search(self, **options: Any) -> GateSearch:
        """The :class:`GateSearch` of the gated groups (``options``: its ``lr``, ``gamma``, ``gate_ratio``,
        ``l1``, ``mode``, ``reduce``)."""
        return GateSearch(self.model, self.groups, position=self.position, gated=self.gated, **options)

    def prune(
        self, result: GatePhaseResult, scores: Optional[list[torch.Tensor]] = None, init: Init = "random", seed: Optional[int] = None
    ) -> GatePruned:
        """The largest structure of the selected gates within ``flops_ratio`` × the dense FLOPs (one global
        threshold, :func:`~lightning_prune.channel_search.search_threshold`, counts rounded to ``round_to``),
        removed physically, then initialised (``init="random"``: :func:`reinitialise`, from the global random
        state, or from ``seed`` without touching it). ``scores``: :func:`~lightning_prune.gates.gate_scores` of
        ``result`` (e.g. broadcast from rank 0)."""
        scores = scores if scores is not None else gate_scores(result, self.groups)
        target = min(1.0, self.flops_ratio * self.dense_flops / self.predictor.dense)
        found = search_threshold(scores, target, self.predictor, round_to=self.round_to, fill=True)
        parameter = next(self.model.parameters())
        device = parameter.device
        apply_plan(self.model, self.groups, found.plan, model_input(self.example_input).like(parameter))
        if init == "random" and seed is None:
            reinitialise(self.model)
        elif init == "random":
            cuda = [torch.cuda.current_device() if device.index is None else device.index] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda):
                torch.manual_seed(seed)
                reinitialise(self.model)
        threshold = float(torch.cat([result.gates[g][found.plan[g].cpu()] for g in result.gates]).min())
        plan = {index: keep.cpu() for index, keep in found.plan.items()}
        return GatePruned(plan, result.gates, threshold, found.flops / self.dense_flops)
