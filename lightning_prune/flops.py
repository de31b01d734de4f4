"""FLOPs: fvcore counts and the exact FLOPs of a channel plan without re-tracing (the decisions that use them,
such as the FLOPs-constrained threshold search, live in :mod:`lightning_prune.channel_search`).

Unit: fvcore's, where one multiply-add is one FLOP (what papers call MACs; torch's
``FlopCounterMode`` counts two). fvcore counts convolutions, matrix products, normalisation
(BatchNorm in eval mode: 2 per element), adaptive average pooling and upsampling, and here also
``scaled_dot_product_attention`` (its two matrix products, see :func:`sdpa_flop_jit`); elementwise adds,
activations, softmax, max pooling and concatenation count 0. It counts from weight shapes: zeroed channels
still count in full, only a physically smaller model (or :class:`FlopsPredictor`) shows the saving.
Removing attention heads shrinks the q/k/v and output projections and the attention products alike; the
predictor treats a head group as any channel group (its attention products scale with the kept heads). A
grouped conv keeps its ``groups``: its FLOPs scale with one conv group's input width times its output width.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Optional, Sequence

import numpy as np
import torch
from fvcore.nn import FlopCountAnalysis
from fvcore.nn.jit_handles import get_shape
from torch import nn
from torch.nn.modules.conv import _ConvNd

from lightning_prune.checks import check_example_input, check_module
from lightning_prune.inputs import ExampleInput, ModelInput, model_input, output_tensors
from lightning_prune.modes import eval_mode
from lightning_prune.structure import (
    ChannelGroup,
    ChannelPlan,
    GroupMember,
    apply_plan,
)
from lightning_prune.structure.attention import sync_head_counts
from lightning_prune.structure.groups import _is_depthwise
from lightning_prune.structure.removal import removed_positions, slice_members
from lightning_prune.targets import linear_features, linear_types

log = logging.getLogger(__name__)
_reported_operators: set[str] = set()


@dataclass(frozen=True)
class FlopCount:
    """fvcore's count (one multiply-add = one FLOP).

    Attributes:
        total: FLOPs of one forward pass on the example input.
        by_module: module name -> FLOPs inside it (``""`` is the whole model).
        unsupported: operator -> number of calls fvcore had no formula for (counted as 0).
        ops: ``(scope, FLOPs)`` of every counted operator call, in graph order (the scope is the innermost
            module's name, ``""`` for the model's own forward).
    """

    total: int
    by_module: dict[str, int]
    unsupported: dict[str, int]
    ops: tuple[tuple[str, Fraction], ...] = ()


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP/DataParallel wrapper or a ``torch.compile`` result."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def _is_rank_zero() -> bool:
    distributed = torch.distributed
    return not (distributed.is_available() and distributed.is_initialized()) or distributed.get_rank() == 0


def _report_unsupported(unsupported: dict[str, int]) -> None:
    """Log operators fvcore does not count, each once per process (on rank 0)."""
    new = sorted(set(unsupported) - _reported_operators)
    _reported_operators.update(new)
    if new and _is_rank_zero():
        listed = ", ".join(f"{op} ({unsupported[op]} calls)" for op in new)
        log.warning("fvcore has no FLOP formula for %s; they count as 0 FLOPs.", listed)


def sdpa_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """fvcore handle for ``aten::scaled_dot_product_attention``: ``q @ k^T`` and ``attn @ v`` cost
    ``batch * L * S * (E + E_v)`` multiply-adds for query ``(..., L, E)``, key ``(..., S, E)`` and value
    ``(..., S, E_v)``; the softmax and scaling count 0, as fvcore counts no elementwise op."""
    query, key, value = (get_shape(value) for value in inputs[:3])
    batch = math.prod(query[:-2])
    return batch * query[-2] * key[-2] * (query[-1] + value[-1])


class _TensorsInOut(nn.Module):
    """``model`` called with ``inputs``, taking their tensors positionally and returning its output's tensors
    as a tuple: fvcore traces ``module(*tensors)`` into a tuple of tensors, a model may take keyword arguments
    and return a ``ModelOutput`` or a cache. Other values of ``inputs`` (flags, ``None``) are passed as given.
    Its submodule names are ``model``'s prefixed with ``model.`` (:func:`_inner_name` strips that)."""

    def __init__(self, model: nn.Module, inputs: ModelInput) -> None:
        super().__init__()
        self.model, self.inputs = model, inputs

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        given = iter(tensors)
        return tuple(output_tensors(self.inputs.map_tensors(lambda _: next(given)).call(self.model)))


