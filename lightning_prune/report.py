"""Sparsity tables (per-layer total weights, non-zeros (the L0 norm), sparsity and the total) and the one
renderer of the callbacks' end-of-pruning summaries (:func:`pruning_summary`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Sequence

from torch import nn

from lightning_prune.flops import FlopCount
from lightning_prune.targets import select_modules, stored_weight

if TYPE_CHECKING:  # annotations only: the report needs no channel-group machinery at import
    from lightning_prune.structure import ChannelGroup, ChannelPlan


@dataclass(frozen=True)
class LayerSparsity:
    """One row: a layer's weight count, its non-zeros (L0 norm) and its sparsity (zeros / total)."""

    layer: str
    total: int
    nonzero: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzero / self.total if self.total else 0.0

    @property
    def compression(self) -> float:
        """total / non-zero (``inf`` when every weight is zero)."""
        return self.total / self.nonzero if self.nonzero else float("inf")


@dataclass(frozen=True)
class SparsityReport:
    """Per-layer rows and their total; ``str(report)`` is a printable table."""

    layers: list[LayerSparsity] = field(default_factory=list)

    @property
    def total(self) -> LayerSparsity:
        return LayerSparsity(
            "total", sum(row.total for row in self.layers), sum(row.nonzero for row in self.layers)
        )

    @property
    def sparsity(self) -> float:
        return self.total.sparsity

    def as_metrics(self, prefix: str = "prune/") -> dict[str, float]:
        """Scalars for a logger: ``<prefix>sparsity`` and ``<prefix>sparsity/<layer>``."""
        metrics = {f"{prefix}sparsity": self.sparsity}
        metrics.update({f"{prefix}sparsity/{row.layer}": row.sparsity for row in self.layers})
        return metrics

    def rows(self) -> list[dict[str, object]]:
        return [
            {"layer": r.layer, "total": r.total, "nonzero": r.nonzero, "sparsity": r.sparsity}
            for r in [*self.layers, self.total]
        ]

    def __str__(self) -> str:
        return table(
            ("layer", "weights", "non-zero", "sparsity"),
            [(r.layer, f"{r.total:,}", f"{r.nonzero:,}", f"{r.sparsity:.2%}") for r in [*self.layers, self.total]],
        )


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """The one table format of every printout: the first column left-aligned, the others right-aligned,
    two spaces apart, each as wide as its widest cell."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    return "\n".join(
        "  ".join(f"{cell:<{w}}" if i == 0 else f"{cell:>{w}}" for i, (cell, w) in enumerate(zip(line, widths)))
        for line in [header, *rows]
    )


def channel_rows(groups: Sequence[ChannelGroup], plan: ChannelPlan) -> list[tuple[str, int, int]]:
    """``(layer, channels, kept)`` for every out-layer of every channel group, in model order (a group
    missing from ``plan`` keeps all its channels)."""
    rows = []
    for group in groups:
        kept = len(plan.get(group.index, range(group.size)))
        rows += [(m.order, m.module, group.size, kept) for m in group.members if m.kind == "out"]
    return [(name, size, kept) for _, name, size, kept in sorted(rows)]


def sparsity_report(
    module: nn.Module, parameters: Optional[Sequence[str]] = None, exclude: Optional[Sequence[str]] = None
) -> SparsityReport:
    """Sparsity of the Conv/Linear weights of ``module`` (optionally filtered by module-name globs)."""
    modules = select_modules(module, parameters, exclude)
    rows, seen = [], set()
    for name, m in modules.items():
        if id(stored_weight(m)) not in seen:  # a shared (tied) weight is counted once, under its first layer
            seen.add(id(stored_weight(m)))
            rows.append(LayerSparsity(name, m.weight.numel(), int(m.weight.detach().count_nonzero())))
    return SparsityReport(rows)


def nonzero_flops(count: FlopCount, report: SparsityReport) -> int:
    """FLOPs left when multiplications by zero weights are skipped: F − Σ_l F_l · s_l.

    ``F`` is the dense fvcore count (one multiply-add = one FLOP), ``F_l`` the count of layer ``l``
    and ``s_l`` its sparsity; ``F / nonzero_flops`` is ShrinkBench's theoretical speed-up.
    """
    saved = sum(count.by_module.get(row.layer, 0) * (row.total - row.nonzero) / row.total for row in report.layers)
    return int(round(count.total - saved))


def pruning_summary(
    title: str,
    report: Optional[SparsityReport] = None,
    channels: Sequence[tuple[str, int, int]] = (),
    parameters: Optional[tuple[int, int]] = None,
    flops: Optional[tuple[int, int]] = None,
    sparse_flops: Optional[int] = None,
    flops_of: str = "",
    monitor: Optional[str] = None,
    scores: tuple[Optional[float], Optional[float]] = (None, None),
    facts: Sequence[str] = (),
    notes: Sequence[str] = (),
    kept: str = "non-zero",
) -> str:
    """The summary every callback prints at the end of pruning, one format for all: per-layer weight
    sparsity (``report``, with the compression total / non-zero) and/or per-layer kept channels
    (``channels``, rows of :func:`channel_rows`), parameters (dense -> ``kept``), FLOPs as fvcore's
    multiply-adds of one sample (dense -> pruned: fvcore's count of the model the run leaves, or, with
    ``flops_of``, of the model that phrase names), beside it ``sparse_flops`` (:func:`nonzero_flops`: what a
    sparse kernel skipping the zero weights would run), the monitored metric (dense -> pruned), other
    ``facts`` (one line each) and ``notes`` (warnings, e.g. a schedule that did not complete)."""

    def fmt(value: Optional[float]) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    lines = [title]
    if report is not None:
        lines.append(str(report))
        if report.total.nonzero:
            lines.append(f"compression (total / non-zero): {report.total.total / report.total.nonzero:.2f}x")
    if channels:
        lines.append(table(("layer", "channels", "kept", "ratio"), [(n, str(c), str(k), f"{k / c:.2f}") for n, c, k in channels]))
    if parameters is not None:
        lines.append(f"parameters: {parameters[0]:,} -> {parameters[1]:,} {kept} ({parameters[1] / parameters[0]:.2%})")
    if flops is not None:
        of = f", {flops_of}" if flops_of else ""
        lines.append(f"MACs per sample (fvcore{of}): {flops[0]:,} -> {flops[1]:,} ({flops[1] / flops[0]:.2%})")
        if sparse_flops is not None:
            lines.append(f"MACs per sample a sparse kernel would run (zero weights skipped): {flops[0]:,} -> "
                         f"{sparse_flops:,} ({sparse_flops / flops[0]:.2%})")
    if monitor:
        lines.append(f"{monitor}: dense {fmt(scores[0])} -> pruned {fmt(scores[1])}")
    lines += list(facts)
    lines += [f"WARNING: {note}" for note in notes]
    return "\n".join(lines)
