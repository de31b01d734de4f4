"""Choose the weights to prune: Conv/Linear weights, filtered by module-name patterns."""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Iterable, Optional, Sequence

from torch import nn

from lightning_prune.checks import check_module, check_patterns
from torch.nn.utils import parametrize

PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def select_modules(
    model: nn.Module,
    include: Optional[Sequence[str]] = None,
    exclude: Optional[Sequence[str]] = None,
    argument: str = "parameters",
) -> dict[str, nn.Module]:
    """Conv/Linear modules of ``model`` by name, in model order.

    ``include``/``exclude`` are glob patterns on module names (``"network.fc*"``, ``"*.conv1"``).
    Every pattern must match at least one prunable module and the selection must not be empty;
    otherwise a ``ValueError`` names ``argument`` (the user-facing name of ``include``).
    """
    check_module("model", model)
    check_patterns(argument, include)
    check_patterns("exclude", exclude)
    prunable = {name: module for name, module in model.named_modules() if isinstance(module, PRUNABLE_TYPES)}
    if not prunable:
        raise ValueError(
            f"The model has no prunable weight: `{argument}` can only select {', '.join(t.__name__ for t in PRUNABLE_TYPES)} modules."
        )
    for option, patterns in ((argument, include), ("exclude", exclude)):
        for pattern in patterns or ():
            if not any(fnmatchcase(name, pattern) for name in prunable):
                raise ValueError(
                    f"`{option}` pattern {pattern!r} matches no prunable module; prunable modules are: {sorted(prunable)}."
                )
    selected = {
        name: module
        for name, module in prunable.items()
        if (include is None or any(fnmatchcase(name, p) for p in include))
        and not any(fnmatchcase(name, p) for p in exclude or ())
    }
    if not selected:
        raise ValueError(f"`{argument}`={include!r} with `exclude`={exclude!r} leaves no module to prune.")
    return selected


def weight_names(modules: Iterable[str]) -> list[str]:
    """Parameter names (``<module>.weight``) of the named modules; biases are never pruned."""
    return [f"{name}.weight" for name in modules]


def stored_weight(module: nn.Module) -> nn.Parameter:
    """The parameter that holds ``module.weight``: the weight itself, or under a parametrization (AutoPrune's
    mask, weight norm) its stored original. ``module.weight`` is then computed afresh at every access, so
    only this object tells a shared (tied) weight apart from two equal-looking ones."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight
