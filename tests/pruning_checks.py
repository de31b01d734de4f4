"""Checks shared by the structure and model-zoo tests."""

from __future__ import annotations

import copy

import torch
from torch import nn

from lightning_prune.structure import apply_plan, channel_masks


def masked_and_pruned_outputs(model: nn.Module, x: torch.Tensor, groups, plan) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs (eval mode) of a copy of ``model`` masked by ``channel_masks`` and of a copy physically
    pruned by ``apply_plan``: equal when the masks zero exactly what physical removal removes."""
    masked, pruned = copy.deepcopy(model).eval(), copy.deepcopy(model).eval()
    masks = channel_masks(masked, groups, plan)
    with torch.no_grad():
        for name, parameter in masked.named_parameters():
            if name in masks:
                parameter.mul_(masks[name])
    apply_plan(pruned, groups, plan, x)
    with torch.no_grad():
        return masked(x), pruned(x)


def with_batchnorm_statistics(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with non-trivial BatchNorm affine parameters and running statistics (so a wrongly
    kept or dropped channel shows in the output)."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.5, 0.5)
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()
