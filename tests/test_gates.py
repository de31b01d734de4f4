"""Channel gates (plain torch): insertion at the three positions, shared group gates, index tensors on the
model's device, the tie-breaking scores of the threshold search. The gate phase itself: test_gate_search.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_prune.channel_search import search_threshold
from lightning_prune.flops import FlopsPredictor
from lightning_prune.gates import ChannelGates, GatePhaseResult, gate_scores
from lightning_prune.demo.models import build_network
from lightning_prune.diagnostics import count_ops
from lightning_prune.structure import find_channel_groups

X = torch.randn(6, 3, 16, 16)


def _net(arch: str = "resnet20") -> tuple[nn.Module, list]:
    net = build_network(arch, in_channels=3, image_size=16, width=0.25)
    return net, find_channel_groups(net, X[:1])


@pytest.mark.parametrize("position", ["bn", "conv", "bn_weight"])
def test_gates_of_one_are_identity_and_removal_restores_model(position: str) -> None:
    net, groups = _net("mobilenetv2")
    net.eval()
    reference = net(X)
    keys, params = list(net.state_dict()), [id(p) for p in net.parameters()]
    gates = ChannelGates.for_groups(net, groups, position)
    with gates.inserted():
        torch.testing.assert_close(net(X), reference)
        if position != "bn_weight":  # hooks; "bn_weight" parametrizes the BatchNorm weight while attached
            assert list(net.state_dict()) == keys
        for gate in gates.parameters():
            gate.data.mul_(0.5)
        assert not torch.allclose(net(X), reference)
    torch.testing.assert_close(net(X), reference)
    assert list(net.state_dict()) == keys and [id(p) for p in net.parameters()] == params
    assert type(net.features[0][1]) is nn.BatchNorm2d


def test_residual_group_shares_one_gate_and_a_closed_gate_silences_every_coupled_output() -> None:
    net, groups = _net("resnet20")
    gates = ChannelGates.for_groups(net, groups, "bn")
    residual = max(groups, key=lambda g: sum(m.kind == "out" for m in g.members))  # stem + block outputs
    sites = [s for s in gates.sites if s.group == residual.index]
    assert len(sites) >= 3 and len(gates.gates[residual.index]) == residual.size
    outputs = {}
    with gates.inserted():  # recording hooks registered after the gates' run after them
        hooks = [net.get_submodule(s.module).register_forward_hook(lambda m, i, o, n=s.module: outputs.__setitem__(n, o)) for s in sites]
        gates.gates[residual.index].data[0] = 0.0
        net.eval()
        net(X)
        for hook in hooks:
            hook.remove()
    for site in sites:
        assert torch.all(outputs[site.module][:, site.channels[site.group_channels.index(0)]] == 0)


def test_bn_weight_gate_replaces_the_scale_and_leaves_the_shift() -> None:
    bn = nn.BatchNorm2d(4).eval()
    bn.bias.data = torch.arange(4.0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), bn, nn.ReLU(), nn.Conv2d(4, 2, 3))
    groups = find_channel_groups(net, X[:1])
    gates = ChannelGates.for_groups(net, groups, "bn_weight")
    seen = {}
    bn.register_forward_hook(lambda m, i, o: seen.__setitem__("out", o))
    with gates.inserted():
        gates.gates[0].data.zero_()
        net(X)
    assert torch.allclose(seen["out"], torch.arange(4.0).view(1, 4, 1, 1).expand_as(seen["out"]))


def test_scores_break_ties_so_the_search_lands_at_the_target() -> None:
    net, groups = _net("vgg_small")
    sizes = {g.index: g.size for g in groups}
    zeros = {i: torch.zeros(n) for i, n in sizes.items()}  # every gate closed: only the averages differ
    averages = {i: torch.rand(n, generator=torch.Generator().manual_seed(i)) for i, n in sizes.items()}
    scores = gate_scores(GatePhaseResult(zeros, averages, "last", 0, None, 0), groups)
    flat = torch.cat(scores)
    assert flat.unique().numel() == flat.numel()
    for score, average in zip(scores, averages.values()):  # ranked by the average gate
        assert torch.equal(torch.argsort(score), torch.argsort(average))
    predictor = FlopsPredictor(net, X[:1], groups)
    found = search_threshold(scores, 0.5, predictor)
    assert 0.49 <= found.ratio <= 0.5
    # A gate value always outranks the average of a lower gate.
    gates = {i: torch.linspace(0, 1, n) for i, n in sizes.items()}
    scores = gate_scores(GatePhaseResult(gates, {i: 1 - g for i, g in gates.items()}, "last", 0, None, 0), groups)
    assert torch.equal(torch.argsort(scores[0]), torch.arange(sizes[0]))


def test_a_gated_forward_copies_nothing_to_the_device() -> None:
    """Index tensors are built once on the model's device (here "meta", where any host-to-device copy of an
    index shows up as an `aten._to_copy`), and a fully gated module indexes nothing."""
    for arch, position in (("resnet20", "bn"), ("mobilenetv2", "conv"), ("vgg_small", "bn_weight")):
        net, groups = _net(arch)
        net.to("meta")
        gates = ChannelGates.for_groups(net, groups, position)
        x = X.to("meta")
        with gates.inserted():
            _, count = count_ops(net, x)
        assert "aten::_to_copy" not in count.by_op and count.syncs == count.transfers == 0, arch
        if position == "bn":
            assert not any(name.startswith(("aten::index", "aten::_index_put")) for name in count.by_op), arch
