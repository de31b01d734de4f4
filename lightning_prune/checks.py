"""Argument checks of the public functions: a bad argument gets a ``ValueError`` naming it, the value and
what is allowed, before anything is touched (the callbacks' own checks are in ``callbacks/_shared.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn


def check_module(name: str, value: Any) -> None:
    """``value`` must be a ``torch.nn.Module``."""
    if not isinstance(value, nn.Module):
        raise ValueError(f"`{name}` must be a torch.nn.Module, got {type(value).__name__} {value!r:.80}.")


def check_patterns(name: str, value: Any) -> None:
    """``None`` or a list/tuple of non-empty strings (module-name globs or names); a plain string would be
    read character by character, so it is refused."""
    if value is not None and (
        isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or not all(isinstance(p, str) and p for p in value)
    ):
        raise ValueError(f"`{name}` must be None or a list of module-name glob patterns (strings), e.g. ['network.fc*'], got {value!r}.")


def check_example_input(name: str, value: Any) -> None:
    """A tensor, or a tuple of positional arguments holding at least one tensor (e.g. ``(batch_dict,)``)."""
    def holds_tensor(item: Any) -> bool:
        if isinstance(item, torch.Tensor):
            return True
        items = item.values() if isinstance(item, dict) else item if isinstance(item, (tuple, list)) else ()
        return any(holds_tensor(i) for i in items)

    if not (isinstance(value, torch.Tensor) or (isinstance(value, tuple) and holds_tensor(value))):
        raise ValueError(
            f"`{name}` must be a tensor or a tuple of positional arguments holding tensors, got {type(value).__name__} {value!r:.80}."
        )


def check_path(name: str, value: Any) -> None:
    """A ``str`` or ``pathlib.Path``."""
    if not isinstance(value, (str, Path)):
        raise ValueError(f"`{name}` must be a file path (str or pathlib.Path), got {type(value).__name__} {value!r:.80}.")
