"""Choose the weights to prune: Conv/Linear weights (Hugging Face's ``Conv1D`` counted as a Linear), filtered by
module-name patterns; and the widths of a Linear-like layer."""

from __future__ import annotations

import sys
from fnmatch import fnmatchcase
from typing import Optional, Sequence

from torch import nn

from lightning_prune.checks import check_module, check_patterns
from torch.nn.utils import parametrize

PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
"""The torch layers whose weights are pruned; :func:`prunable_types` adds Hugging Face's ``Conv1D``."""


def transposed_linear_types() -> tuple[type[nn.Module], ...]:
    """Hugging Face's ``transformers.pytorch_utils.Conv1D`` (GPT-2's linear layer, weight stored ``(in, out)``,
    widths ``nx``/``nf``) once transformers is imported (a model holding one has imported it), else ``()``:
    looked up, never imported, so that this package does not import transformers."""
    module = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(module, "Conv1D", None)
    return (conv1d,) if isinstance(conv1d, type) else ()


def linear_types() -> tuple[type[nn.Module], ...]:
    """``nn.Linear`` and the :func:`transposed_linear_types`: layers computing ``x @ W + b`` on the last dim."""
    return (nn.Linear, *transposed_linear_types())


def prunable_types() -> tuple[type[nn.Module], ...]:
    """:data:`PRUNABLE_TYPES` and the :func:`transposed_linear_types`."""
    return PRUNABLE_TYPES + transposed_linear_types()


def linear_features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of an ``nn.Linear`` or a Hugging Face ``Conv1D``."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.nx, module.nf


def set_linear_features(module: nn.Module, in_features: int, out_features: int) -> None:
    """Make a Linear's (or ``Conv1D``'s) width attributes say ``in_features``/``out_features``."""
    if isinstance(module, nn.Linear):
        module.in_features, module.out_features = in_features, out_features
    else:
        module.nx, module.nf = in_features, out_features


def select_modules(
    model: nn.Module,
    include: Optional[Sequence[str]] = None,
    exclude: Optional[Sequence[str]] = None,
    argument: str = "parameters",
) -> dict[str, nn.Module]:
    """Conv/Linear modules (and Hugging Face ``Conv1D``) of ``model`` by name, in model order.

    ``include``/``exclude`` are glob patterns on module names (``"network.fc*"``, ``"*.conv1"``).
    Every pattern must match at least one prunable module and the selection must not be empty;
    otherwise a ``ValueError`` names ``argument`` (the user-facing name of ``include``).
    """
    check_module("model", model)
    check_patterns(argument, include)
    check_patterns("exclude", exclude)
    types = prunable_types()
    prunable = {name: module for name, module in model.named_modules() if isinstance(module, types)}
    if not prunable:
        raise ValueError(
            f"The model has no prunable weight: `{argument}` can only select {', '.join(t.__name__ for t in types)} modules."
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


def stored_weight(module: nn.Module) -> nn.Parameter:
    """The parameter that holds ``module.weight``: the weight itself, or under a parametrization (AutoPrune's
    mask, weight norm) its stored original. ``module.weight`` is then computed afresh at every access, so
    only this object tells a shared (tied) weight apart from two equal-looking ones."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight
