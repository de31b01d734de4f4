"""The op/sync counter behind the overhead benchmark (counts, never timings)."""

from __future__ import annotations

from collections import Counter

import torch

from lightning_prune.diagnostics import count_ops


def test_each_kind_of_host_synchronisation_counts_once() -> None:
    x = torch.randn(6)
    cases = {
        "item": (lambda: x.sum().item(), "aten::_local_scalar_dense"),
        "float": (lambda: float(x[0]), "aten::_local_scalar_dense"),
        "bool": (lambda: bool(x[0] > 0), "aten::_local_scalar_dense"),
        "tolist": (lambda: x.tolist(), "Tensor.tolist"),
        "cpu": (lambda: x.cpu(), "Tensor.cpu"),
        "nonzero": (lambda: x.gt(0).nonzero(), "aten::nonzero"),
        "boolean mask": (lambda: x[x > 0], "aten::index (boolean mask)"),
        "unique": (lambda: x.unique(), None),
        "equal": (lambda: torch.equal(x, x), "aten::equal"),
    }
    for name, (fn, reason) in cases.items():
        _, count = count_ops(fn)
        assert count.syncs == 1, (name, count.sync_ops)
        if reason is not None:
            assert count.sync_ops == {reason: 1}, name


def test_device_side_work_counts_ops_but_no_sync() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    x = torch.randn(3, 4)

    def step() -> torch.Tensor:
        loss = model(x).square().mean()
        loss.backward()
        mask = model[0].weight.abs().ge(0.1)
        model[0].weight.grad.mul_(mask)
        torch.where(mask, model[0].weight, 0.0)
        return loss.detach()

    loss, count = count_ops(step)
    assert count.syncs == 0 and count.transfers == 0 and count.ops > 10
    assert count.by_op["aten::addmm"] >= 2 and count.by_op["aten::mm"] >= 1  # forward and backward both counted
    for make in (lambda: torch.tensor([1.0, 2.0]), lambda: x.to(model[0].weight.device), lambda: x.to("cpu")):
        _, made = count_ops(make)
        assert made.transfers == 1 and made.syncs == 0  # a possible host-to-device copy, not a sync
    _, cast = count_ops(lambda: x.to(torch.float64))
    assert cast.transfers == 0 and cast.syncs == 0


def own_host_reads(optimizer: torch.optim.Optimizer, steps: int) -> Counter:
    """What ``steps`` steps of an optimizer of ``optimizer``'s kind and settings read on the host by themselves
    (``count_ops``'s ``sync_ops``), on one parameter of its device: Adam's step counter is a host tensor by design,
    read once per step, which ``count_ops`` counts as it counts every read. A sync test of code that steps such an
    optimizer expects exactly these."""
    parameter = torch.nn.Parameter(torch.zeros(1, device=optimizer.param_groups[0]["params"][0].device))
    probe = type(optimizer)([parameter], **optimizer.defaults)
    reads: Counter = Counter()
    for _ in range(steps):
        parameter.grad = torch.ones_like(parameter)
        reads.update(count_ops(probe.step)[1].sync_ops)
    return reads


def test_an_optimizer_keeping_its_step_on_the_host_reads_it_once_per_step() -> None:
    parameter = torch.nn.Parameter(torch.zeros(3))
    assert own_host_reads(torch.optim.Adam([parameter]), 3) == {"aten::_local_scalar_dense": 3}
    assert own_host_reads(torch.optim.SGD([parameter], lr=0.1, momentum=0.9), 3) == {}
