"""Importance criteria and the keep-masks they give: |w| (global or per layer) and Distiller's s·σ threshold."""

from __future__ import annotations

from typing import Mapping

import torch


def lowest_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask of ``scores``' shape that drops exactly the ``k`` lowest entries.

    Ties are broken by position (a stable sort), so the result is deterministic on every rank.
    """
    flat = scores.flatten()
    keep = torch.ones_like(flat, dtype=torch.bool)
    if k > 0:
        order = torch.sort(flat, stable=True).indices
        keep[order[:k]] = False
    return keep.view_as(scores)


def count_to_prune(numel: int, sparsity: float) -> int:
    """round(sparsity · numel): the exact number of zeros a target sparsity asks for."""
    return int(round(sparsity * numel))


def global_magnitude_masks(weights: Mapping[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """One threshold over all weights: the round(s·N) smallest |w| among the N weights are dropped."""
    names = list(weights)
    magnitudes = torch.cat([weights[name].detach().abs().flatten().float().cpu() for name in names])
    keep = lowest_k_mask(magnitudes, count_to_prune(magnitudes.numel(), sparsity))
    masks, offset = {}, 0
    for name in names:
        size = weights[name].numel()
        masks[name] = keep[offset : offset + size].view(weights[name].shape)
        offset += size
    return masks


def layer_magnitude_masks(weights: Mapping[str, torch.Tensor], sparsity: Mapping[str, float]) -> dict[str, torch.Tensor]:
    """Each layer to its own sparsity (Distiller's Level pruner): round(s_l·n_l) smallest |w| dropped."""
    return {
        name: lowest_k_mask(w.detach().abs().float().cpu(), count_to_prune(w.numel(), sparsity[name]))
        for name, w in weights.items()
    }


def sensitivity_masks(
    weights: Mapping[str, torch.Tensor], sigmas: Mapping[str, float], sensitivities: Mapping[str, float]
) -> dict[str, torch.Tensor]:
    """Distiller's Sensitivity pruner: drop |w| < λ_l with λ_l = s_l · σ_l (σ of the dense layer)."""
    return {
        name: w.detach().abs().float().cpu() >= sensitivities[name] * sigmas[name] for name, w in weights.items()
    }
