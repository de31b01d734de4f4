"""The one interface of the three framework-free cores, and the optimizer hooks that drive it in any loop.

A :class:`Pruner` decides *what* to prune; *when* is a schedule's (:mod:`lightning_prune.schedules`). Every
core (:class:`~lightning_prune.magnitude.MagnitudePruner`, :class:`~lightning_prune.auxiliary.AuxiliaryParameters`,
:class:`~lightning_prune.gate_search.GateSearch`) runs in the same loop shape::

    pruner.prepare()
    handle = hook_optimizer(optimizer, pruner)  # before_step / after_step around every optimizer step
    for step in range(steps):
        target = schedule.target(step, final)  # None: no event at this step
        if target is not None:
            pruner.update(target)
        loss = ...
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    handle.remove()
    pruner.finalize()
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
    """What :func:`hook_optimizer` calls around an optimizer step."""

    def before_step(self) -> None:
        """After the gradients are complete, before the optimizer changes the weights."""

    def after_step(self) -> None:
        """After the optimizer changed the weights."""


@runtime_checkable
class Pruner(StepHooks, Protocol):
    """A pruning algorithm's decisions, driven by the caller's loop (or a Lightning callback):

    - :meth:`prepare`: start acting on the model (insert gates, parametrize, or nothing);
    - :meth:`before_step`, :meth:`after_step` (:class:`StepHooks`): around every optimizer step of the model,
      through :func:`hook_optimizer`; no host synchronisation;
    - :meth:`update`: move to a target now (a sparsity, a fraction switched off, a mean gate);
    - :meth:`finalize`: make the result permanent and leave the model (returns what the core produced);
    - :meth:`state_dict`, :meth:`load_state_dict`: save and resume.
    """

    def prepare(self) -> None: ...

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


def hook_optimizer(optimizer: torch.optim.Optimizer, pruner: StepHooks) -> _Handles:
    """Call ``pruner.before_step()`` and ``pruner.after_step()`` around every ``optimizer.step()``; returns a handle
    whose ``remove()`` takes both hooks off (each hook is a ``functools.partial`` whose first argument is ``pruner``).

    ``before_step`` runs once the gradients are complete: when ``step`` is given a closure (Lightning's automatic
    and manual optimization, LBFGS) right after the closure returns (after the backward pass and Lightning's gradient
    clipping), else right before ``step``. A step that does not run (a ``GradScaler`` step skipped for an inf/NaN
    gradient) calls neither, and the weights it leaves untouched keep their zeros; with gradient accumulation the
    hooks run at each real optimizer step only.
    """
    return _Handles(optimizer.register_step_pre_hook(partial(_before, pruner)), optimizer.register_step_post_hook(partial(_after, pruner)))
