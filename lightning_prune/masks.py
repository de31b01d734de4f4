"""Binary masks on named weights: apply them, keep zeros through optimizer steps, save and load them."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from lightning_prune.checks import check_module


class MaskSet:
    """Boolean keep-masks (``True`` = kept) for named parameters of one model.

    The per-step work (:meth:`apply_to_grads`, :meth:`apply_to_weights`) is a fused multi-tensor
    multiply by 0/1 factors held in each parameter's dtype and device (``torch._foreach_mul_``): no
    allocation, no host synchronisation. When masks change (:meth:`update`, :meth:`write_zeros`) masked
    weights are written as ``+0.0`` (adding ``+0.0`` turns the ``-0.0`` of a negative weight times 0 into
    ``+0.0``), which keeps sparse exports bit-exact; the per-step multiply leaves them so, as the masked
    gradients and zeroed optimizer state leave them untouched (an optimizer that still moved one would
    leave ``-0.0`` or ``+0.0``: zero either way). The factors follow the parameters when the module moves
    to another device.
    """

    def __init__(self, model: nn.Module) -> None:
        check_module("model", model)
        self.model = model
        self.masks: dict[str, torch.Tensor] = {}
        self._parameters: list[nn.Parameter] = []
        self._factors: list[torch.Tensor] = []

    def parameter(self, name: str) -> nn.Parameter:
        return self.model.get_parameter(name)

    def _refresh(self) -> None:
        """Rebuild the 0/1 factors when a parameter was replaced or moved (cheap checks, no sync)."""
        names = list(self.masks)
        stale = len(self._parameters) != len(names) or any(
            p is not self.parameter(n) or f.device != p.device or f.dtype != p.dtype
            for p, f, n in zip(self._parameters, self._factors, names)
        )
        if stale:
            self._parameters = [self.parameter(name) for name in names]
            self._factors = [
                mask.to(device=p.device, dtype=p.dtype) for mask, p in zip(self.masks.values(), self._parameters)
            ]

    def update(self, masks: dict[str, torch.Tensor]) -> None:
        """Replace masks (by name) and zero the newly masked weights at once."""
        for name, mask in masks.items():
            self.masks[name] = mask.to(device=self.parameter(name).device, dtype=torch.bool)
        self._parameters = []
        self.write_zeros()

    @torch.no_grad()
    def write_zeros(self) -> None:
        """Write +0.0 into every masked weight (when masks change or weights are rewound)."""
        if self.masks:
            self.apply_to_weights()
            torch._foreach_add_(self._parameters, 0.0)

    @torch.no_grad()
    def apply_to_weights(self) -> None:
        """Zero every masked weight (after each optimizer step): one fused multiply."""
        if not self.masks:
            return
        self._refresh()
        torch._foreach_mul_(self._parameters, self._factors)

    @torch.no_grad()
    def apply_to_grads(self) -> None:
        """Zero the gradients of masked weights, so no optimizer state (momentum, Adam moments) builds up there."""
        if not self.masks:
            return
        self._refresh()
        pairs = [(p.grad, f) for p, f in zip(self._parameters, self._factors) if p.grad is not None]
        if pairs:
            torch._foreach_mul_([g for g, _ in pairs], [f for _, f in pairs])

    @torch.no_grad()
    def apply_to_optimizer_state(self, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        """Zero every per-weight optimizer state (momentum, Adam moments) at masked positions."""
        self._refresh()
        for optimizer in optimizers:
            for parameter, factor in zip(self._parameters, self._factors):
                for value in optimizer.state.get(parameter, {}).values():
                    if isinstance(value, torch.Tensor) and value.shape == factor.shape:
                        value.mul_(factor.to(value.dtype))

    def __bool__(self) -> bool:
        return bool(self.masks)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: mask.cpu().clone() for name, mask in self.masks.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.masks = {}
        self.update(state)
