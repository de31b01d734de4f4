"""fvcore counting, the FLOPs predictor and the FLOPs-constrained threshold search."""

from __future__ import annotations

import copy
import logging
import math
import warnings

import pytest
import torch
from torch import nn

from lightning_prune import ImageClassifier, flops
from lightning_prune.channel_search import search_threshold
from lightning_prune.flops import FlopsPredictor, count_flops
from lightning_prune.demo.models import build_network
from lightning_prune.structure import apply_plan, channel_norms, find_channel_groups
from task_models import UNet
from zoo_models import GroupedResidualNet, TinyResNeXt, build, small_resnext


def resnet(depth: int = 56, size: int = 8) -> tuple[nn.Module, torch.Tensor]:
    model = build_network(f"resnet{depth}", num_classes=10, in_channels=3, image_size=size)
    return model, torch.randn(1, 3, size, size)


def test_one_multiply_add_is_one_flop():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(4 * 8 * 8, 5))
    count = count_flops(model, torch.zeros(2, 3, 8, 8))
    assert count.by_module["0"] == 2 * 8 * 8 * 4 * 3 * 3 * 3  # N * H * W * C_out * C_in * k * k
    assert count.by_module["2"] == 2 * 256 * 5
    assert count.total == count.by_module[""] == count.by_module["0"] + count.by_module["2"]


def test_count_flops_is_quiet_reports_unsupported_once_and_restores_modes(caplog, monkeypatch):
    monkeypatch.setattr(flops, "_reported_operators", set())
    model, x = resnet(20)
    model.train()
    model.stem[1].eval()
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        first = count_flops(model, x)
        second = count_flops(model, x)
    assert caught == []
    assert first == second and first.unsupported == {"aten::add": 9}
    records = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(records) == 1 and records[0].name == "lightning_prune.flops" and "aten::add" in records[0].message
    assert model.training and model.layers[0].bn1.training and not model.stem[1].training


def test_count_flops_unwraps_and_sees_batchnorm_in_eval_mode():
    model, x = resnet(20)
    wrapped = nn.DataParallel(model)
    count = count_flops(wrapped, x)
    assert count.total == count_flops(model.train(), x).total
    assert count.by_module["stem.1"] == 2 * 16 * 8 * 8  # eval-mode BatchNorm: 2 FLOPs per element