def _inner_name(name: str) -> Optional[str]:
    """A :class:`_TensorsInOut` submodule's name in the wrapped model (``None`` for the wrapper itself)."""
    return name[len("model.") :] if name.startswith("model.") else "" if name == "model" else None


def _trace(model: nn.Module, example_input: ExampleInput) -> FlopCount:
    """fvcore's count, with the ``(scope, FLOPs)`` of every counted call in graph order."""
    module = _unwrap(model)
    inputs = model_input(example_input)
    ops: list[tuple[str, Fraction]] = []
    with eval_mode(module), torch.no_grad():
        analysis = (
            FlopCountAnalysis(_TensorsInOut(module, inputs), tuple(inputs.tensors()))
            .unsupported_ops_warnings(False)
            .uncalled_modules_warnings(False)
            .tracer_warnings("none")
            .set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_jit)
        )
        for name, handle in list(analysis._op_handles.items()):
            if handle is not None:
                analysis.set_op_handle(name, _recording(handle, ops))
        count = FlopCount(
            total=int(analysis.total()),
            by_module={
                inner: int(flops) for name, flops in analysis.by_module().items() if (inner := _inner_name(name)) is not None
            },
            unsupported=dict(analysis.unsupported_ops()),
            ops=tuple((_inner_name(scope) or "", flops) for scope, flops in ops),
        )
    _report_unsupported(count.unsupported)
    return count


def _recording(handle: Any, ops: list):  # noqa: ANN202 - an fvcore handle
    def record(inputs: list[Any], outputs: list[Any]) -> Any:
        flops = handle(inputs, outputs)
        total = sum(flops.values()) if hasattr(flops, "values") else flops
        ops.append((outputs[0].node().scopeName().rsplit("/", 1)[-1], Fraction(total)))
        return flops

    return record


def count_flops(model: nn.Module, example_input: ExampleInput) -> FlopCount:
    """Count ``model``'s FLOPs on ``example_input`` with fvcore's ``FlopCountAnalysis``.

    One multiply-add is one FLOP. The unwrapped module is traced in eval mode (each submodule's mode is
    restored afterwards); fvcore's per-call warnings are silenced and operators it cannot count are
    returned in ``unsupported`` and logged once. ``scaled_dot_product_attention`` is counted
    (:func:`sdpa_flop_jit`; fvcore alone counts it as 0).

    ``example_input`` is how the model is called: a tensor, a tuple of positional arguments, a dict of
    keyword arguments (``model(**batch)``) or a :class:`~lightning_prune.inputs.ModelInput`. The output may be
    a tensor or any structure holding tensors (a Hugging Face ``ModelOutput``, a key/value cache).
    """
    check_module("model", model)
    check_example_input("example_input", example_input)
    return _trace(model, example_input)


def _is_bilinear(module: nn.Module) -> bool:
    """Conv (not depthwise) and Linear cost ``u * inputs * outputs`` (a grouped conv's inputs: one conv group's);
    other counted modules ``u * channels``."""
    return isinstance(module, linear_types()) or (isinstance(module, _ConvNd) and not _is_depthwise(module))


