"""The framework-free cores in a plain PyTorch loop: each is a ``Pruner``; the page's one loop drives all three; each
core's docstring ``Example::`` runs as written and does what its comments say, and docs/plain_pytorch.md shows exactly
those examples; ``hook_optimizer`` calls the step verbs after a closure's backward and not at a skipped step."""

from __future__ import annotations

from pathlib import Path

import re

import pytest
import torch
from test_docs import _docstring_example
from torch import nn
from torch.nn.utils import parametrize

from lightning_prune import (
    AuxiliaryParameters, GatePruning, GateSearch, MagnitudePruner, Pruner, PruningSchedule, count_flops, find_channel_groups, hook_optimizer,
)

CORES = [MagnitudePruner, AuxiliaryParameters, GateSearch, GatePruning]
PAGE = (Path(__file__).resolve().parents[1] / "docs" / "plain_pytorch.md").read_text()


def _run(core: type) -> dict:
    namespace: dict = {}
    exec(_docstring_example(core), namespace)
    return namespace


def _zeros(weights: list[torch.Tensor]) -> tuple[int, int]:
    return sum(int((w == 0).sum()) for w in weights), sum(w.numel() for w in weights)


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))


def _convnet() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def _one_loop() -> dict:
    """The code block under the page's "One loop for every core" heading, executed."""
    block = re.search(r"## One loop for every core\n.*?```python\n(.*?)```", PAGE, flags=re.S)
    assert block, "docs/plain_pytorch.md lacks the one-loop section"
    namespace: dict = {}
    exec(block.group(1), namespace)
    return namespace


def test_every_core_is_a_pruner() -> None:
    model = _mlp()
    cores = [MagnitudePruner(model, ["0", "2"], 0.5), AuxiliaryParameters(model, ["0", "2"]),
             GateSearch(_convnet(), find_channel_groups(_convnet(), torch.zeros(1, 3, 8, 8)))]
    assert all(isinstance(core, Pruner) for core in cores)
    assert not isinstance(model, Pruner)
    with pytest.raises(ValueError, match="`target` .* got 1.5"):
        cores[2].update(1.5)  # a mean gate above 1


def test_the_pages_one_loop_drives_each_core_to_its_target() -> None:
    train = _one_loop()["train"]
    x = torch.randn(32, 16)
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    pruner = MagnitudePruner(model, ["0", "2"], 0.9)
    train(pruner, optimizer, lambda: nn.functional.mse_loss(model(x), x[:, :4]), 40, PruningSchedule("iterative", 10, 30, 10), pruner.final)
    assert _zeros([model[0].weight, model[2].weight]) == (round(0.9 * 1280), 1280)  # exact, and held through 10 more steps
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    aux = AuxiliaryParameters(model, ["0", "2"])
    train(aux, optimizer, lambda: nn.functional.mse_loss(model(x), x[:, :4]), 20, PruningSchedule("one_shot", 10, 10), 0.8)
    assert _zeros([model[0].weight, model[2].weight]) == (round(0.8 * 1280), 1280)
    assert not any(parametrize.is_parametrized(module) for module in model.modules())
    model, images, labels = _convnet(), torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))
    search = GateSearch(model, find_channel_groups(model, images[:1]), lr=0.1)
    result = train(search, search.optimizer, lambda: nn.functional.cross_entropy(model(images), labels), 5,
                   PruningSchedule("one_shot", 0, 0), 0.3)
    assert search.gate_ratio == 0.3 and search.steps == result.steps == 5  # the target steered r; after_step counted
    assert all(p.requires_grad for p in model.parameters()) and not search.gates.attached  # finalize restored the model
    gates = search.gates.parameter.detach()
    assert float(gates.min()) >= 0 and float(gates.max()) <= 1  # clamped after each step


class _Calls:
    def __init__(self, model: nn.Module) -> None:
        self.model, self.calls = model, []

    def before_step(self) -> None:
        self.calls.append(("before", self.model.weight.grad is not None))

    def after_step(self) -> None:
        self.calls.append(("after", None))


def test_hook_optimizer_calls_before_step_after_a_closures_backward() -> None:
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    calls = _Calls(model)
    handle = hook_optimizer(optimizer, calls)
    seen = []

    def closure() -> torch.Tensor:
        seen.append(len(calls.calls))  # what had run when the closure began
        optimizer.zero_grad(set_to_none=True)
        loss = model(torch.randn(3, 4)).sum()
        loss.backward()
        return loss

    optimizer.step(closure)  # the closure computes the gradients inside step (positional and keyword)
    optimizer.step(closure=closure)
    assert seen == [0, 2] and calls.calls == [("before", True), ("after", None)] * 2
    handle.remove()
    optimizer.step(closure)
    assert len(calls.calls) == 4  # removed: no more calls


