"""The gate search without a Trainer: the objective, a hooked step (no host sync), the selection rule
with `mode`, the deferred non-finite check, state_dict round trip, the threshold search's target."""

from __future__ import annotations

from typing import Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
import torch.nn.functional as F
from torch import nn

from lightning_prune.flops import FlopsPredictor, count_flops
from lightning_prune.gate_search import GateSearch, reinitialise, snapshot_is_better
from lightning_prune.gates import NonFiniteGateLoss
from lightning_prune.pruner import hook_optimizer
from lightning_prune.demo.models import build_network
from lightning_prune.diagnostics import count_ops
from lightning_prune.structure import apply_plan, find_channel_groups

from test_diagnostics import own_host_reads

X = torch.randn(6, 3, 16, 16)


def _search(arch: str = "resnet20", **kwargs) -> tuple[nn.Module, GateSearch]:
    net = build_network(arch, in_channels=3, image_size=16, width=0.25)
    search = GateSearch(net, find_channel_groups(net, X[:1]), **kwargs)
    hook_optimizer(search.optimizer, search)  # the penalty's gradient before each Adam step, the clamp after
    return net, search


def _step(search: GateSearch, task_loss: torch.Tensor) -> None:
    """One gate step of a plain loop: backward, the hooked Adam step, the loss's non-finite flag (on the device)."""
    search.optimizer.zero_grad(set_to_none=True)
    task_loss.backward()
    search.optimizer.step()
    search.flag_nonfinite(task_loss.detach())


def _batches(n: int = 3, value: float = 1.0) -> list:
    generator = torch.Generator().manual_seed(0)
    return [(value * torch.randn(8, 3, 16, 16, generator=generator), torch.randint(0, 10, (8,), generator=generator)) for _ in range(n)]


def _run(net: nn.Module, search: GateSearch, batches: list, epochs: int = 1) -> None:
    with search.prepare():
        for _ in range(epochs):
            for x, y in batches:
                _step(search, F.cross_entropy(net(x), y))


def test_objective_is_task_loss_plus_ratio_term_plus_l1() -> None:
    _, search = _search("vgg_small", gamma=0.5, gate_ratio=0.2, l1=1e-3)
    search.gates.parameter.data.fill_(0.6)
    task = torch.tensor(1.7)
    expected = 1.7 + 0.5 * (0.6 - 0.2) ** 2 + 1e-3 * 0.6 * search.gates.num_gates
    assert float(search.objective(task).detach()) == pytest.approx(expected, rel=1e-6)


def test_gate_phase_trains_only_gates_clamps_them_and_restores_the_model() -> None:
    net, search = _search(lr=0.05)
    state = {k: v.clone() for k, v in net.state_dict().items()}  # incl. BN running statistics
    net.eval()
    _run(net, search, _batches(), epochs=2)
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    assert not net.training and all(p.requires_grad for p in net.parameters()) and not search.gates.attached
    assert all(p.grad is None for p in net.parameters())
    gates = search.gates.parameter.detach()
    assert gates.min() >= 0 and gates.max() <= 1 and gates.min() < 1
    search.check_finite()
    assert search.steps == search.result().steps == 6


def test_a_step_makes_no_host_sync_and_no_collective() -> None:
    """On the "meta" device (a stand-in for an accelerator); the only host reads are Adam's own step counter (a
    host tensor by design, read once per step). The gate gradient is the (DDP-wrapped) model's to reduce."""
    calls: list[tuple[int, str]] = []

    def reduce(tensor: torch.Tensor, op: str) -> torch.Tensor:
        calls.append((tensor.numel(), op))
        return tensor

    net = build_network("resnet20", in_channels=3, image_size=16, width=0.25)
    groups = find_channel_groups(net, X[:1])
    net.to("meta")
    search = GateSearch(net, groups, reduce=reduce)
    hook_optimizer(search.optimizer, search)
    x, y = X.to("meta"), torch.zeros(6, dtype=torch.long, device="meta")

    def three_steps() -> None:
        for _ in range(3):
            _step(search, F.cross_entropy(net(x), y))

    with search.prepare():
        _, count = count_ops(three_steps)
    assert count.sync_ops == own_host_reads(search.optimizer, 3)
    assert calls == []  # no collective per step: `reduce` serves the validation and check_finite only


def test_selection_keeps_the_best_sparse_enough_snapshot_and_mode_flips_the_choice() -> None:
    assert snapshot_is_better(0.5, 0.2, None, 0.2)
    assert not snapshot_is_better(0.1, 0.21, None, 0.2)  # not sparse enough
    assert not snapshot_is_better(0.6, 0.1, 0.5, 0.2, "min") and snapshot_is_better(0.6, 0.1, 0.5, 0.2, "max")
    chosen: dict[str, Optional[int]] = {}
    for mode in ("min", "max"):
        net, search = _search(mode=mode, gate_ratio=0.9)
        with search.prepare():
            for value in (3.0, 1.0, 2.0):  # a crafted metric: lowest at the 2nd validation, highest at the 1st
                _step(search, F.cross_entropy(net(X), torch.zeros(6, dtype=torch.long)))
                search.gates.parameter.data[:] = 0.0 if value != 2.0 else 1.0  # the 3rd is not sparse enough
                search.validated(value)
        result = search.result()
        assert result.selected == "best_val"
        chosen[mode] = result.step
    assert chosen == {"min": 2, "max": 1}


def test_without_a_sparse_enough_snapshot_the_last_gates_are_kept() -> None:
    net, search = _search(gate_ratio=0.2)
    _run(net, search, _batches(2))
    search.validated(1.0)  # gates still near 1: not sparse enough
    result = search.result()
    assert result.selected == "last" and result.step == 2
    assert torch.equal(torch.cat(list(result.gates.values())), search.gates.parameter.detach())


