"""Sparsity tables: per-layer total weights, non-zeros (the L0 norm), sparsity and the total."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from torch import nn

from lightning_prune.flops import FlopCount
from lightning_prune.targets import select_modules, stored_weight


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
        width = max(len(r.layer) for r in [*self.layers, self.total])
        lines = [f"{'layer':<{width}}  {'weights':>10}  {'non-zero':>10}  {'sparsity':>8}"]
        for row in [*self.layers, self.total]:
            lines.append(f"{row.layer:<{width}}  {row.total:>10,}  {row.nonzero:>10,}  {row.sparsity:>8.2%}")
        return "\n".join(lines)


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
    report: SparsityReport,
    parameters: tuple[int, int],
    flops: Optional[tuple[int, int]] = None,
    monitor: Optional[str] = None,
    scores: tuple[Optional[float], Optional[float]] = (None, None),
    notes: Sequence[str] = (),
) -> str:
    """The table printed at the end of a pruning run: per-layer sparsity, then parameters
    (dense → non-zero), FLOPs (fvcore, multiply-adds of one sample, dense → pruned), the monitored metric
    and ``notes`` (e.g. a schedule that did not complete)."""

    def fmt(value: Optional[float]) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    lines = [title, str(report), f"parameters: {parameters[0]:,} -> {parameters[1]:,} non-zero"]
    if flops is not None:
        lines.append(f"MACs per sample (fvcore): {flops[0]:,} -> {flops[1]:,} ({flops[1] / flops[0]:.2%})")
    if monitor:
        lines.append(f"{monitor}: dense {fmt(scores[0])} -> pruned {fmt(scores[1])}")
    lines += [f"WARNING: {note}" for note in notes]
    return "\n".join(lines)
