"""Argument checks of the public functions: a bad argument gets a ``ValueError`` naming it, the value and
what is allowed, before anything is touched (the callbacks' own checks are in ``callbacks/_checks.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from lightning_prune.inputs import ModelInput, model_input


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
    """A tensor, a tuple of positional arguments, a dict of keyword arguments or a
    :class:`~lightning_prune.inputs.ModelInput`, holding at least one tensor (e.g. ``(batch_dict,)``)."""
    if not isinstance(value, (torch.Tensor, tuple, Mapping, ModelInput)) or not model_input(value).tensors():
        raise ValueError(
            f"`{name}` must be a tensor, a tuple of positional arguments or a dict of keyword arguments holding "
            f"tensors (or a lightning_prune.inputs.ModelInput), got {type(value).__name__} {value!r:.80}."
        )


def check_path(name: str, value: Any) -> None:
    """A ``str`` or ``pathlib.Path``."""
    if not isinstance(value, (str, Path)):
        raise ValueError(f"`{name}` must be a file path (str or pathlib.Path), got {type(value).__name__} {value!r:.80}.")
