"""Binary masks on named weights: apply them, keep zeros through optimizer steps, save and load them."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


class MaskSet:
    """Boolean keep-masks (``True`` = kept) for named parameters of one model.

    Parameters are looked up by name on every call, so the set stays valid when a module is
    moved to another device. Masked entries are written as ``+0.0`` (``masked_fill_``), which
    keeps sparse exports bit-exact.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.masks: dict[str, torch.Tensor] = {}

    def parameter(self, name: str) -> nn.Parameter:
        return self.model.get_parameter(name)

    def update(self, masks: dict[str, torch.Tensor]) -> None:
        """Replace masks (by name) and zero the newly masked weights at once."""
        for name, mask in masks.items():
            self.masks[name] = mask.to(device=self.parameter(name).device, dtype=torch.bool)
        self.apply_to_weights()

    @torch.no_grad()
    def apply_to_weights(self) -> None:
        """Write zeros into every masked weight."""
        for name, mask in self.masks.items():
            parameter = self.parameter(name)
            parameter.masked_fill_(~mask.to(parameter.device), 0.0)

    @torch.no_grad()
    def apply_to_grads(self) -> None:
        """Zero the gradients of masked weights, so no optimizer state (momentum, Adam moments) builds up there."""
        for name, mask in self.masks.items():
            grad = self.parameter(name).grad
            if grad is not None:
                grad.masked_fill_(~mask.to(grad.device), 0.0)

    @torch.no_grad()
    def apply_to_optimizer_state(self, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        """Zero every per-weight optimizer state (momentum, Adam moments) at masked positions."""
        for optimizer in optimizers:
            for name, mask in self.masks.items():
                for value in optimizer.state.get(self.parameter(name), {}).values():
                    if isinstance(value, torch.Tensor) and value.shape == mask.shape:
                        value.masked_fill_(~mask.to(value.device), 0.0)

    def __bool__(self) -> bool:
        return bool(self.masks)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: mask.cpu().clone() for name, mask in self.masks.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.masks = {}
        self.update(state)
