"""Importance criteria and the keep-masks they give: |w| (global or per layer) and Distiller's s·σ threshold.

Every selection runs on the weights' device with memory bounded by the largest layer: the k-th
smallest magnitude over any number of tensors is found by a two-pass radix select on the bit
pattern of ``|w|`` as float32 (for non-negative floats the bit pattern, read as an integer, orders
like the value): a 32,768-bin histogram of the high 16 bits, then a 65,536-bin histogram of the low
16 bits inside the one high bin that holds the k-th value. Ties at the threshold are broken by
position (layer order, then flat index), so the result is deterministic and exactly ``k`` weights
are dropped.
"""

from __future__ import annotations

from typing import Literal, Mapping, Optional, Sequence

import torch

Scope = Literal["global", "layer"]
"""One threshold over all pruned layers, or one per layer."""
Criterion = Literal["magnitude", "sensitivity"]
"""|w| ranking, or Distiller's threshold λ = s·σ."""
Granularity = Literal["element", "channel"]
"""Single weights, or whole output channels (with every coupled layer)."""
ChannelNorm = Literal["l1", "l2"]
"""The norm that ranks a channel."""

_HIGH_BINS = 1 << 15  # bit 31 (sign) is cleared, so the high half holds 15 bits
_LOW_BINS = 1 << 16


def count_to_prune(numel: int, sparsity: float) -> int:
    """round(sparsity · numel): the exact number of zeros a target sparsity asks for."""
    return int(round(sparsity * numel))


def magnitude_keys(weight: torch.Tensor) -> torch.Tensor:
    """int32 keys that order like ``|w|``: the float32 bit pattern with the sign bit cleared (−0.0 → 0)."""
    values = weight.detach()
    if values.dtype != torch.float32:
        values = values.float()
    return values.contiguous().view(torch.int32) & 0x7FFFFFFF


def kth_smallest_key(weights: Sequence[torch.Tensor], k: int) -> tuple[int, int, int]:
    """``(t, below, equal)``: the key of the k-th smallest |w| (1-based) over all ``weights``, how many keys
    are strictly below it and how many equal it; two histogram passes over the weights, one layer at a time."""
    total = sum(w.numel() for w in weights)
    if not 1 <= k <= total:
        raise ValueError(f"`k` must be in [1, {total}], got {k}.")
    device = weights[0].device
    high = torch.zeros(_HIGH_BINS, dtype=torch.long, device=device)
    for weight in weights:
        high += torch.bincount((magnitude_keys(weight) >> 16).flatten(), minlength=_HIGH_BINS).to(device)
    cumulative = high.cumsum(0)
    bin_high = int(torch.searchsorted(cumulative, torch.tensor(k, device=device)))
    below = int(cumulative[bin_high - 1]) if bin_high > 0 else 0
    low = torch.zeros(_LOW_BINS, dtype=torch.long, device=device)
    inside: list[torch.Tensor] = []  # keys in the k-th value's high bin, counted in batches of at most 2^22
    for index, weight in enumerate(weights):
        keys = magnitude_keys(weight).flatten()
        inside.append((keys[(keys >> 16) == bin_high] & 0xFFFF).to(device))
        if index == len(weights) - 1 or sum(part.numel() for part in inside) > 1 << 22:
            low += torch.bincount(torch.cat(inside), minlength=_LOW_BINS)
            inside = []
    cumulative_low = low.cumsum(0)
    bin_low = int(torch.searchsorted(cumulative_low, torch.tensor(k - below, device=device)))
    below += int(cumulative_low[bin_low - 1]) if bin_low > 0 else 0
    return (bin_high << 16) | bin_low, below, int(low[bin_low])


def lowest_k_masks(
    weights: Mapping[str, torch.Tensor], k: int, keep: Optional[Mapping[str, torch.Tensor]] = None
) -> dict[str, torch.Tensor]:
    """Keep-masks over all ``weights`` together that drop exactly the ``k`` smallest |w|.

    ``keep`` (optional previous keep-masks, whose dropped weights are zero) wins ties at zero: masked
    weights are dropped before weights that happen to be zero. Ties are broken by position. Masks
    are returned on each weight's device; the previous drops are kept (``& keep``).
    """
    names = list(weights)
    tensors = [weights[name] for name in names]
    if k <= 0:
        masks = {name: torch.ones_like(weights[name], dtype=torch.bool) for name in names}
    else:
        threshold, below, equal = kth_smallest_key(tensors, min(k, sum(t.numel() for t in tensors)))
        ties = min(k, sum(t.numel() for t in tensors)) - below
        if ties == equal:  # no tie to break (the usual case): one comparison per layer
            masks = {name: magnitude_keys(weight) > threshold for name, weight in zip(names, tensors)}
            ties = 0
        else:
            masks = {name: magnitude_keys(weight) >= threshold for name, weight in zip(names, tensors)}
        if ties and threshold == 0 and keep is not None:  # the previously masked zeros go first
            ties -= sum(int((~keep[name]).sum()) for name in names if name in keep)
            for name in names:
                if name in keep:
                    masks[name] &= keep[name].to(masks[name].device)
        for name, weight in zip(names, tensors):
            if ties <= 0:
                break
            tied = (magnitude_keys(weight) == threshold) & masks[name]
            positions = tied.flatten().nonzero().flatten()[:ties]
            masks[name].view(-1)[positions] = False
            ties -= positions.numel()
    if keep is not None:
        for name in names:
            if name in keep:
                masks[name] &= keep[name].to(masks[name].device)
    return masks


def lowest_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask of ``scores``' shape that drops exactly the ``k`` lowest |scores| (ties by position)."""
    return lowest_k_masks({"": scores}, k)[""]


def global_magnitude_masks(
    weights: Mapping[str, torch.Tensor],
    sparsity: float,
    keep: Optional[Mapping[str, torch.Tensor]] = None,
    max_drop: Optional[Mapping[str, int]] = None,
) -> dict[str, torch.Tensor]:
    """One threshold over all weights: the round(s·N) smallest |w| among the N weights are dropped.

    ``max_drop`` caps the zeros of each layer (the per-layer floor): a layer that the global threshold
    would push past its cap is held at its cap (its own lowest ``max_drop`` weights) and the rest of the
    target is taken, again by one threshold, from the other layers (water-filling; each round fixes at
    least one layer, so it ends). Raises ``ValueError`` if the caps cannot hold round(s·N) zeros.
    """
    wanted = count_to_prune(sum(w.numel() for w in weights.values()), sparsity)
    if max_drop is not None and sum(max_drop[name] for name in weights) < wanted:
        raise ValueError(
            f"`sparsity`={sparsity} asks for {wanted:,} zeros but the per-layer floor (`max_layer_sparsity`) allows "
            f"at most {sum(max_drop[name] for name in weights):,}."
        )
    fixed: dict[str, torch.Tensor] = {}
    while True:
        free = {name: w for name, w in weights.items() if name not in fixed}
        dropped = sum(mask.numel() - int(mask.sum()) for mask in fixed.values())
        masks = lowest_k_masks(free, wanted - dropped, keep)
        if max_drop is None:
            break
        over = [name for name, mask in masks.items() if mask.numel() - int(mask.sum()) > max_drop[name]]
        if not over:
            break
        for name in over:
            fixed[name] = lowest_k_masks({name: weights[name]}, max_drop[name], keep)[name]
    masks.update(fixed)
    return {name: masks[name] for name in weights}


def layer_magnitude_masks(
    weights: Mapping[str, torch.Tensor], sparsity: Mapping[str, float], keep: Optional[Mapping[str, torch.Tensor]] = None
) -> dict[str, torch.Tensor]:
    """Each layer to its own sparsity (Distiller's Level pruner): round(s_l·n_l) smallest |w| dropped."""
    return {
        name: lowest_k_masks({name: w}, count_to_prune(w.numel(), sparsity[name]), keep)[name]
        for name, w in weights.items()
    }


def sensitivity_masks(
    weights: Mapping[str, torch.Tensor], sigmas: Mapping[str, float], sensitivities: Mapping[str, float]
) -> dict[str, torch.Tensor]:
    """Distiller's Sensitivity pruner: drop |w| < λ_l with λ_l = s_l · σ_l (σ of the dense layer)."""
    return {name: w.detach().abs() >= sensitivities[name] * sigmas[name] for name, w in weights.items()}
