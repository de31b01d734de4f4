"""`MagnitudePruner` and its parts without a Trainer: exact targets, the per-layer floor, tied weights,
channel zero counts, state round trips, and a per-step path with no host synchronisation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_prune.criteria import (
    _bracket, _lowest_k, _lowest_k_radix, _select_in_bracket, global_magnitude_masks, kth_smallest_key, layer_magnitude_masks,
)
from lightning_prune.magnitude import ChannelMagnitude, MagnitudePruner, pack_bits, unpack_bits
from lightning_prune.demo.models import build_network
from lightning_prune.diagnostics import count_ops
from lightning_prune.structure import channel_masks, find_channel_groups


def zeros(masks):
    return sum(int((~m).sum()) for m in masks.values())


@settings(max_examples=60, deadline=None)
@given(
    sparsity=st.floats(0.0, 1.0, exclude_max=True),
    sizes=st.lists(st.integers(1, 300), min_size=1, max_size=5),
    levels=st.sampled_from([None, 3, 50]),
    seed=st.integers(0, 2**16),
)
def test_any_target_sparsity_is_reached_exactly_with_one_threshold(sparsity, sizes, levels, seed):
    generator = torch.Generator().manual_seed(seed)
    weights = {f"w{i}": torch.randn(n, generator=generator) for i, n in enumerate(sizes)}
    if levels is not None:  # many ties: weights on a coarse grid, some exactly zero
        weights = {k: (w * levels).round() / levels for k, w in weights.items()}
    masks = global_magnitude_masks(weights, sparsity)
    assert zeros(masks) == round(sparsity * sum(sizes))  # the documented count, not count_to_prune's own answer
    per_layer = layer_magnitude_masks(weights, {k: sparsity for k in weights})
    assert all(zeros({k: m}) == round(sparsity * weights[k].numel()) for k, m in per_layer.items())
    dropped = torch.cat([weights[k][~m].abs() for k, m in masks.items()])
    kept = torch.cat([weights[k][m].abs() for k, m in masks.items()])
    if dropped.numel() and kept.numel():
        assert dropped.max() <= kept.min()


@settings(max_examples=30, deadline=None)
@given(first=st.floats(0.0, 0.9), more=st.floats(0.0, 0.09), seed=st.integers(0, 2**16))
def test_previously_masked_weights_go_first_and_the_count_stays_exact(first, more, seed):
    generator = torch.Generator().manual_seed(seed)
    weights = {"a": (torch.randn(200, generator=generator) * 2).round(), "b": (torch.randn(77, generator=generator) * 2).round()}
    previous = global_magnitude_masks(weights, first)
    masked = {k: w * previous[k] for k, w in weights.items()}
    masks = global_magnitude_masks(masked, first + more, keep=previous)
    assert zeros(masks) == round((first + more) * 277)
    assert all(not (m & ~previous[k]).any() for k, m in masks.items())  # nothing masked grows back


def test_radix_select_finds_the_kth_smallest_magnitude():
    values = torch.randn(10_000) * torch.logspace(-20, 20, 10_000)
    for k in (1, 17, 5_000, 10_000):
        key, below, equal = kth_smallest_key([values[:3000], values[3000:]], k)
        expected = values.abs().sort().values[k - 1]
        assert torch.tensor(key, dtype=torch.int32).view(torch.float32) == expected
        assert below == int((values.abs() < expected).sum()) and equal == int((values.abs() == expected).sum())


def reference_masks(weights, k, keep):
    """The definition: previously masked weights first, then (|w|, layer, position) ascending; drop the first k."""
    flat = torch.cat([w.detach().float().abs().flatten() for w in weights.values()])
    masked = torch.cat([~keep[n].flatten() for n in weights])
    order = torch.sort(torch.where(masked, -1.0, flat), stable=True).indices
    kept = torch.ones_like(flat, dtype=torch.bool)
    kept[order[:k]] = False
    return dict(zip(weights, (part.view_as(w) for part, w in zip(kept.split([w.numel() for w in weights.values()]), weights.values()))))


@pytest.mark.parametrize("levels", [None, 3, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_one_pass_bracket_select_drops_exactly_the_k_smallest_and_the_radix_fallback_agrees(levels, dtype):
    """Big enough for the sampled bracket (> 65,536 weights, several CPU chunks), with ties and previous masks."""
    generator = torch.Generator().manual_seed(0)
    weights = {"a": torch.randn(300_001, generator=generator), "b": torch.randn(70, 1_000, generator=generator) * 3}
    if levels is not None:  # coarse grid: many ties at the threshold
        weights = {n: (w * levels).round() / levels for n, w in weights.items()}
    weights = {n: w.to(dtype) for n, w in weights.items()}
    total = sum(w.numel() for w in weights.values())
    previous = _lowest_k(weights, total // 2)[0]
    weights = {n: w * previous[n] for n, w in weights.items()}
    for k in (total // 2, total // 2 + 1, int(0.6 * total) + 7, total - 3):
        tensors = list(weights.values())
        found = _select_in_bracket(tensors, k, list(previous.values()), *_bracket(tensors, k, total))
        assert found is not None  # the sampled bracket held the k-th key
        expected = reference_masks(weights, k, previous)
        assert all(torch.equal(mask.view_as(expected[n]), expected[n]) for n, mask in zip(weights, found[0]))
        assert found[1] == [int((~expected[n]).sum()) for n in weights]
        radix = _lowest_k_radix(weights, k, previous)
        assert all(torch.equal(radix[n], expected[n]) for n in weights)


def test_a_bracket_that_misses_falls_back_to_the_radix_select():
    weights = {"a": torch.randn(100_000, generator=torch.Generator().manual_seed(1))}
    previous = _lowest_k(weights, 60_000)[0]
    weights = {"a": weights["a"] * previous["a"]}
    tensors = list(weights.values())
    assert _select_in_bracket(tensors, 50_000, [previous["a"]], *_bracket(tensors, 50_000, 100_000)) is None  # k < masked
    masks, drops = _lowest_k(weights, 50_000, previous)
    assert torch.equal(masks["a"], previous["a"]) and drops == {"a": 60_000}  # the previous drops stay


def test_the_per_layer_floor_keeps_every_layer_alive_and_the_total_exact():
    weights = {"big": torch.randn(1000), "tiny": torch.randn(100) * 1e-4}  # global |w| would empty "tiny"
    assert zeros({"t": global_magnitude_masks(weights, 0.8)["tiny"]}) == 100
    masks = global_magnitude_masks(weights, 0.8, max_drop={"big": 990, "tiny": 90})
    assert int((~masks["tiny"]).sum()) == 90 and zeros(masks) == 880
    with pytest.raises(ValueError, match="max_layer_sparsity"):
        global_magnitude_masks(weights, 0.95, max_drop={"big": 900, "tiny": 90})


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(16, 16)
        self.decoder = nn.Linear(16, 16)
        self.decoder.weight = self.encoder.weight
        self.head = nn.Linear(16, 4)


def test_a_shared_weight_is_counted_once_and_the_target_is_exact():
    model = Tied()
    pruner = MagnitudePruner(model, ["encoder", "decoder", "head"], 0.75)
    pruner.update(pruner.final)
    assert list(pruner.weights) == ["encoder.weight", "head.weight"]
    assert int((model.encoder.weight == 0).sum() + (model.head.weight == 0).sum()) == round(0.75 * (256 + 64))


def test_layer_scope_sensitivity_and_rewind_and_state_round_trip():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))
    pruner = MagnitudePruner(model, ["0", "2"], {"0": 0.5, "2": 0.2}, scope="layer")
    pruner.remember()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        model[0].weight.add_(0.1)
    pruner.update(pruner.final)
    assert int((model[0].weight == 0).sum()) == 300 and int((model[2].weight == 0).sum()) == 30
    kept = model[0].weight != 0
    assert torch.equal(model[0].weight[kept], initial["0.weight"][kept])  # rewound survivors
    fresh = MagnitudePruner(model, ["0", "2"], {"0": 0.5, "2": 0.2}, scope="layer")
    fresh.load_state_dict(pruner.state_dict())
    assert all(torch.equal(fresh.masks.masks[k], m) for k, m in pruner.masks.masks.items())
    sensitive = MagnitudePruner(nn.Sequential(nn.Linear(50, 50)), ["0"], 0.0, criterion="sensitivity", sensitivity=1.0)
    w = sensitive.model[0].weight.detach().clone()
    sensitive.update(0.5)  # half of its final sensitivity 1.0
    assert torch.equal(sensitive.model[0].weight == 0, w.abs() < 0.5 * w.std())


def test_pack_and_unpack_bits_round_trip():
    flags = torch.rand(1001) < 0.3
    packed = pack_bits(flags)
    assert packed.dtype == torch.uint8 and packed.numel() == 126
    assert torch.equal(unpack_bits(packed, 1001), flags)


@pytest.mark.parametrize("target", [0.2, 0.5, 0.8])
def test_channel_zero_counts_from_channel_sizes_equal_the_masks(target):
    model = build_network("resnet20", num_classes=10, in_channels=3, image_size=8, width=0.5)
    groups = find_channel_groups(model, torch.zeros(1, 3, 8, 8), ignored_layers=["fc"])
    names = [n for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1]
    search = ChannelMagnitude(groups, names, {n: p.shape for n, p in model.named_parameters()}, "l1", 0.99)
    drop = search.decide(model, target)
    masks = channel_masks(model, groups, search.plan(drop))
    zeros_made = sum(int((masks[n] == 0).sum()) for n in names if n in masks)
    total = sum(model.get_parameter(n).numel() for n in names)
    assert zeros_made >= round(target * total)
    # the fewest channels: without the last one dropped the target is not met
    last = max(((g, c) for g, d in enumerate(drop) for c in d.nonzero().flatten().tolist()),
               key=lambda gc: float(search.scores(model)[gc[0]][gc[1]]))
    drop[last[0]][last[1]] = False
    masks = channel_masks(model, groups, search.plan(drop))
    assert sum(int((masks[n] == 0).sum()) for n in names if n in masks) < round(target * total)


def test_channel_pruning_takes_a_per_layer_sparsity_mapping_under_layer_scope():
    model = build_network("vgg_small", num_classes=10, in_channels=3, image_size=8)
    layers = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    channels = ChannelMagnitude.for_model(model, torch.zeros(1, 3, 8, 8), layers, "l1", 0.99)
    pruner = MagnitudePruner(model, layers, {layers[0]: 0.5}, scope="layer", channels=channels)
    pruner.update(pruner.final)
    first = model.get_submodule(layers[0]).weight
    assert (first.flatten(1).abs().sum(1) == 0).float().mean() >= 0.5  # half its output channels, as asked
    assert all(model.get_submodule(name).weight.flatten(1).abs().sum(1).all() for name in layers[2:])  # the rest untouched


def test_the_per_step_mask_path_has_no_host_sync_and_only_in_place_fused_ops():
    model = build_network("resnet20", num_classes=10, in_channels=3, image_size=8, width=0.5)
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    pruner = MagnitudePruner(model, layers, 0.7)
    pruner.update(pruner.final)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    _, count = count_ops(lambda: (pruner.before_step(), pruner.after_step()))
    assert count.syncs == 0 and count.transfers == 0
    assert count.by_op == {"aten::_foreach_mul_": 2}  # one fused multiply each
    assert all(not p.grad[~m].any() for p, m in ((model.get_parameter(n), m) for n, m in pruner.masks.masks.items()))


@pytest.mark.zoo
def test_torchvision_mobilenet_v2_at_80_percent_keeps_every_layer_alive():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(num_classes=1000)
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    pruner = MagnitudePruner(model, layers, 0.8)  # default max_layer_sparsity=0.99
    pruner.update(pruner.final)
    sizes = {n: model.get_parameter(n).numel() for n in pruner.weights}
    zeros_per_layer = {n: int((model.get_parameter(n) == 0).sum()) for n in sizes}
    assert sum(zeros_per_layer.values()) == round(0.8 * sum(sizes.values()))
    assert all(zeros_per_layer[n] <= int(0.99 * sizes[n]) for n in sizes)
    assert not pruner.emptied_layers()