def test_predictor_of_a_lightning_module_uses_its_names_and_is_exact():
    module = ImageClassifier("resnet20", in_channels=3, image_size=8)
    x = torch.randn(2, 3, 8, 8)
    groups = find_channel_groups(module, x)
    predictor = FlopsPredictor(module, x, groups)
    plan = {g.index: torch.arange(1 + g.size // 3) for g in groups}
    pruned = copy.deepcopy(module)
    apply_plan(pruned, groups, plan, x)
    assert groups[0].root == "network.stem.0"
    assert predictor.predict(plan) == count_flops(pruned, x).total < predictor.dense
    with pytest.raises(ValueError, match="groups"):
        FlopsPredictor(module.network, x, groups)


def test_min_flops_keeps_min_channels_per_group():
    model, x = resnet(20)
    groups = find_channel_groups(model, x)
    predictor = FlopsPredictor(model, x, groups)
    plan = {g.index: torch.arange(2) for g in groups}
    assert predictor.min_flops(2) == predictor.predict(plan)
    assert predictor.min_flops(1) < predictor.min_flops(2) < predictor.dense
    assert predictor.min_flops(10**6) == predictor.dense
    with pytest.raises(ValueError, match="min_channels"):
        predictor.min_flops(0)


@pytest.fixture(scope="module")
def resnet56_search():
    torch.manual_seed(0)
    model, x = resnet(56, size=32)
    groups = find_channel_groups(model, x)
    return model, x, groups, FlopsPredictor(model, x, groups)


@pytest.mark.parametrize("flops_ratio", [0.25, 0.5, 0.75])
def test_search_lands_at_or_below_the_target_within_two_percent(resnet56_search, flops_ratio):
    model, x, groups, predictor = resnet56_search
    scores = channel_norms(model, groups, "l1")
    result = search_threshold(scores, flops_ratio, predictor)
    assert flops_ratio - 0.02 <= result.ratio <= flops_ratio
    assert result.flops == predictor.predict(result.plan) and result.ratio == result.flops / predictor.dense
    for group, score in zip(groups, scores):
        kept = result.plan[group.index]
        assert len(kept) >= 1
        assert bool((score[kept] >= result.threshold).all() or len(kept) == 1)
    if flops_ratio == 0.5:
        pruned = copy.deepcopy(model)
        apply_plan(pruned, groups, result.plan, x)
        assert count_flops(pruned, x).total == result.flops
        assert pruned(x).shape == model(x).shape


def test_search_keeps_min_channels_and_everything_at_ratio_one(resnet56_search):
    _, _, groups, predictor = resnet56_search
    scores = [torch.rand(g.size) for g in groups]
    result = search_threshold(scores, 0.3, predictor, min_channels=4)
    assert all(len(result.plan[g.index]) >= min(4, g.size) for g in groups)
    full = search_threshold(scores, 1.0, predictor)
    assert full.flops == predictor.dense and full.threshold == min(float(s.min()) for s in scores)


def test_search_with_equal_scores_removes_them_together(resnet56_search):
    _, _, groups, predictor = resnet56_search
    result = search_threshold([torch.ones(g.size) for g in groups], 0.5, predictor, min_channels=2)
    assert result.flops == predictor.min_flops(2) and result.threshold > 1.0


@pytest.mark.parametrize("flops_ratio", [0.0, -0.5, 1.01, math.nan])
def test_search_rejects_ratios_outside_zero_one(resnet56_search, flops_ratio):
    _, _, groups, predictor = resnet56_search
    with pytest.raises(ValueError, match=r"`flops_ratio` must be in \(0, 1\]"):
        search_threshold([torch.rand(g.size) for g in groups], flops_ratio, predictor)


def test_search_rejects_an_unreachable_target_giving_the_smallest_ratio(resnet56_search):
    _, _, groups, predictor = resnet56_search
    smallest = predictor.min_flops(8) / predictor.dense
    with pytest.raises(ValueError, match=f"smallest reachable ratio {smallest:.6f}"):
        search_threshold([torch.rand(g.size) for g in groups], smallest * 0.9, predictor, min_channels=8)


def test_search_rejects_scores_that_do_not_match_the_groups(resnet56_search):
    _, _, groups, predictor = resnet56_search
    with pytest.raises(ValueError, match="scores"):
        search_threshold([torch.rand(g.size + 1) for g in groups], 0.5, predictor)
    with pytest.raises(ValueError, match="NaN"):
        search_threshold([torch.full((g.size,), math.nan) for g in groups], 0.5, predictor)


class FunctionalPooling(nn.Module):
    """Pooling called functionally in ``forward`` (as in MobileNetV2), over one group's channels or,
    with ``concatenate``, over a concatenation of two groups (as in DenseNet)."""

    def __init__(self, concatenate: bool) -> None:
        super().__init__()
        self.concatenate = concatenate
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.fc = nn.Linear(14 if concatenate else 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a(x)
        x = torch.cat([x, self.b(x)], 1) if self.concatenate else self.b(x)
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))


@pytest.mark.parametrize("concatenate", [False, True])
@pytest.mark.parametrize("seed", range(2))
def test_predictor_is_exact_with_functional_ops_in_forward(concatenate, seed):
    model, x = FunctionalPooling(concatenate).eval(), torch.randn(1, 3, 8, 8)
    groups = find_channel_groups(model, x)
    assert len(groups) == 2
    predictor = FlopsPredictor(model, x, groups)
    generator = torch.Generator().manual_seed(seed)
    plan = {g.index: torch.randperm(g.size, generator=generator)[: 1 + seed].sort().values for g in groups}
    pruned = copy.deepcopy(model)
    apply_plan(pruned, groups, plan, x)
    assert predictor.predict(plan) == count_flops(pruned, x).total


def test_scaled_dot_product_attention_is_counted():
    class Attention(nn.Module):
        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    q, k, v = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 7, 4), torch.randn(2, 3, 7, 6)
    # q @ k^T: 2*3 * 5*7*4 multiply-adds; attn @ v: 2*3 * 5*7*6
    assert count_flops(Attention(), (q, k, v)).total == 2 * 3 * 5 * 7 * (4 + 6)


