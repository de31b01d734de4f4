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
    r"""Pruning events at ``start_epoch, start_epoch + frequency, ..., end_epoch``.

    The unit is the caller's: epochs, or optimizer steps (``IterativeMagnitude(interval="step")``,
    Zhu & Gupta's Δt steps). :meth:`fraction` gives the progress :math:`f` toward the final target
    at an event; the sparsity asked for is then :math:`s_i + (s_f - s_i) f` (``MagnitudePruner``, per layer):

    - ``one_shot``: one event at ``start_epoch``, :math:`f = 1`;
    - ``iterative``: equal steps, :math:`f = k/n` at the k-th of n events;
    - ``agp`` (Zhu & Gupta 2017): :math:`s_t = s_f + (s_i - s_f)(1 - (t - t_0)/(n\Delta t))^3` for
      :math:`t \in \{t_0, t_0 + \Delta t, \dots, t_0 + n\Delta t\}`, :math:`\Delta t` = ``frequency``,
      i.e. :math:`f = 1 - (1 - (t - t_0)/(n\Delta t))^3`. With ``initial_sparsity`` :math:`s_i > 0` the
      first event is :math:`t_0` = ``start_epoch`` (pruned to :math:`s_i`) and :math:`t_0 + n\Delta t`
      = ``end_epoch``; with :math:`s_i = 0` the event at :math:`t_0` would prune nothing, so
      :math:`t_0` = ``start_epoch`` − Δt and the first event already prunes.

    Fractions are absolute (of the final target), never compounded.
    """

    kind: ScheduleKind
    start_epoch: int
    end_epoch: int
    frequency: int = 1
    initial_sparsity: float = 0.0

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
        s_i = self.initial_sparsity
        if isinstance(s_i, bool) or not isinstance(s_i, (int, float)) or not 0.0 <= s_i < 1.0:
            raise ValueError(f"`initial_sparsity` must be a number in [0, 1), got {s_i!r}.")
        if s_i > 0 and self.kind != "agp":
            raise ValueError(f"`initial_sparsity` ({s_i}) is the s_i of the AGP schedule: it needs `schedule`='agp', got {self.kind!r}.")
        if s_i > 0 and self.end_epoch == self.start_epoch:
            raise ValueError(
                f"`initial_sparsity` ({s_i}) is reached at `start_epoch` and the final sparsity at `end_epoch`: they must "
                f"differ, got both {self.start_epoch}."
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
        return {"kind": self.kind, "start_epoch": self.start_epoch, "end_epoch": self.end_epoch, "frequency": self.frequency,
                "initial_sparsity": self.initial_sparsity}

    @classmethod
    def before_limit(
        cls, kind: ScheduleKind, start_epoch: int, end_epoch: Optional[int], frequency: int, initial_sparsity: float,
        limit: Optional[int], limit_name: str,
    ) -> "PruningSchedule":
        """The schedule that ends before a training run's end ``limit`` (``None``: unknown); ``end_epoch=None`` ends
        halfway from ``start_epoch`` to ``limit`` (on an event). ``limit_name`` names the limit in the errors."""
        end = end_epoch
        if end is None:
            if kind == "one_shot":
                end = start_epoch
            elif limit is None:
                raise ValueError(f"`end_epoch`=None needs the Trainer's `{limit_name}` (the schedule ends halfway to it); give `end_epoch`.")
            else:
                span = max(0, (limit - start_epoch) // 2)
                end = start_epoch + span - span % frequency
        if limit is not None and max(end, start_epoch) >= limit:
            raise ValueError(f"`end_epoch` ({end}) must be before the Trainer's `{limit_name}` ({limit}), or the final `sparsity` is never reached.")
        return cls(kind, start_epoch, end, frequency, initial_sparsity)

    def fraction(self, epoch: int) -> Optional[float]:
        """Progress toward the final target at ``epoch``, or ``None`` if it is no event (O(1): called every step)."""
        if self.kind == "one_shot":
            return 1.0 if epoch == self.start_epoch else None
        offset = epoch - self.start_epoch
        if offset < 0 or epoch > self.end_epoch or offset % self.frequency:
            return None
        k, n = offset // self.frequency, (self.end_epoch - self.start_epoch) // self.frequency
        if self.initial_sparsity == 0:  # t0 = start_epoch - Δt: the events are k = 1..n
            k, n = k + 1, n + 1
        if self.kind == "agp":
            return 1.0 - (1.0 - k / n) ** 3
        return k / n
