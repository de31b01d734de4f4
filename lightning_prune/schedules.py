"""When to prune and how much: the target at each pruning event (one-shot, iterative, AGP), and AutoPrune's
learning window. A core (:class:`~lightning_prune.pruner.Pruner`) is told a target; a schedule says which, when."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal, Mapping, Optional

from lightning_prune.choices import check_choice
from lightning_prune.pruner import Target

ScheduleKind = Literal["one_shot", "iterative", "agp"]
Interval = Literal["epoch", "step"]
"""The unit of a schedule: epochs, or optimizer steps."""


def check_initial_below(initial_sparsity: float, final: Target) -> None:
    """AGP's s_i must not exceed any final target s_f."""
    finals = list(final.values()) if isinstance(final, Mapping) else [final]
    if finals and initial_sparsity > min(finals):
        raise ValueError(f"`initial_sparsity` ({initial_sparsity}) must not exceed the final `sparsity` ({final!r}).")


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
        return asdict(self)

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

    def target(self, time: int, final: Target) -> Optional[Target]:
        """The target of the event at ``time`` toward ``final`` (per layer for a mapping): :math:`s_i + (s_f - s_i) f`,
        exactly :math:`s_f` at :math:`f = 1` (and :math:`f s_f` when :math:`s_i = 0`); ``None`` if ``time`` is no event.

        Raises:
            ValueError: ``initial_sparsity`` exceeds a final target.
        """
        fraction = self.fraction(time)
        if fraction is None:
            return None
        check_initial_below(self.initial_sparsity, final)
        s_i = self.initial_sparsity

        def blend(s_f: float) -> float:
            return s_f if fraction == 1.0 else s_i + (s_f - s_i) * fraction

        return {key: blend(value) for key, value in final.items()} if isinstance(final, Mapping) else blend(float(final))

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


@dataclass(frozen=True)
class LearningWindow:
    """When ``M`` learns: epochs ``start_epoch``..``end_epoch``; later steps fine-tune ``W`` under fixed masks.

    ``end_epoch=None``: the first ``fraction`` (75%) of training — up to epoch ``int(0.75 · max_epochs) − 1``
    (at least ``start_epoch``) and, with ``max_steps``, before global step ``max(1, int(0.75 · max_steps))``;
    without either limit ``M`` learns until training ends. ``None`` or a negative value means no limit.
    """

    start_epoch: int = 0
    end_epoch: Optional[int] = None
    fraction: float = 0.75

    def __post_init__(self) -> None:
        start, end = self.start_epoch, self.end_epoch
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ValueError(f"`start_epoch` must be an integer >= 0, got {start!r}.")
        if end is not None and (isinstance(end, bool) or not isinstance(end, int) or end < start):
            raise ValueError(f"`end_epoch` must be None or an integer >= `start_epoch` ({start}), got {end!r}.")

    def last_epoch(self, max_epochs: Optional[int]) -> Optional[int]:
        if self.end_epoch is not None:
            return self.end_epoch
        if max_epochs is None or max_epochs < 0:
            return None
        return max(self.start_epoch, int(self.fraction * max_epochs) - 1)

    def learning(self, epoch: int, step: int, max_epochs: Optional[int], max_steps: Optional[int]) -> bool:
        last = self.last_epoch(max_epochs)
        by_steps = self.end_epoch is None and max_steps is not None and max_steps > 0
        return (
            epoch >= self.start_epoch
            and (last is None or epoch <= last)
            and (not by_steps or step < max(1, int(self.fraction * max_steps)))
        )

    def closed(self, epoch: int, step: int, max_epochs: Optional[int], max_steps: Optional[int]) -> bool:
        """Whether the window is over (``M`` learnt and stops: the fine-tune phase), not merely yet to start."""
        return epoch >= self.start_epoch and not self.learning(epoch, step, max_epochs, max_steps)

    def problem(self, max_epochs: Optional[int], max_steps: Optional[int]) -> Optional[str]:
        """Why these limits leave no fine-tuning phase (or no learning at all), else ``None``."""
        epochs = max_epochs if max_epochs is not None and max_epochs >= 0 else None
        steps = max_steps if max_steps is not None and max_steps > 0 else None
        last = self.last_epoch(epochs)
        if epochs is not None and self.start_epoch >= epochs:
            return f"`start_epoch`={self.start_epoch} is not below `max_epochs`={epochs}: M never learns"
        if last is None and steps is None:
            return "without `max_epochs`, `max_steps` or `end_epoch`, M learns until training ends"
        if epochs is not None and last is not None and last >= epochs - 1 and (steps is None or self.end_epoch is not None):
            return f"M learns up to epoch {last}, the last of `max_epochs`={epochs}"
        return None

    def progress(self, epoch: int, within: float, step: int, max_epochs: Optional[int], max_steps: Optional[int]) -> Optional[float]:
        """How far the window is, from 0 at its start to 1 at its end, at the fraction ``within`` of epoch ``epoch``
        (global step ``step``): the larger of the epoch and the step progress where both limit it; ``None``
        without an end (see :meth:`problem`)."""
        last = self.last_epoch(max_epochs)
        by_steps = self.end_epoch is None and max_steps is not None and max_steps > 0
        parts = [] if last is None else [(epoch - self.start_epoch + within) / (last - self.start_epoch + 1)]
        if by_steps:
            parts.append(step / max(1, int(self.fraction * max_steps)))
        return min(1.0, max(0.0, *parts)) if parts else None