def test_non_finite_loss_is_raised_at_the_next_read_and_the_model_is_left_as_it_was() -> None:
    net, search = _search("vgg_small")
    state = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(NonFiniteGateLoss, match="Gate phase .* NaN or infinite .* step 2"):
        with search.prepare():
            for index, (x, y) in enumerate(_batches(3)):
                _step(search, F.cross_entropy(net(x * (float("nan") if index == 1 else 1.0)), y))
            search.check_finite()
    assert not search.gates.attached
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())


def test_state_dict_round_trip_continues_like_an_uninterrupted_search() -> None:
    batches = _batches(4)
    torch.manual_seed(0)
    net, straight = _search(lr=0.05, gate_ratio=0.9)
    _run(net, straight, batches)
    straight.validated(0.3)

    net2 = build_network("resnet20", in_channels=3, image_size=16, width=0.25)
    net2.load_state_dict(net.state_dict())
    first = GateSearch(net2, straight.groups, lr=0.05, gate_ratio=0.9)
    hook_optimizer(first.optimizer, first)
    _run(net2, first, batches[:2])
    saved = first.state_dict()
    resumed = GateSearch(net2, straight.groups, lr=0.05, gate_ratio=0.9)
    hook_optimizer(resumed.optimizer, resumed)
    resumed.load_state_dict(saved)
    _run(net2, resumed, batches[2:])
    resumed.validated(0.3)
    torch.testing.assert_close(resumed.gates.parameter, straight.gates.parameter)
    a, b = resumed.result(), straight.result()
    assert a.steps == b.steps == 4
    for group in a.averages:
        torch.testing.assert_close(a.averages[group], b.averages[group])


def test_search_meets_the_flops_target_by_an_fvcore_recount() -> None:
    net, search = _search("resnet20", lr=0.1)
    _run(net, search, _batches(3), epochs=2)
    predictor = FlopsPredictor(net, X[:1], search.groups)
    found = search.search(predictor, 0.5)
    apply_plan(net, search.groups, found.plan, X[:1])
    recount = count_flops(net, X[:1]).total
    assert recount == found.flops and recount <= 0.5 * predictor.dense


def test_before_step_adds_the_penalty_gradient_autograd_would() -> None:
    """The penalty's gradient joins the task loss's in `.grad` (Torch-Pruning's `regularize()`): with l1 on and gates
    strictly inside (0, 1), the sum equals autograd's gradient of task loss + γ(‖Λ‖₁/C − r)² + l1‖Λ‖₁."""
    net, search = _search(gamma=0.7, gate_ratio=0.3, l1=1e-2)
    with torch.no_grad():
        search.gates.parameter.uniform_(0.05, 0.95)
    x, y = _batches(1)[0]
    with search.prepare():
        search.objective(F.cross_entropy(net(x), y)).backward()
        expected = search.gates.parameter.grad.clone()
        search.gates.parameter.grad = None
        F.cross_entropy(net(x), y).backward()
        search.before_step()
    assert torch.allclose(search.gates.parameter.grad, expected, rtol=1e-5, atol=1e-8)


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(st.floats(-10, 10, allow_nan=False), min_size=1, max_size=8),
    sparse=st.lists(st.booleans(), min_size=8, max_size=8),
    mode=st.sampled_from(["min", "max"]),
)
def test_selection_keeps_the_best_value_among_sparse_enough_snapshots(values, sparse, mode) -> None:
    """Property: whatever the sequence of validations, the kept snapshot is the first best value among
    those whose gates were sparse enough, and none when no snapshot was."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 3))
    search = GateSearch(net, find_channel_groups(net, X[:1]), gate_ratio=0.5, mode=mode)
    for index, value in enumerate(values):
        search.gates.parameter.data[:] = torch.tensor([0.0, 0.0, 0.0, 1.0]) if sparse[index] else torch.ones(4)
        search.steps = index + 1
        search.validated(value)
    candidates = [(v, i + 1) for i, v in enumerate(values) if sparse[i]]
    if not candidates:
        assert search.result().selected == "last"
        return
    best = (min if mode == "min" else max)(v for v, _ in candidates)
    expected_step = next(step for v, step in candidates if v == best)
    result = search.result()
    assert result.selected == "best_val" and result.metric == best and result.step == expected_step


def test_reinitialise_redraws_every_layer_of_a_pruned_mobilenetv2_depthwise_convs_included() -> None:
    """init='random': every Conv (the depthwise ones too), Linear and BatchNorm of the pruned network gets PyTorch's
    default initialisation at its new width, BatchNorm running statistics included."""
    torch.manual_seed(0)
    net, x = build_network("mobilenetv2", in_channels=3, image_size=16, width=0.5), torch.randn(1, 3, 16, 16)
    groups = find_channel_groups(net, x)
    apply_plan(net, groups, {g.index: torch.arange(max(1, g.size // 2)) for g in groups}, x)
    with torch.no_grad():
        for tensor in [*net.parameters(), *(b for b in net.buffers() if b.is_floating_point())]:
            tensor.fill_(3.0)  # what the gate phase's random weights were
    reinitialise(net)
    layers = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert any(m.groups > 1 for m in layers if isinstance(m, nn.Conv2d))
    for module in layers:
        fan_in = module.weight[0].numel()  # per output channel: in_channels / groups * kernel area
        assert 0 < module.weight.abs().max() <= fan_in**-0.5  # kaiming_uniform(a=sqrt(5)) bound at the pruned fan-in
    for module in (m for m in net.modules() if isinstance(m, nn.BatchNorm2d)):
        assert torch.equal(module.weight, torch.ones_like(module.weight)) and not module.bias.any()
        assert not module.running_mean.any() and torch.equal(module.running_var, torch.ones_like(module.running_var))