def test_masks_hold_under_a_closure_and_a_grad_scaler_skipped_step() -> None:
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2)
    pruner = MagnitudePruner(model, ["0", "2"], 0.7)
    pruner.update(0.7)
    handle = hook_optimizer(optimizer, pruner)
    x = torch.randn(8, 16)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), x[:, :4])
        loss.backward()
        return loss

    for _ in range(3):
        optimizer.step(closure)
    for name, mask in pruner.masks.masks.items():
        parameter = model.get_parameter(name)
        assert not parameter[~mask].any() and not optimizer.state[parameter]["momentum_buffer"][~mask].any(), name
    scaler = torch.amp.GradScaler("cpu")
    calls = _Calls(model[0])
    hook_optimizer(optimizer, calls)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer.zero_grad()
    scaler.scale(nn.functional.mse_loss(model(x), x[:, :4]) * float("inf")).backward()
    scaler.step(optimizer)  # an inf gradient: the step is skipped, and so are both hooks
    scaler.update()
    assert calls.calls == [] and all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    optimizer.zero_grad()
    scaler.scale(nn.functional.mse_loss(model(x), x[:, :4])).backward()
    scaler.step(optimizer)
    assert calls.calls == [("before", True), ("after", None)]
    assert all(not model.get_parameter(name)[~mask].any() for name, mask in pruner.masks.masks.items())
    handle.remove()


def test_magnitude_pruner_example_reaches_the_exact_sparsity_and_keeps_zeros_through_sgd() -> None:
    ns = _run(MagnitudePruner)
    model, pruner, schedule = ns["model"], ns["pruner"], ns["schedule"]
    weights = [model[0].weight, model[2].weight]
    zeros, total = _zeros(weights)
    assert schedule.last_event < 50
    assert zeros == round(0.9 * total)  # exactly round(s·N), after 20 momentum + weight-decay steps
    assert not pruner.masks  # finalize dropped the masks; the zeros stay
    assert not any(optimizer_hooks for optimizer_hooks in (ns["optimizer"]._optimizer_step_pre_hooks, ns["optimizer"]._optimizer_step_post_hooks))


def test_auxiliary_parameters_example_learns_then_settles_to_the_exact_fraction() -> None:
    ns = _run(AuxiliaryParameters)
    model, optimizer = ns["model"], ns["optimizer"]
    assert ns["learned"] > 0.1  # M's own steps switched weights off before settle
    zeros, total = _zeros([model[0].weight, model[2].weight])
    assert zeros == round(0.8 * total)
    assert not any(parametrize.is_parametrized(module) for module in model.modules())
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert {id(p) for p in model.parameters()} == trained  # the optimizer still trains the same tensors


def test_gate_search_example_plans_within_the_flops_budget() -> None:
    ns = _run(GateSearch)
    model, x, found = ns["model"], ns["x"], ns["found"]
    assert ns["search"].steps == ns["result"].steps == 20  # after_step ran at each hooked optimizer step
    assert not any(p.requires_grad is False for p in model.parameters())  # finalize() restored the flags
    assert count_flops(model, x).total == found.flops  # the plan's figure is fvcore's recount
    assert found.ratio <= 0.5
    assert model[0].out_channels < 16 or model[3].out_channels < 32


def test_gate_pruning_example_prunes_to_the_flops_ratio() -> None:
    ns = _run(GatePruning)
    model, x, dense, pruned = ns["model"], ns["x"], ns["dense"], ns["pruned"]
    flops = count_flops(model, x).total
    assert flops <= 0.5 * dense.total
    assert flops == pytest.approx(pruned.flops_ratio * dense.total, abs=0.5)  # the reported ratio is the recount's
    assert ns["search"].result().selected == "best_val"  # a sparse-enough validated snapshot decided
    assert ns["search"].steps == 30 and not ns["search"].gates.attached  # the hooked steps counted; prepare() context restored
    assert not ns["search"].optimizer._optimizer_step_pre_hooks and not ns["search"].optimizer._optimizer_step_post_hooks


@pytest.mark.parametrize("core", CORES, ids=lambda core: core.__name__)
def test_plain_pytorch_page_shows_the_docstring_example(core: type) -> None:
    assert f"```python\n{_docstring_example(core)}\n```" in PAGE, f"docs/plain_pytorch.md lacks {core.__name__}'s example"
