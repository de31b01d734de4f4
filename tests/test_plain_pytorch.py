"""The framework-free cores in a plain PyTorch loop: each core's docstring ``Example::`` runs as written and does
what its comments say, and docs/plain_pytorch.md shows exactly those examples."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_docs import _docstring_example
from torch.nn.utils import parametrize

from lightning_prune import AuxiliaryParameters, GatePruning, GateSearch, MagnitudePruner, count_flops

CORES = [MagnitudePruner, AuxiliaryParameters, GateSearch, GatePruning]
PAGE = (Path(__file__).resolve().parents[1] / "docs" / "plain_pytorch.md").read_text()


def _run(core: type) -> dict:
    namespace: dict = {}
    exec(_docstring_example(core), namespace)
    return namespace


def _zeros(weights: list[torch.Tensor]) -> tuple[int, int]:
    return sum(int((w == 0).sum()) for w in weights), sum(w.numel() for w in weights)


def test_magnitude_pruner_example_reaches_the_exact_sparsity_and_keeps_zeros_through_sgd() -> None:
    ns = _run(MagnitudePruner)
    model, pruner = ns["model"], ns["pruner"]
    weights = [model[0].weight, model[2].weight]
    zeros, total = _zeros(weights)
    assert pruner.schedule_complete
    assert zeros == round(0.9 * total)  # exactly round(s·N), after 20 momentum + weight-decay steps
    for name, mask in pruner.masks.masks.items():
        assert torch.equal(model.get_parameter(name).detach() == 0, ~mask), name  # zeros exactly where masked


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
    assert ns["search"].steps == 20
    assert not any(p.requires_grad is False for p in model.parameters())  # running() restored the flags
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
    assert set(ns["metrics"]) >= {"gate/loss", "gate/mean", "gate/nonzero_fraction"}


@pytest.mark.parametrize("core", CORES, ids=lambda core: core.__name__)
def test_plain_pytorch_page_shows_the_docstring_example(core: type) -> None:
    assert f"```python\n{_docstring_example(core)}\n```" in PAGE, f"docs/plain_pytorch.md lacks {core.__name__}'s example"