class FlopsPredictor:
    """Exact FLOPs of any channel plan from fvcore's count of the dense model.

    Let group ``g`` have ``n_g`` channels of which a plan keeps ``k_g``. Every FLOP-counting module
    ``m`` that a group touches costs

        F_m(k) = u_m * A_m(k) * B_m(k),
        A_m = a_m - sum_g alpha_mg (n_g - k_g),   B_m = b_m - sum_g beta_mg (n_g - k_g)

    For a Conv or a Linear, ``a_m``/``b_m`` are its dense input/output widths (a grouped conv's input width
    is one conv group's, ``in_channels / groups``: its groups stay); for a per-channel module (BatchNorm,
    depthwise conv, pooling) ``a_m`` is its channel count and ``B_m = 1``. ``alpha_mg``/``beta_mg`` count
    the positions one channel of ``g`` occupies there (1, ``H*W`` behind a flatten, one per conv group at a
    grouped conv's output), and ``u_m = F_m(dense) / (a_m b_m)`` is exact because fvcore's
    formulas are products of widths (conv: ``N*H_out*W_out*C_out*(C_in/groups)*k_h*k_w``; BatchNorm in eval:
    ``2*numel``). FLOPs of other modules are constant: a leaf module whose widths a group changes is
    one of its members. What remains are operators called functionally in a parent's ``forward``
    (``F.adaptive_avg_pool2d`` at the end of MobileNetV2, ResNets or DenseNet, where it pools a
    concatenation of many groups; attention matrix products). When there are any, each is attributed to
    the member widths it scales with, ``F_o(k) = u_o * prod_{r in S_o} W_r(k)`` (``S_o``: one or two of
    the affine widths ``W_r`` of the members' dimensions, such as ``A_m`` above), found by counting one
    shrunk copy with random widths (a probe; a second one only if the first leaves a choice) and
    matching the exact ratios ``F_o(probe) / F_o(dense)``. Where an operator fits no such product, every
    prediction is an exact recount of a shrunk copy (slow, cached per kept-width vector). Otherwise a
    prediction is a few small integer matrix-vector products, equal to fvcore's recount of the
    physically pruned model.

    Args:
        model: the dense model the groups were found on.
        example_input: the input FLOPs are counted for (its batch size scales every count).
        groups: the model's channel groups (:func:`~lightning_prune.structure.find_channel_groups`).
        count: :func:`count_flops` of ``model`` on ``example_input`` when the caller already has it
            (saves a trace).
    """

    def __init__(
        self,
        model: nn.Module,
        example_input: ExampleInput,
        groups: Sequence[ChannelGroup],
        count: Optional[FlopCount] = None,
    ) -> None:
        count = count if count is not None and count.ops else count_flops(model, example_input)
        modules = dict(_unwrap(model).named_modules())
        self.dense = count.total
        self.sizes = np.array([group.size for group in groups], dtype=np.int64)
        touching: dict[str, list[tuple[int, GroupMember]]] = {}
        for group in groups:
            for member in group.members:
                if member.kind not in ("table", "parameter"):  # a per-head table is indexed and a loose parameter (a position embedding) added, neither multiplied
                    touching.setdefault(member.module, []).append((group.index, member))
        unknown = sorted(set(touching) - set(modules))
        if unknown:
            raise ValueError(f"`groups` were found on another module: {unknown[:3]} are not in `model`.")
        names = [name for name in touching if count.by_module.get(name, 0) > 0]
        shape = (len(names), len(groups))
        self._a, self._b = np.ones(len(names), dtype=np.int64), np.ones(len(names), dtype=np.int64)
        self._alpha, self._beta = np.zeros(shape, dtype=np.int64), np.zeros(shape, dtype=np.int64)
        self._unit = np.zeros(len(names), dtype=np.int64)
        for row, name in enumerate(names):
            module = modules[name]
            for index, member in touching[name]:
                counts = torch.bincount(member.channels, minlength=groups[index].size)
                if not bool((counts == counts[0]).all()):
                    raise ValueError(f"Channels of group {index} occupy unequal widths in {name!r}; cannot predict.")
                if _is_bilinear(module) and member.kind == "out":
                    self._b[row], self._beta[row, index] = member.dim, int(counts[0])
                else:
                    self._a[row], self._alpha[row, index] = member.dim, int(counts[0])
            if _is_bilinear(module) and not self._alpha[row].any():
                self._a[row] = module.in_channels // module.groups if isinstance(module, _ConvNd) else linear_features(module)[0]
            if _is_bilinear(module) and not self._beta[row].any():
                self._b[row] = module.out_channels if isinstance(module, _ConvNd) else linear_features(module)[1]
            self._unit[row], remainder = divmod(count.by_module[name], int(self._a[row] * self._b[row]))
            if remainder:
                raise ValueError(f"fvcore's FLOPs of {name!r} are not proportional to its widths; cannot predict.")
        self._constant = self.dense - sum(count.by_module[name] for name in names)
        self._terms: Optional[list[tuple[Fraction, tuple[int, ...]]]] = []
        self._widths = _Widths.of(groups)
        self._recounts: dict[tuple[int, ...], int] = {}
        self._recount_on = (model, example_input, list(groups))
        if _has_functional_flops(modules, count.by_module, set(touching)):
            self._terms = self._functional_terms(count, set(touching))
        if self._terms:
            dense_widths = self._widths.at(np.zeros(len(groups), dtype=np.int64))
            self._constant -= int(sum(unit * math.prod(int(dense_widths[r]) for r in rows) for unit, rows in self._terms))

    def predict_counts(self, kept: Sequence[int] | np.ndarray) -> int:
        """FLOPs when group ``g`` keeps ``kept[g]`` channels (which ones does not matter)."""
        removed = self.sizes - np.asarray(kept, dtype=np.int64)
        if self._terms is None:
            return self._recount(tuple(int(k) for k in self.sizes - removed))
        widths_in = self._a - self._alpha @ removed
        widths_out = self._b - self._beta @ removed
        modules = int(self._constant + self._unit @ (widths_in * widths_out))
        if not self._terms:
            return modules
        widths = self._widths.at(removed)
        return modules + int(sum(unit * math.prod(int(widths[r]) for r in rows) for unit, rows in self._terms))

    def _recount(self, kept: tuple[int, ...]) -> int:
        """fvcore's count of a physically pruned copy keeping ``kept[g]`` channels of group ``g`` (cached)."""
        if kept not in self._recounts:
            model, example_input, groups = self._recount_on
            pruned = copy.deepcopy(_unwrap(model))
            apply_plan(pruned, groups, {index: torch.arange(k) for index, k in enumerate(kept)}, example_input)
            self._recounts[kept] = _trace(pruned, example_input).total
        return self._recounts[kept]

    def predict(self, plan: ChannelPlan) -> int:
        """FLOPs of the model after :func:`~lightning_prune.structure.apply_plan` with ``plan``."""
        kept = self.sizes.copy()
        for index, keep in plan.items():
            if not 0 <= index < len(kept):
                raise ValueError(f"`plan` has group index {index!r}; valid indices are 0..{len(kept) - 1}.")
            kept[index] = len(keep)
        return self.predict_counts(kept)

    def min_flops(self, min_channels: int = 1) -> int:
        """FLOPs of the smallest structure: every group down to ``min_channels`` channels."""
        if min_channels < 1:
            raise ValueError(f"`min_channels` must be at least 1, got {min_channels!r}.")
        return self.predict_counts(np.minimum(self.sizes, min_channels))

    def _functional_terms(self, dense: FlopCount, touched: set[str]) -> Optional[list[tuple[Fraction, tuple[int, ...]]]]:
        """``(u_o, S_o)`` for every counted operator outside the group members whose FLOPs change with a
        plan: ``F_o(k) = u_o * prod_{r in S_o} W_r(k)``, matched on probes (see the class docstring); ``None``
        if some operator fits no such product (or a probe cannot be counted)."""
        model, example_input, groups = self._recount_on
        varying = [(position, Fraction(flops)) for position, (scope, flops) in enumerate(dense.ops) if scope not in touched and flops]
        dense_widths = self._widths.at(np.zeros(len(groups), dtype=np.int64))
        candidates: list[list[tuple[int, ...]]] = []
        for seed in range(3):  # a later probe only while some operator fits several products
            kept = _probe_widths(self.sizes, seed)
            try:
                probe = _trace(_shrunk_copy(model, groups, kept), example_input)
            except (RuntimeError, ValueError, IndexError) as error:  # a shape the shrunk copy cannot run: recount instead
                log.info("A shrunk copy of the model does not run (%s); FLOPs predictions recount.", error)
                return None
            if [scope for scope, _ in probe.ops] != [scope for scope, _ in dense.ops]:
                raise ValueError("The pruned model's operators differ from the dense model's; cannot predict FLOPs.")
            widths = self._widths.at(self.sizes - np.array(kept, dtype=np.int64))
            ratios = [Fraction(int(w), int(d)) for w, d in zip(widths, dense_widths)]
            observed = [probe.ops[position][1] / flops for position, flops in varying]
            if not candidates:
                candidates = [_products(ratio, ratios) for ratio in observed]
            else:
                candidates = [[rows for rows in fits if math.prod(ratios[r] for r in rows) == ratio]
                              for fits, ratio in zip(candidates, observed)]
            if all(len(rows) <= 1 for rows in candidates):
                break
        terms = []
        for (position, flops), rows in zip(varying, candidates):
            if len(rows) != 1:
                scope = dense.ops[position][0]
                where = f"module {scope!r}" if scope else "the model's own forward"
                log.info("FLOPs of an operator in %s fit no single product of channel widths; predictions recount.", where)
                return None
            if rows[0]:
                terms.append((flops / math.prod(int(dense_widths[r]) for r in rows[0]), rows[0]))
        return terms


def _probe_widths(sizes: np.ndarray, seed: int) -> tuple[int, ...]:
    """Random kept counts below each group's size, with a kept fraction no other group has where one is left
    (groups that shrink alike could not be told apart). Where none is left (two groups of two heads), a later
    probe (``seed`` > 0) keeps the whole group instead, so that the two differ there."""
    generator = torch.Generator().manual_seed(seed)
    used: set[Fraction] = set()
    kept = []
    for size in (int(size) for size in sizes):
        options = (torch.randperm(size - 1, generator=generator) + 1).tolist() if size > 1 else [1]
        k = next((k for k in options if Fraction(k, size) not in used), options[0] if seed == 0 else size)
        used.add(Fraction(k, size))
        kept.append(k)
    return tuple(kept)


def _products(ratio: Fraction, ratios: Sequence[Fraction]) -> list[tuple[int, ...]]:
    """The width rows (none, one, or a pair) whose probe/dense ratios multiply to ``ratio``."""
    if ratio == 1:
        return [()]
    by_ratio: dict[Fraction, list[int]] = {}
    for row, value in enumerate(ratios):
        by_ratio.setdefault(value, []).append(row)
    single = [(row,) for row in by_ratio.get(ratio, [])]
    if single:
        return single
    return [(first, second) for value, rows in by_ratio.items() for first in rows
            for second in by_ratio.get(ratio / value, []) if first <= second]


@dataclass(frozen=True)
class _Widths:
    """The distinct affine widths of the group members' dimensions: ``W_r = dims_r - alpha_r @ removed``
    (``removed[g]``: channels group ``g`` loses), the factors an operator's FLOPs may scale with."""

    dims: np.ndarray
    alpha: np.ndarray

    @staticmethod
    def of(groups: Sequence[ChannelGroup]) -> "_Widths":
        rows: dict[tuple[str, str], dict[int, int]] = {}
        dims: dict[tuple[str, str], int] = {}
        for group in groups:
            for member in (member for member in group.members if member.has_parameters):
                key = (member.module, member.kind)
                dims[key] = member.dim
                rows.setdefault(key, {})[group.index] = member.positions.numel() // max(group.size, 1)
        distinct = {(dims[key], tuple(sorted(row.items()))) for key, row in rows.items()}
        distinct |= {(group.size, ((group.index, 1),)) for group in groups}  # the kept count itself
        # widths that scale alike under every plan (a head's q, k, v and output widths, its count) are one factor
        by_scaling: dict[tuple[tuple[int, Fraction], ...], tuple[int, tuple[tuple[int, int], ...]]] = {}
        for dim, row in sorted(distinct):
            by_scaling.setdefault(tuple((index, Fraction(per_channel, dim)) for index, per_channel in row), (dim, row))
        ordered = sorted(by_scaling.values())
        alpha = np.zeros((len(ordered), len(groups)), dtype=np.int64)
        for r, (_, row) in enumerate(ordered):
            for index, per_channel in row:
                alpha[r, index] = per_channel
        return _Widths(np.array([dim for dim, _ in ordered], dtype=np.int64), alpha)

    def at(self, removed: np.ndarray) -> np.ndarray:
        return self.dims - self.alpha @ removed


def _shrunk_copy(model: nn.Module, groups: Sequence[ChannelGroup], kept: Sequence[int]) -> nn.Module:
    """A copy of ``model`` in which group ``g`` keeps its first ``kept[g]`` channels: each member's
    parameters, BatchNorm statistics and width attributes are sliced at the removed positions (and head counts
    follow). It has the shapes (hence fvcore's count) of :func:`~lightning_prune.structure.apply_plan`'s result,
    in milliseconds instead of a torch-pruning pass."""
    copy_ = copy.deepcopy(_unwrap(model))
    removed = {group.index: torch.arange(group.size) >= k for group, k in zip(groups, kept)}
    slice_members(dict(copy_.named_modules()), removed_positions(groups, removed))
    sync_head_counts(copy_)
    return copy_


def _has_functional_flops(modules: dict[str, nn.Module], by_module: dict[str, int], touched: set[str]) -> bool:
    """Whether some module that is not a group member counts FLOPs in its own ``forward`` beyond its
    children's (a functional op whose widths a group may change)."""
    children: dict[str, int] = {}
    for name in modules:
        if name:
            parent = name.rsplit(".", 1)[0] if "." in name else ""
            children[parent] = children.get(parent, 0) + by_module.get(name, 0)
    return any(
        by_module.get(name, 0) > children.get(name, 0)
        for name, module in modules.items()
        if name not in touched and next(module.children(), None) is not None
    )
