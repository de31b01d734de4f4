"""`gate_sites`: "inner" is the authors' placement on every built-in network (read from their gate.py), "all"
gates every group; with "inner" the stem and the residual stream stay at the expanded width, the FLOPs target
stays relative to the unexpanded model and the prediction equals fvcore's recount; after pruning the whole
network is freshly initialised (the authors' train_pruned.py builds the pruned configuration anew)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_prune import GatePruningFromScratch
from lightning_prune.demo.models import build_network
from lightning_prune.flops import count_flops
from lightning_prune.gate_search import GatePruning
from lightning_prune.gates import gate_sites, gated_groups
from lightning_prune.pruner import hook_optimizer
from lightning_prune.structure import find_channel_groups
from test_gate_pruning import LIMITS, Recorder, classifier, digits, flops

MOBILENETV2_EXPANDED_BLOCKS = range(2, 9)  # features[2..8]: the blocks with expand ratio 6
AUTHORS_SITES = {
    # CIFAR basic block: bn1 only (gate.py: new_basicblock_forward)
    "resnet20": {f"layers.{block}.bn1" for block in range(9)},
    "resnet56": {f"layers.{block}.bn1" for block in range(27)},
    # bottleneck: bn1 and bn2, not the stem (new_bottleneck_forward; ResNet-50 has no ConvBNReLU)
    "resnet50": {f"layers.{block}.bn{n}" for block in range(16) for n in (1, 2)},
    # expansion channels (new_inverted_block_forward: after bn1, shared by the depthwise bn2) and every
    # ConvBNReLU: the stem (its channels run through the first block's depthwise conv) and the last conv
    "mobilenetv2": {"features.0.1", "features.1.block.0.1", "features.9.1"}
    | {f"features.{block}.block.{n}.1" for block in MOBILENETV2_EXPANDED_BLOCKS for n in (0, 1)},
    # every conv-BN-ReLU (new_convbn_forward)
    "vgg16": {f"features.{index}.1" for index in (0, 1, 3, 4, 6, 7, 8, 10, 11, 12, 14, 15, 16)},
}
GROUPS = {"resnet20": (9, 12), "resnet56": (27, 30), "resnet50": (32, 37), "mobilenetv2": (9, 14), "vgg16": (13, 13)}
"""(inner groups, all groups) per network."""


@pytest.mark.parametrize("arch", sorted(AUTHORS_SITES))
def test_inner_gates_exactly_the_authors_sites_and_all_gates_every_group(arch) -> None:
    side = 64 if arch == "resnet50" else 32
    model, x = build_network(arch, 10, 3, side), torch.randn(1, 3, side, side)
    groups = find_channel_groups(model, x)
    inner = gated_groups(model, groups, x, "inner")
    assert {site.module for site in gate_sites(model, inner, "bn")} == AUTHORS_SITES[arch]
    assert (len(inner), len(groups)) == GROUPS[arch]
    assert gated_groups(model, groups, x, "all") == groups


def test_inner_on_a_model_without_batchnorm_gates_the_layers_feeding_an_activation() -> None:
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 12), torch.nn.Linear(12, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)
    )
    x = torch.randn(1, 8)
    inner = gated_groups(model, find_channel_groups(model, x), x, "inner")
    assert [group.root for group in inner] == ["0", "3"]  # "2" feeds a layer directly: a linear bottleneck


def test_inner_keeps_the_stem_and_residual_stream_at_the_expanded_width_and_meets_the_unexpanded_target(trainer_factory) -> None:
    model = classifier("resnet20", width=0.25)  # stages of 4, 8, 16 channels
    dense_flops = flops(model)
    pruning = GatePruningFromScratch(flops_ratio=0.5, gate_epochs=1, gate_sites="inner", expansion=2.0, verbose=False)
    trainer_factory([pruning], max_epochs=2, **LIMITS).fit(model, digits())
    network = model.network
    stages = [8] * 3 + [16] * 3 + [32] * 3  # 2 x (4, 8, 16): the expanded widths
    assert network.stem[0].out_channels == 8 and network.fc.in_features == 32  # stem and stream unpruned
    assert [block.conv2.out_channels for block in network.layers] == stages
    inner = [block.conv1.out_channels for block in network.layers]
    assert all(1 <= k <= width for k, width in zip(inner, stages)) and sum(inner) < sum(stages)
    assert sorted(len(gate) for gate in pruning.gates.values()) == sorted(stages)  # one gate per block
    assert flops(model) <= 0.5 * dense_flops  # relative to the unexpanded model
    assert flops(model) / dense_flops == pytest.approx(pruning.reached_flops_ratio, rel=1e-12)  # predicted == fvcore recount


@pytest.mark.parametrize("init", ["random", "inherit"])
def test_random_init_draws_the_whole_pruned_network_afresh(init, trainer_factory) -> None:
    recorder = Recorder()
    pruning = GatePruningFromScratch(flops_ratio=0.6, gate_epochs=1, gate_sites="inner", init=init, verbose=False)
    trainer_factory([pruning, recorder], max_epochs=2, **LIMITS).fit(classifier("resnet20"), digits())
    unpruned = [k for k, v in recorder.pruned.items() if k.endswith("weight") and v.shape == recorder.dense[k].shape]
    assert "network.stem.0.weight" in unpruned and "network.fc.weight" in unpruned
    same = [torch.equal(recorder.pruned[k], recorder.dense[k]) for k in unpruned if recorder.dense[k].dim() > 1]  # conv, linear
    assert all(same) if init == "inherit" else not any(same)


@pytest.mark.parametrize("arch, round_to", [("resnet20", None), ("mobilenetv2", None), ("resnet20", 4)])
def test_gate_pruning_core_prunes_only_inner_groups_to_the_unexpanded_target_without_a_trainer(arch, round_to) -> None:
    x = torch.randn(1, 3, 16, 16)
    dense = count_flops(build_network(arch, 10, 3, 16, width=0.5), x)  # the unexpanded model's FLOPs
    model = build_network(arch, 10, 3, 16, width=0.75)  # the gates learn on a 1.5x wider network
    core = GatePruning(model, x, dense, expanded=True, flops_ratio=0.5, sites="inner", round_to=round_to)
    search = core.search(lr=0.1)
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 16, 16, generator=generator), torch.randint(0, 10, (8,), generator=generator)) for _ in range(3)]
    hook_optimizer(search.optimizer, search)  # the penalty's gradient before each Adam step, the clamp after
    with search.prepare():
        for images, labels in batches:
            search.optimizer.zero_grad()
            F.cross_entropy(model(images), labels).backward()
            search.optimizer.step()
    result = search.result()
    pruned = core.prune(result)
    inner = {group.index for group in core.gated}
    assert set(result.gates) == inner and len(inner) == GROUPS[arch][0]
    for group in core.groups:  # the stream and other ungated groups whole; each count a multiple of round_to
        kept = len(pruned.plan[group.index])
        assert kept == group.size if group.index not in inner else (round_to is None or kept % round_to == 0 or kept == group.size)
    assert any(len(pruned.plan[g]) < core.groups[g].size for g in inner)
    recount = count_flops(model, x).total
    assert recount <= 0.5 * dense.total and recount == round(pruned.flops_ratio * dense.total)  # predicted == fvcore recount


def test_inner_without_an_inner_group_is_refused_before_any_weight_changes() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))  # no activation: a linear bottleneck
    x = torch.randn(1, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"`gate_position`='conv' among the 0 gated of 1 channel groups \(`gate_sites`"):
        GatePruning(model, x, count_flops(model, x), position="conv", sites="inner")
    assert GatePruning(model, x, count_flops(model, x), position="conv", sites="all").gated
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
