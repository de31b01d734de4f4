"""Channel gates (plain torch): insertion at the three positions, shared group gates, the objective,
the gate phase and its selection rule, the tie-breaking scores of the threshold search."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_prune.flops import FlopsPredictor, search_threshold
from lightning_prune.gates import (
    ChannelGates,
    GatePhaseResult,
    NonFiniteGateLoss,
    gate_objective,
    gate_scores,
    learn_gates,
    snapshot_is_better,
)
from lightning_prune.models import build_network
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


def test_objective_is_ce_plus_ratio_term_plus_l1() -> None:
    net, groups = _net("vgg_small")
    gates = ChannelGates.for_groups(net, groups, "bn")
    for gate in gates.parameters():
        gate.data.fill_(0.6)
    logits, targets = torch.randn(5, 10), torch.randint(0, 10, (5,))
    loss, ce = gate_objective(logits, targets, gates, gamma=0.5, gate_ratio=0.2, l1=1e-3)
    expected = nn.functional.cross_entropy(logits, targets) + 0.5 * (0.6 - 0.2) ** 2 + 1e-3 * 0.6 * gates.num_gates
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-6)
    assert float(ce) == pytest.approx(float(nn.functional.cross_entropy(logits, targets)))


def _batches(n: int = 3, value: float = 1.0) -> list:
    generator = torch.Generator().manual_seed(0)
    return [(value * torch.randn(8, 3, 16, 16, generator=generator), torch.randint(0, 10, (8,), generator=generator)) for _ in range(n)]


def test_gate_phase_trains_only_gates_clamps_them_and_restores_the_model() -> None:
    net, groups = _net("resnet20")
    state = {k: v.clone() for k, v in net.state_dict().items()}  # incl. BN running statistics
    net.eval()
    gates = ChannelGates.for_groups(net, groups, "bn")
    seen: list[dict] = []
    result = learn_gates(net, gates, _batches(), epochs=2, lr=0.05, val_batches=_batches(1), on_step=lambda s, m: seen.append(m))
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    assert not net.training and all(p.requires_grad for p in net.parameters()) and not gates.attached
    values = torch.cat(list(result.gates.values()))
    assert values.min() >= 0 and values.max() <= 1 and values.min() < 1
    assert result.steps == 6 and result.selected == "last"  # no snapshot is sparse enough in 6 steps
    assert {"gate/loss", "gate/ce", "gate/mean", "gate/nonzero_fraction"} <= set(seen[0])
    assert sum("gate/val_acc" in m for m in seen) == 2  # one validation per gate epoch


def test_selection_rule_of_the_authors() -> None:
    assert snapshot_is_better(0.5, 0.2, None, 0.2)
    assert not snapshot_is_better(0.9, 0.21, None, 0.2)  # not sparse enough
    assert not snapshot_is_better(0.5, 0.1, 0.5, 0.2)  # not better than the best
    net, groups = _net("vgg_small")
    gates = ChannelGates.for_groups(net, groups, "bn")
    # gate_ratio 1: every snapshot is sparse enough, so the best validation accuracy is kept.
    result = learn_gates(net, gates, _batches(), epochs=3, gate_ratio=1.0, val_batches=_batches(1), val_every=2)
    assert result.selected == "best_val" and result.val_acc is not None and result.step in (2, 4, 6)


def test_non_finite_loss_names_the_gate_phase_and_leaves_the_model() -> None:
    net, groups = _net("vgg_small")
    state = {k: v.clone() for k, v in net.state_dict().items()}
    gates = ChannelGates.for_groups(net, groups, "bn")
    with pytest.raises(NonFiniteGateLoss, match="Gate phase"):
        learn_gates(net, gates, _batches(value=float("nan")), epochs=1)
    assert not gates.attached
    assert all(torch.equal(state[k], v, ) for k, v in net.state_dict().items())


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