class DenseBlock(nn.Module):
    """A DenseNet-style block: each layer (BatchNorm, ReLU, 3x3 conv) sees the concatenation of the stem's and
    every earlier layer's channels; BatchNorm, ReLU and ``F.adaptive_avg_pool2d`` over the whole concatenation
    in ``forward``, then a Linear classifier (as torchvision's DenseNet)."""

    def __init__(self, stem: int = 6, growth: int = 4, layers: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, stem, 3, padding=1)
        self.layers = nn.ModuleList(
            nn.Sequential(nn.BatchNorm2d(stem + i * growth), nn.ReLU(), nn.Conv2d(stem + i * growth, growth, 3, padding=1))
            for i in range(layers)
        )
        self.norm = nn.BatchNorm2d(stem + layers * growth)
        self.fc = nn.Linear(stem + layers * growth, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [self.stem(x)]
        for layer in self.layers:
            features.append(layer(torch.cat(features, 1)))
        x = torch.relu(self.norm(torch.cat(features, 1)))
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))


def test_a_pooled_concatenation_of_many_groups_is_predicted_without_recounting(caplog):
    model, x = DenseBlock().eval(), torch.randn(1, 3, 8, 8)
    groups = find_channel_groups(model, x)
    assert len(groups) == 4
    with caplog.at_level(logging.INFO, logger="lightning_prune.flops"):
        predictor = FlopsPredictor(model, x, groups)
    assert "recount" not in caplog.text
    for seed in range(3):
        generator = torch.Generator().manual_seed(seed)
        plan = {g.index: torch.randperm(g.size, generator=generator)[: 1 + seed].sort().values for g in groups}
        pruned = copy.deepcopy(model)
        apply_plan(pruned, groups, plan, x)
        assert predictor.predict(plan) == count_flops(pruned, x).total


