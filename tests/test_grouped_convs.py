"""Grouped convolutions (ResNeXt, RegNet): channel groups through a conv of ``1 < groups < channels`` are pruned
as Torch-Pruning prunes them, by one in-group index of every conv group at a time, so the conv keeps its
``groups`` and every conv group stays equally wide; masked ≡ physically pruned, predicted FLOPs == fvcore's
recount, and ``IterativeMagnitude(granularity="channel", physical=True)`` prunes them in a fit."""

from __future__ import annotations

import copy
import logging

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune import IterativeMagnitude, sparsity_report
from lightning_prune.flops import FlopsPredictor, count_flops
from lightning_prune.structure import (
    apply_plan,
    channel_masks,
    find_channel_groups,
    refused_channel_groups,
    restore_structure,
    structure_record,
)
from lightning_prune.structure.removal import removed_positions, slice_members
from pruning_checks import masked_and_pruned_outputs, with_batchnorm_statistics
from zoo_models import GroupedResidualNet, TinyResNeXt, UnevenGroupedNet, ZooClassifier, build


def grouped_convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and 1 < m.groups < m.out_channels}


def random_plan(groups, generator: torch.Generator) -> dict[int, torch.Tensor]:
    return {
        g.index: torch.randperm(g.size, generator=generator)[: int(torch.randint(1, g.size + 1, (1,), generator=generator))].sort().values
        for g in groups
    }


def assert_consistent(conv: nn.Conv2d, groups: int) -> None:
    """The conv keeps its conv groups, and its widths agree with its weight."""
    assert conv.groups == groups
    assert conv.weight.shape[:2] == (conv.out_channels, conv.in_channels // groups)
    assert conv.in_channels % groups == 0 and conv.out_channels % groups == 0


def test_a_channel_is_one_in_group_index_of_every_conv_group():
    """Block 0's inner width is 4 conv groups of 2 channels: its two groups (into and out of the grouped conv)
    have 2 channels each, channel ``c`` being channels ``c, c+2, c+4, c+6`` of the 1x1 conv and of the BatchNorm,
    and weight column ``c`` of the grouped conv."""
    torch.manual_seed(0)
    model, x = TinyResNeXt().eval(), torch.randn(1, 3, 8, 8)
    groups = {g.root: g for g in find_channel_groups(model, x)}
    into, out_of = groups["blocks.0.conv1"], groups["blocks.0.conv2"]
    assert into.size == out_of.size == 2
    for group, producer in ((into, "blocks.0.conv1"), (out_of, "blocks.0.conv2")):
        member = next(m for m in group.members if m.module == producer and m.kind == "out")
        assert member.positions.tolist() == list(range(8))
        assert member.channels.tolist() == [0, 1] * 4
    column = next(m for m in into.members if m.module == "blocks.0.conv2" and m.kind == "in")
    assert (column.positions.tolist(), column.channels.tolist(), column.dim) == ([0, 1], [0, 1], 2)
    assert [g.size for g in groups.values()] == [16, 2, 2, 3, 3, 24]  # every group: none refused but the output's
    assert [r.root for r in refused_channel_groups(model, x)] == ["fc"]


def test_streams_through_grouped_convs_of_different_cardinality_share_units():
    """A residual stream read and written by a 2-group and a 4-group conv: a unit is an in-group index of both
    (channels ``c, c+4, c+8, c+12``), so 4 units remain and each keeps both convs' conv groups equal."""
    torch.manual_seed(0)
    model, x = GroupedResidualNet().eval(), torch.randn(1, 3, 8, 8)
    (group,) = find_channel_groups(model, x)
    assert group.size == 4
    stem = next(m for m in group.members if m.module == "stem.0")
    assert stem.channels.tolist() == [0, 1, 2, 3] * 4


@pytest.mark.parametrize("net", [TinyResNeXt, GroupedResidualNet])
@pytest.mark.parametrize("seed", range(3))
def test_removal_keeps_conv_groups_consistent_and_computes_what_the_masks_compute(net, seed):
    torch.manual_seed(seed)
    model, x = with_batchnorm_statistics(net()), torch.randn(2, 3, 8, 8)
    cardinality = {name: conv.groups for name, conv in grouped_convs(model).items()}
    groups = find_channel_groups(model, x)
    plan = random_plan(groups, torch.Generator().manual_seed(seed))
    masked, pruned = masked_and_pruned_outputs(model, x, groups, plan)
    assert torch.allclose(masked, pruned, atol=1e-5)
    smaller = copy.deepcopy(model)
    record = apply_plan(smaller, groups, plan, x)
    for name, conv in grouped_convs(smaller).items():
        assert_consistent(conv, cardinality[name])
    assert sum(p.numel() for p in smaller.parameters()) < sum(p.numel() for p in model.parameters())
    # a fresh dense model reshaped by the record loads the pruned weights and computes the same
    fresh = net()
    restore_structure(fresh, record)
    fresh.load_state_dict(smaller.state_dict())
    assert torch.equal(fresh.eval()(x), smaller(x))


def test_a_graph_free_slice_shapes_grouped_convs_as_torch_pruning_does(caplog):
    """:func:`slice_members` (the FLOPs predictor's probes) leaves the shapes, conv groups and outputs that
    :func:`apply_plan` leaves; so the predictor of a ResNeXt with functional pooling probes a shrunk copy instead
    of recounting every plan."""
    torch.manual_seed(0)
    model, x = with_batchnorm_statistics(TinyResNeXt()), torch.randn(2, 3, 8, 8)
    groups = find_channel_groups(model, x)
    plan = random_plan(groups, torch.Generator().manual_seed(1))
    pruned, sliced = copy.deepcopy(model), copy.deepcopy(model)
    record = apply_plan(pruned, groups, plan, x)
    removed = {g.index: ~torch.isin(torch.arange(g.size), plan[g.index]) for g in groups}
    slice_members(dict(sliced.named_modules()), removed_positions(groups, removed))
    assert structure_record(sliced) == record
    with torch.no_grad():
        assert torch.allclose(sliced(x), pruned(x), atol=1e-6)
    with caplog.at_level(logging.INFO, logger="lightning_prune.flops"):
        FlopsPredictor(model, x, groups)
    assert "recount" not in caplog.text


def test_a_group_that_covers_conv_groups_unevenly_is_refused_with_the_reason():
    torch.manual_seed(0)
    model, x = UnevenGroupedNet().eval(), torch.randn(1, 3, 8, 8)
    assert [g.root for g in find_channel_groups(model, x)] == ["grouped"]
    reasons = {r.root: r.reason for r in refused_channel_groups(model, x)}
    for branch in ("left", "right"):
        assert "'grouped': removing a channel would leave its 2 conv groups unequally wide" in reasons[branch]


def test_a_grouped_transposed_conv_is_left_out():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ConvTranspose2d(8, 8, 2, groups=2), nn.Conv2d(8, 4, 1)).eval()
    reasons = {r.root: r.reason for r in refused_channel_groups(model, torch.randn(1, 3, 8, 8))}
    assert "a grouped ConvTranspose2d (groups=2) is not supported" in reasons["0"]


