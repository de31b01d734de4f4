"""Importance criteria and the keep-masks they give: |w| (global or per layer) and Distiller's s·σ threshold.

Every selection runs on the weights' device with memory bounded by the largest layer, and is exact:
the ``k`` smallest |w| are dropped, ties broken by position (layer order, then flat index), so the
result is deterministic. Magnitudes are compared as keys: the bit pattern of ``|w|`` as float32,
which for non-negative floats orders like the value. The usual path reads each weight once: a fixed-seed
sample of the keys brackets the k-th key, one pass (in cache-sized chunks on CPU) writes the masks of
the keys above the bracket and collects the few inside it, which are then ranked exactly. When the
bracket misses the k-th key or holds too many keys (heavy ties), a two-pass radix select finds it: a
32,768-bin histogram of the high 16 bits, then a 65,536-bin histogram of the low 16 bits inside the
one high bin that holds the k-th value.
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
_SAMPLE = (1 << 16, 1 << 20)  # the bracket's sample: total / 64 keys, within these bounds
_CHUNK = 1 << 18  # CPU: keys per step of the bracket pass (its temporaries stay in cache)
_CANDIDATES = 1 << 22  # most keys held inside the bracket (or the largest layer's size, if larger)


def count_to_prune(numel: int, sparsity: float) -> int:
    """round(sparsity · numel): the exact number of zeros a target sparsity asks for."""
    return int(round(sparsity * numel))


def magnitude_keys(weight: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """int32 keys that order like ``|w|``: the float32 bit pattern with the sign bit cleared (−0.0 → 0);
    ``out``: an int32 tensor of ``weight``'s size to write them into."""
    values = weight.detach()
    if values.dtype != torch.float32:
        values = values.float()
    bits = values.contiguous().view(torch.int32)
    return bits & 0x7FFFFFFF if out is None else torch.bitwise_and(bits, 0x7FFFFFFF, out=out)


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


def _bracket(tensors: Sequence[torch.Tensor], k: int, total: int) -> tuple[int, int]:
    """Keys ``(low, high)`` around the k-th smallest key, from a fixed-seed sample: its quantile k/N ± 6σ (+16),
    open-ended where that runs past the sample's ends."""
    size = min(max(total // 64, _SAMPLE[0]), _SAMPLE[1])
    samples = []
    for weight in tensors:
        count = -(-size * weight.numel() // total)
        generator = torch.Generator(device=weight.device).manual_seed(0)
        index = torch.randint(weight.numel(), (count,), generator=generator, device=weight.device)
        samples.append(magnitude_keys(weight.detach().reshape(-1)[index]).to(tensors[0].device))
    keys = torch.cat(samples)
    rank, margin = k / total * keys.numel(), 6 * (keys.numel() * k / total * (1 - k / total)) ** 0.5 + 16
    first, last = int(rank - margin), int(rank + margin)
    low = int(keys.kthvalue(first + 1).values) if first > 0 else 0
    high = int(keys.kthvalue(last + 1).values) if last < keys.numel() - 1 else 0x7FFFFFFF
    return low, high


def _sparse_nonzero(flags: torch.Tensor) -> torch.Tensor:
    """Flat indices of the set flags of a sparse 1-D bool tensor: the 8-byte words holding any first, then
    the flags inside those words (half the time of ``nonzero`` on the whole tensor on CPU)."""
    if flags.numel() % 8:
        return flags.nonzero().reshape(-1)
    words = flags.view(torch.int64).nonzero().reshape(-1)
    inside = flags.view(-1, 8)[words].nonzero()
    return words[inside[:, 0]] * 8 + inside[:, 1]


def _select_in_bracket(
    tensors: Sequence[torch.Tensor], k: int, keep: Sequence[Optional[torch.Tensor]], low: int, high: int
) -> Optional[tuple[list[torch.Tensor], list[int]]]:
    """Keep-masks and dropped counts, dropping the previously masked weights (``keep``) and then the
    smallest keys up to ``k`` in all, when the k-th lies in the key range [low, high] and that range
    holds at most ``_CANDIDATES`` keys; else ``None``. One pass: keys above ``high`` are kept, the keys
    inside are collected (positions) and ranked by (key, position)."""
    budget = max(_CANDIDATES, max(t.numel() for t in tensors))
    masks, inside, kept, held = [], [], [], 0
    for weight, previous in zip(tensors, keep):
        flat = weight.detach().reshape(-1)
        mask = torch.empty(flat.numel(), dtype=torch.bool, device=flat.device)
        chunk = _CHUNK if flat.device.type == "cpu" else flat.numel()
        buffer = torch.empty(min(chunk, flat.numel()), dtype=torch.int32, device=flat.device)
        above = torch.empty(buffer.numel(), dtype=torch.bool, device=flat.device)
        positions, count = [], torch.zeros((), dtype=torch.long, device=flat.device)
        for start in range(0, flat.numel(), chunk):
            stop = min(start + chunk, flat.numel())
            part = magnitude_keys(flat[start:stop], out=buffer[: stop - start])  # a chunk at a time, any dtype
            torch.gt(part, high, out=mask[start:stop])
            flags = torch.ge(part, low, out=above[: stop - start])
            if previous is not None:
                old = previous.reshape(-1)[start:stop]
                mask[start:stop] &= old
                flags &= old
            flags ^= mask[start:stop]
            positions.append(_sparse_nonzero(flags) + start)
            count += mask[start:stop].count_nonzero()
        positions_ = torch.cat(positions)
        held += positions_.numel()
        if held > budget:
            return None
        masks.append(mask)
        inside.append(positions_)
        kept.append(count)
    kept_ = torch.stack([c.to(tensors[0].device) for c in kept]).tolist()
    below = sum(t.numel() for t in tensors) - sum(kept_) - held
    if not below <= k <= below + held:
        return None
    # rank the keys inside the bracket by (key, layer, position) and drop the first k - below: all keys below
    # the (k - below)-th, then the first of its ties by position (the candidates are in layer, position order)
    candidates = torch.cat([magnitude_keys(t.detach().reshape(-1)[p]).to(tensors[0].device) for t, p in zip(tensors, inside)])
    survive = torch.ones(held, dtype=torch.bool, device=candidates.device)
    if k > below:
        threshold = candidates.kthvalue(k - below).values
        torch.ge(candidates, threshold, out=survive)
        ties = k - below - (held - int(survive.sum()))
        survive[(candidates == threshold).nonzero().reshape(-1)[:ties]] = False
    dropped = []
    for mask, positions, part, count in zip(masks, inside, survive.split([p.numel() for p in inside]), kept_):
        part = part.to(mask.device)
        mask[positions[part]] = True
        dropped.append(mask.numel() - count - int(part.sum()))
    return masks, dropped


def _lowest_k(
    weights: Mapping[str, torch.Tensor], k: int, keep: Optional[Mapping[str, torch.Tensor]] = None
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """:func:`lowest_k_masks` and the number of weights each mask drops."""
    names = list(weights)
    tensors = [weights[name] for name in names]
    total = sum(t.numel() for t in tensors)
    previous = [None if keep is None or name not in keep else keep[name].to(weights[name].device) for name in names]
    if 0 < k < total and total > _SAMPLE[0]:
        found = _select_in_bracket(tensors, k, previous, *_bracket(tensors, k, total))
        if found is not None:
            masks = {name: mask.view_as(weights[name]) for name, mask in zip(names, found[0])}
            return masks, dict(zip(names, found[1]))
    masks = _lowest_k_radix(weights, k, keep)
    return masks, {name: int(mask.numel() - mask.count_nonzero()) for name, mask in masks.items()}


def lowest_k_masks(
    weights: Mapping[str, torch.Tensor], k: int, keep: Optional[Mapping[str, torch.Tensor]] = None
) -> dict[str, torch.Tensor]:
    """Keep-masks over all ``weights`` together that drop exactly the ``k`` smallest |w|.

    ``keep`` (optional previous keep-masks, whose dropped weights are zero) wins ties at zero: masked
    weights are dropped before weights that happen to be zero. Ties are broken by position. Masks
    are returned on each weight's device; the previous drops are kept (``& keep``).
    """
    return _lowest_k(weights, k, keep)[0]


def _lowest_k_radix(
    weights: Mapping[str, torch.Tensor], k: int, keep: Optional[Mapping[str, torch.Tensor]] = None
) -> dict[str, torch.Tensor]:
    """:func:`lowest_k_masks` by the two-pass radix select (:func:`kth_smallest_key`), for any ties."""
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
    fixed_drops = 0
    while True:
        free = {name: w for name, w in weights.items() if name not in fixed}
        masks, drops = _lowest_k(free, wanted - fixed_drops, keep)
        if max_drop is None:
            break
        over = [name for name in masks if drops[name] > max_drop[name]]
        if not over:
            break
        for name in over:
            fixed[name], drop = (part[name] for part in _lowest_k({name: weights[name]}, max_drop[name], keep))
            fixed_drops += drop
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