def _transformer(name: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A tiny Hugging Face BERT (sdpa attention, a padded batch) or ViT (eager attention), random weights."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    shape = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    if name == "bert":
        model = transformers.BertForSequenceClassification(transformers.BertConfig(**shape, vocab_size=100))
        mask = torch.ones(2, 8, dtype=torch.long)
        mask[0, -2:] = 0
        return model.eval(), {"input_ids": torch.randint(0, 100, (2, 8)), "attention_mask": mask}
    config = transformers.ViTConfig(**shape, image_size=16, patch_size=8, num_labels=3, attn_implementation="eager")
    return transformers.ViTForImageClassification(config).eval(), {"pixel_values": torch.randn(1, 3, 16, 16)}


_PROPERTY_MODELS = {
    "hf_bert": lambda: _transformer("bert"),
    "hf_vit": lambda: _transformer("vit"),
    "resnet20": lambda: resnet(20, 8),
    "functional_concat": lambda: (FunctionalPooling(concatenate=True).eval(), torch.randn(1, 3, 8, 8)),
    "unet": lambda: (UNet().eval(), torch.randn(1, 1, 16, 16)),
    "dense_block": lambda: (DenseBlock().eval(), torch.randn(1, 3, 8, 8)),
    "tiny_resnext": lambda: (TinyResNeXt().eval(), torch.randn(1, 3, 8, 8)),
    "grouped_residual": lambda: (GroupedResidualNet().eval(), torch.randn(1, 3, 8, 8)),
    "tv_small_resnext": lambda: (small_resnext().eval(), torch.randn(1, 3, 32, 32)),
    "tv_regnet_x_400mf": lambda: build("tv_regnet_x_400mf"),
}
_ZOO_PROPERTY_MODELS = {"tv_small_resnext", "tv_regnet_x_400mf"}
"""Rows that need torchvision: marked ``zoo``."""
_discovered: dict = {}


def _discover(name: str):
    if name not in _discovered:
        model, x = _PROPERTY_MODELS[name]()
        groups = find_channel_groups(model, x, heads=True)
        _discovered[name] = (model, x, groups, FlopsPredictor(model, x, groups))
    return _discovered[name]


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.zoo) if n in _ZOO_PROPERTY_MODELS else n for n in sorted(_PROPERTY_MODELS)]
)
def test_any_plan_is_predicted_exactly(name):
    """Property: for any plan (any non-empty subset of each group's channels, attention heads and grouped convs'
    in-group indices included), the predicted FLOPs equal fvcore's recount of the physically pruned model."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    model, x, groups, predictor = _discover(name)

    @settings(max_examples=10, deadline=None, derandomize=True)
    @given(st.data())
    def check(data):
        plan = {
            g.index: torch.tensor(sorted(data.draw(st.sets(st.integers(0, g.size - 1), min_size=1, max_size=g.size))))
            for g in groups
            if data.draw(st.booleans())
        }
        pruned = copy.deepcopy(model)
        apply_plan(pruned, groups, plan, x)
        assert predictor.predict(plan) == count_flops(pruned, x).total

    check()


@pytest.mark.parametrize("round_to", [8, 16])
def test_round_to_keeps_multiples_and_still_meets_the_target_by_an_fvcore_recount(resnet56_search, round_to):
    model, x, groups, predictor = resnet56_search
    scores = channel_norms(model, groups, "l1")
    result = search_threshold(scores, 0.5, predictor, round_to=round_to)
    kept = [len(result.plan[g.index]) for g in groups]
    assert all(k % round_to == 0 and k >= round_to for k in kept)  # resnet56's groups: 16, 32, 64 channels
    assert any(k < g.size for k, g in zip(kept, groups))
    assert 0.5 - 0.05 <= result.ratio <= 0.5
    for group, score in zip(groups, scores):  # each group keeps its best channels
        chosen = score[result.plan[group.index]]
        dropped = torch.ones(group.size, dtype=torch.bool)
        dropped[result.plan[group.index]] = False
        assert not dropped.any() or float(chosen.min()) >= float(score[dropped].max())
    pruned = copy.deepcopy(model)
    apply_plan(pruned, groups, result.plan, x)
    assert count_flops(pruned, x).total == result.flops


def test_round_to_keeps_a_group_smaller_than_the_multiple_whole():
    model = build_network("vgg_small", num_classes=10, in_channels=3, image_size=8, width=0.375)  # groups of 12, 24, 48
    x = torch.randn(1, 3, 8, 8)
    groups = find_channel_groups(model, x)
    predictor = FlopsPredictor(model, x, groups)
    result = search_threshold([torch.rand(g.size) for g in groups], 0.6, predictor, round_to=16)
    kept = [len(result.plan[g.index]) for g in groups]
    assert kept[:2] == [12, 12]  # smaller than 16: whole
    assert all(k % 16 == 0 or k == g.size for k, g in zip(kept, groups)) and kept[-1] < groups[-1].size
    assert result.ratio <= 0.6


def test_groups_scored_inf_stay_whole_and_a_target_below_them_is_refused(resnet56_search):
    _, _, groups, predictor = resnet56_search
    scores = [torch.full((g.size,), math.inf) if g.index % 2 == 0 else torch.rand(g.size) for g in groups]
    result = search_threshold(scores, 0.7, predictor)
    assert all(len(result.plan[g.index]) == g.size for g in groups if g.index % 2 == 0)
    assert result.ratio <= 0.7
    fixed = predictor.predict_counts([g.size if g.index % 2 == 0 else 1 for g in groups]) / predictor.dense
    with pytest.raises(ValueError, match=f"smallest reachable ratio {fixed:.6f}"):
        search_threshold(scores, fixed * 0.99, predictor)
