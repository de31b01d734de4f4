"""The structured baselines of the benchmarks (benchmarks/baselines.py) meet their FLOPs targets on resnet20,
checked by an fvcore recount of the physically pruned network, and network slimming's penalty shrinks |gamma|."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from benchmarks.baselines import BatchNormL1, slimming_plan, slimming_scores, torch_pruning_l1, uniform_plan
from lightning_prune import build_network
from lightning_prune.flops import FlopsPredictor, count_flops
from lightning_prune.structure import apply_plan, find_channel_groups
from tests.conftest import make_trainer

RATIOS = (0.75, 0.5, 0.25)
# One fraction (or one pruning ratio) for every group moves resnet20's 16-channel groups in steps of 1/16:
# the closest structure below the target can be this far below it.
UNIFORM_TOLERANCE = 0.05
# A global threshold moves one channel at a time.
THRESHOLD_TOLERANCE = 0.01


@pytest.fixture(scope="module")
def resnet20():
    torch.manual_seed(0)
    model = build_network("resnet20", 10, 3, 32, 1.0)
    x = torch.randn(1, 3, 32, 32)
    groups = find_channel_groups(model, x)
    return model, x, groups, FlopsPredictor(model, x, groups)


def recount(model: nn.Module, groups, plan, x: torch.Tensor) -> float:
    pruned = copy.deepcopy(model)
    apply_plan(pruned, groups, plan, x)
    return count_flops(pruned, x).total / count_flops(model, x).total


@pytest.mark.parametrize("ratio", RATIOS)
def test_uniform_plan_meets_the_target_with_one_fraction_for_every_group(resnet20, ratio: float) -> None:
    model, x, groups, predictor = resnet20
    plan = uniform_plan(groups, predictor, ratio)
    achieved = recount(model, groups, plan, x)
    assert ratio - UNIFORM_TOLERANCE <= achieved <= ratio
    assert achieved == predictor.predict(plan) / predictor.dense
    fractions = [len(plan[g.index]) / g.size for g in groups]
    widest = max(fractions)
    assert all(widest - 1 / g.size < f <= widest for f, g in zip(fractions, groups))  # floor(f * n_g) for one f


@pytest.mark.parametrize("ratio", RATIOS)
def test_torch_pruning_l1_meets_the_target_and_keeps_the_largest_l1_filters(resnet20, ratio: float) -> None:
    model, x, _, _ = resnet20
    pruned = copy.deepcopy(model)
    with torch.no_grad():  # label the inner channels of the first block: the kept labels name the kept filters
        pruned.layers[0].bn1.bias.copy_(torch.arange(16.0))
    pruning_ratio = torch_pruning_l1(pruned, x, ratio, ignored=["fc"])
    achieved = count_flops(pruned, x).total / count_flops(model, x).total
    assert ratio - UNIFORM_TOLERANCE <= achieved <= ratio
    assert 0.0 < pruning_ratio < 1.0
    kept = pruned.layers[0].bn1.bias.detach().long()
    norms = model.layers[0].conv1.weight.detach().abs().flatten(1).sum(1)
    assert torch.equal(kept.sort().values, torch.topk(norms, len(kept)).indices.sort().values)
    assert len(kept) < 16 and pruned.fc.out_features == 10
    assert all(module.training for module in pruned.modules())  # BatchNorm must train on batch statistics again


def test_torch_pruning_l1_refuses_a_bad_ratio_before_pruning(resnet20) -> None:
    model, x, _, _ = resnet20
    pruned = copy.deepcopy(model)
    with pytest.raises(ValueError, match="`flops_ratio`"):
        torch_pruning_l1(pruned, x, 0.0, ignored=["fc"])
    assert all(torch.equal(a, b) for a, b in zip(pruned.state_dict().values(), model.state_dict().values()))


@pytest.mark.parametrize("ratio", RATIOS)
def test_slimming_plan_meets_the_target_and_keeps_the_largest_gammas(resnet20, ratio: float) -> None:
    model, x, groups, predictor = resnet20
    slim = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in slim.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.copy_(torch.rand(module.num_features, generator=generator) * 2 - 1)
    plan = slimming_plan(slim, groups, predictor, ratio)
    achieved = recount(slim, groups, plan, x)
    assert ratio - THRESHOLD_TOLERANCE <= achieved <= ratio
    scores = slimming_scores(slim, groups)
    kept = torch.cat([scores[g][plan[g]] for g in plan])
    dropped = torch.cat([scores[g][torch.isin(torch.arange(len(scores[g])), plan[g], invert=True)] for g in plan])
    assert kept.min() >= dropped.max()  # one global threshold on |gamma|
    stem = next(g for g in groups if any(m.module == "stem.1" for m in g.members))  # the first stage's residual channels
    gammas = [slim.get_submodule(m.module).weight.detach().abs() for m in stem.members if m.kind == "channel"
              and isinstance(slim.get_submodule(m.module), nn.BatchNorm2d)]
    assert len(gammas) == 4 and torch.allclose(scores[stem.index], torch.stack(gammas).mean(0))


def test_slimming_penalty_shrinks_the_batchnorm_scales(tmp_path) -> None:
    from lightning_prune import DigitsDataModule, ImageClassifier

    def mean_gamma(penalty: tuple) -> float:
        torch.manual_seed(0)
        model = ImageClassifier("resnet20", in_channels=3, image_size=32, width=0.25)
        trainer = make_trainer(tmp_path, penalty, max_epochs=1, limit_train_batches=4, limit_val_batches=0)
        trainer.fit(model, DigitsDataModule(image_size=32, channels=3))
        return torch.cat([m.weight.detach().abs() for m in model.modules() if isinstance(m, nn.BatchNorm2d)]).mean().item()

    # each SGD step (lr 0.05) moves |gamma| by lr * lam = 5e-3 towards 0 (momentum adds to it): 4 steps, >= 0.02
    assert mean_gamma((BatchNormL1(0.1),)) < mean_gamma(()) - 0.02