class ZerosAtFitEnd(pl.Callback):
    """The masked model's zeros and its channel plan, read before the pruning callback removes them."""

    def __init__(self, pruning: IterativeMagnitude) -> None:
        self.pruning = pruning

    def on_fit_end(self, trainer, pl_module):  # noqa: ANN001
        self.report = sparsity_report(pl_module)
        self.groups, self.plan = self.pruning.pruner.channels.groups, dict(self.pruning.pruner.plan)


def test_iterative_magnitude_prunes_grouped_conv_groups_to_its_target_and_reports_the_recounted_flops(trainer_factory):
    from test_gate_pruning import ListLogger

    torch.manual_seed(0)
    module, logger = ZooClassifier(TinyResNeXt(), 8), ListLogger()
    dense = copy.deepcopy(module)
    pruning = IterativeMagnitude(0.5, "one_shot", granularity="channel", physical=True, monitor=None, verbose=False)
    zeros = ZerosAtFitEnd(pruning)
    data = TensorDataset(torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,)))
    trainer_factory([zeros, pruning], max_epochs=1, logger=logger).fit(module, DataLoader(data, batch_size=8))
    # the target is met within one channel of the groups (the weights one channel's removal zeroes)
    total = zeros.report.total.total
    largest = max(
        sum(int(mask.numel() - mask.count_nonzero()) for mask in channel_masks(dense, zeros.groups, {g.index: torch.arange(1, g.size)}).values())
        for g in zeros.groups
    )
    assert round(0.5 * total) <= total - zeros.report.total.nonzero <= round(0.5 * total) + largest
    through_grouped = [g for g in zeros.groups if any(m.module.endswith("conv2") for m in g.members)]
    assert len(through_grouped) == 4 and any(len(zeros.plan[g.index]) < g.size for g in through_grouped)
    for name, conv in grouped_convs(module).items():
        assert_consistent(conv, 4)
    assert min(conv.in_channels for conv in grouped_convs(module).values()) < 8  # grouped convs did shrink
    example = pruning.figures.example
    (reported,) = logger.values("prune/flops_ratio")
    assert reported == count_flops(module, example).total / count_flops(dense, example).total < 1


@pytest.mark.zoo
@pytest.mark.parametrize("name, torch_pruning_groups", [("tv_resnext50_32x4d", 38), ("tv_regnet_x_400mf", 50)])
def test_torchvision_grouped_conv_models_prune_every_group_torch_pruning_finds(name, torch_pruning_groups):
    """Every group of Torch-Pruning's ``DependencyGraph`` but the one coupled to the classifier's output is found
    (before grouped convs were covered: 5 on either model); one random plan is masked ≡ pruned, keeps every
    grouped conv's conv groups, and its predicted FLOPs equal fvcore's recount."""
    model, x = build(name)
    with_batchnorm_statistics(model)
    cardinality = {n: conv.groups for n, conv in grouped_convs(model).items()}
    groups = find_channel_groups(model, x)
    assert len(groups) == torch_pruning_groups - 1
    assert [r.reason for r in refused_channel_groups(model, x)] == ["coupled to the model's output"]
    plan = random_plan(groups, torch.Generator().manual_seed(0))
    masked, pruned = masked_and_pruned_outputs(model, x, groups, plan)
    assert torch.allclose(masked, pruned, atol=1e-4, rtol=1e-4)
    smaller = copy.deepcopy(model)
    apply_plan(smaller, groups, plan, x)
    for conv_name, conv in grouped_convs(smaller).items():
        assert_consistent(conv, cardinality[conv_name])
    assert FlopsPredictor(model, x, groups).predict(plan) == count_flops(smaller, x).total
