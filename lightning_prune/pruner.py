"""The one interface of the three framework-free cores, and the optimizer hooks that drive it in any loop.

A :class:`Pruner` (:class:`~lightning_prune.magnitude.MagnitudePruner`,
:class:`~lightning_prune.auxiliary.AuxiliaryParameters`, :class:`~lightning_prune.gate_search.GateSearch`) decides
*what* to prune and is told a target; *which target when* is a schedule's (:mod:`lightning_prune.schedules`).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Mapping, Optional, Protocol, Union, runtime_checkable

import torch
from torch.utils.hooks import RemovableHandle

Target = Union[float, Mapping[str, float]]
"""What a core is told to reach: one number, or one per layer (``MagnitudePruner``'s ``scope="layer"``)."""


@runtime_checkable
class StepHooks(Protocol):
    """What :func:`hook_optimizer` calls around each optimizer step (no host synchronisation in either)."""

    def before_step(self) -> None: ...

    def after_step(self) -> None: ...


@runtime_checkable
class Pruner(StepHooks, Protocol):
    """:meth:`prepare` (start acting on the model), :meth:`before_step` / :meth:`after_step` around every optimizer
    step of the model (:func:`hook_optimizer`), :meth:`update` (move to a target now), :meth:`finalize` (make the
    result permanent and leave the model; returns what the core produced), :meth:`state_dict` /
    :meth:`load_state_dict`."""

    def prepare(self) -> object: ...  # GateSearch returns a context that undoes it

    def update(self, target: float) -> None: ...

    def finalize(self) -> Any: ...  # noqa: ANN401 - each core returns its own result

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class _Handles:
    """Removes both hooks of :func:`hook_optimizer` at once."""

    def __init__(self, *handles: RemovableHandle) -> None:
        self.handles = handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _before(pruner: StepHooks, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> Optional[tuple[tuple, dict]]:
    """The step pre-hook: ``before_step`` now, or right after the step's closure when there is one."""
    closure: Optional[Callable[[], Any]] = kwargs.get("closure", args[1] if len(args) > 1 else None)
    if closure is None:
        pruner.before_step()
        return None

    def closure_then_before_step() -> Any:  # noqa: ANN401 - the closure's loss
        loss = closure()
        pruner.before_step()
        return loss

    if "closure" in kwargs:
        return args, {**kwargs, "closure": closure_then_before_step}
    return (args[0], closure_then_before_step, *args[2:]), kwargs


def _after(pruner: StepHooks, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
    pruner.after_step()


def hook_optimizer(optimizer: torch.optim.Optimizer, pruner: StepHooks, *, before_step: bool = True) -> _Handles:
    """Call ``pruner.before_step()`` and ``pruner.after_step()`` around every ``optimizer.step()``; the handle's
    ``remove()`` takes the hooks off (each a ``functools.partial`` whose first argument is ``pruner``).

    ``before_step`` runs once the gradients are complete: right before the step, or, when ``step`` is given a
    closure (LBFGS, a loop of your own), right after the closure returns. A step that does not run (a ``GradScaler``
    step skipped for an inf/NaN gradient) calls neither, and with gradient accumulation both run at each real
    optimizer step only. ``before_step=False`` hooks ``after_step`` alone: the callbacks call ``before_step`` from
    Lightning's ``on_before_optimizer_step``, which runs before Lightning clips the gradients (inside Lightning the
    step's closure ends with the clipping), so the clipping norm sees masked gradients and the gates' penalty.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"`optimizer` must be a torch.optim.Optimizer, got {type(optimizer).__name__} {optimizer!r:.80}.")
    if not isinstance(pruner, StepHooks):
        raise ValueError(f"`pruner` must have before_step() and after_step() (a lightning_prune.Pruner), got {type(pruner).__name__}.")
    if not isinstance(before_step, bool):
        raise ValueError(f"`before_step` must be True or False, got {before_step!r}.")
    after = optimizer.register_step_post_hook(partial(_after, pruner))
    return _Handles(optimizer.register_step_pre_hook(partial(_before, pruner)), after) if before_step else _Handles(after)
