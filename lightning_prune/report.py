"""Sparsity tables: per-layer total weights, non-zeros (the L0 norm), sparsity and the total."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from torch import nn

from lightning_prune.targets import select_modules


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
    return SparsityReport(
        [
            LayerSparsity(name, m.weight.numel(), int(m.weight.detach().count_nonzero()))
            for name, m in modules.items()
        ]
    )
