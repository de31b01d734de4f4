"""Entering train or eval mode for a while and giving every submodule its own flag back afterwards."""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn


@contextlib.contextmanager
def training_mode(model: nn.Module, training: bool) -> Iterator[nn.Module]:
    """Put every submodule in training (``True``) or eval mode; on leaving, give each submodule its own
    ``training`` flag back (not the top-level one: a user may keep parts frozen in eval mode)."""
    flags = [(module, module.training) for module in model.modules()]
    model.train(training)
    try:
        yield model
    finally:
        for module, was_training in flags:
            module.training = was_training


def eval_mode(model: nn.Module) -> contextlib.AbstractContextManager[nn.Module]:
    """:func:`training_mode` with ``training=False``."""
    return training_mode(model, False)
