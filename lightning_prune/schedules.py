"""When to prune and how much: target sparsity at each pruning event (one-shot, iterative, AGP)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from lightning_prune.choices import check_choice

ScheduleKind = Literal["one_shot", "iterative", "agp"]
Interval = Literal["epoch", "step"]
"""The unit of a schedule: epochs, or optimizer steps."""


@dataclass(frozen=True)
class PruningSchedule:
    """Pruning events at ``start_epoch, start_epoch + frequency, ..., end_epoch``.

    The unit is the caller's: epochs, or optimizer steps (``IterativeMagnitude(interval="step")``,
    Zhu & Gupta's Δt steps).

    At the k-th of n events (k = 1..n) the fraction of the final target that is pruned is
    - ``one_shot``: one event at ``start_epoch``, fraction 1;
    - ``iterative``: equal steps, k / n;
    - ``agp`` (Zhu & Gupta 2017): s_t = s_f + (s_i - s_f)(1 - (t - t0)/(nΔt))^3 with s_i = 0,
      Δt = ``frequency`` and t0 = ``start_epoch`` - Δt, i.e. 1 - (1 - k/n)^3.
    Fractions are absolute (of the final target), never compounded.
    """

    kind: ScheduleKind
    start_epoch: int
    end_epoch: int
    frequency: int = 1

    def __post_init__(self) -> None:
        check_choice("schedule", self.kind, ScheduleKind)
        if self.start_epoch < 0:
            raise ValueError(f"`start_epoch` must be >= 0, got {self.start_epoch!r}.")
        if self.frequency < 1:
            raise ValueError(f"`frequency` must be a positive number of epochs, got {self.frequency!r}.")
        if self.end_epoch < self.start_epoch:
            raise ValueError(
                f"`start_epoch` ({self.start_epoch}) must not come after `end_epoch` ({self.end_epoch})."
            )
        if self.kind != "one_shot" and (self.end_epoch - self.start_epoch) % self.frequency:
            raise ValueError(
                f"`end_epoch` - `start_epoch` ({self.end_epoch} - {self.start_epoch}) must be a multiple of "
                f"`frequency` ({self.frequency})."
            )

    @property
    def events(self) -> list[int]:
        """Epochs at which pruning happens (at the start of the epoch)."""
        if self.kind == "one_shot":
            return [self.start_epoch]
        return list(range(self.start_epoch, self.end_epoch + 1, self.frequency))

    @property
    def last_event(self) -> int:
        """When the final target is reached."""
        return self.events[-1]

    def state_dict(self) -> dict[str, object]:
        """The schedule's arguments (it holds no other state); ``PruningSchedule(**state)`` rebuilds it."""
        return {"kind": self.kind, "start_epoch": self.start_epoch, "end_epoch": self.end_epoch, "frequency": self.frequency}

    def fraction(self, epoch: int) -> Optional[float]:
        """Fraction of the final target to reach at ``epoch``, or ``None`` if it is no event (O(1): called every step)."""
        if self.kind == "one_shot":
            return 1.0 if epoch == self.start_epoch else None
        offset = epoch - self.start_epoch
        if offset < 0 or epoch > self.end_epoch or offset % self.frequency:
            return None
        k, n = offset // self.frequency + 1, (self.end_epoch - self.start_epoch) // self.frequency + 1
        if self.kind == "agp":
            return 1.0 - (1.0 - k / n) ** 3
        return k / n
