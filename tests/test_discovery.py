"""Channel-group discovery never hands out a group that prunes wrongly, and always ends: Torch-Pruning's own
hard test models (a module applied to two slices of one tensor; a Linear reshaped into the channels of a
transposed conv), outputs that are tuples or hold caches, and a tiny Hugging Face Llama."""

from __future__ import annotations

import signal
import types
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_prune.channel_search import search_threshold
from lightning_prune.flops import FlopsPredictor
from lightning_prune.structure import MAX_NODE_VISITS, apply_plan, find_channel_groups, refused_channel_groups
from pruning_checks import masked_and_pruned_outputs, with_batchnorm_statistics


class TwoSlicesModel(nn.Module):
    """Torch-Pruning's ``test_split`` model as it is there (``in_dim`` 8): ``block2_1`` is applied to two
    slices of ``block1``'s output, and the three results are the model's outputs."""

    def __init__(self, in_dim: int = 8) -> None:
        super().__init__()
        self.block1 = nn.Sequential(
            nn.Conv2d(in_dim, in_dim, 1), nn.BatchNorm2d(in_dim), nn.GELU(),
            nn.Conv2d(in_dim, in_dim * 4, 1), nn.BatchNorm2d(in_dim * 4),
        )
        self.block2_1 = nn.Sequential(nn.Conv2d(in_dim, in_dim, 1), nn.BatchNorm2d(in_dim))
        self.block2_2 = nn.Sequential(nn.Conv2d(2 * in_dim, in_dim, 1), nn.BatchNorm2d(in_dim))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.block1(x)
        c1, c2 = self.block2_1[0].in_channels, self.block2_2[0].in_channels
        x1, x2, x3 = torch.split(x, [c1, c1, c2], dim=1)
        return self.block2_1(x1), self.block2_1(x2), self.block2_2(x3)


class LinearToTransposedConv(nn.Module):
    """Torch-Pruning's ``test_reshape`` model: a Linear's 4096 features viewed as 256 channels of 4x4, then
    two transposed convs and a classifier after a flatten."""

    def __init__(self) -> None:
        super().__init__()
        self.Linear = nn.Linear(512, 4096)
        self.conv1T1 = nn.ConvTranspose2d(256, 128, kernel_size=4, stride=2, padding=1)
        self.conv1T2 = nn.ConvTranspose2d(128, 64, kernel_size=4, stride=2, padding=1)
        self.final = nn.Linear(16384, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.Linear(x))
        x = x.view(-1, self.conv1T1.in_channels, 4, 4)
        x = F.relu(self.conv1T1(x))
        x = F.relu(self.conv1T2(x))
        return self.final(torch.flatten(x, 1))


def plans(groups, seeds=range(3)) -> list[dict[int, torch.Tensor]]:
    """Random plans (each group keeps a random number of random channels) and the plan keeping one channel each."""
    found = []
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        found.append({
            g.index: torch.randperm(g.size, generator=generator)[: int(torch.randint(1, g.size + 1, (1,), generator=generator))].sort().values
            for g in groups
        })
    return found + [{g.index: torch.tensor([g.size - 1]) for g in groups}]


def assert_prunes_exactly(model: nn.Module, x: torch.Tensor, groups) -> None:
    for plan in plans(groups):
        masked, pruned = masked_and_pruned_outputs(model, x, groups, plan)
        torch.testing.assert_close(pruned, masked, rtol=1e-4, atol=1e-5)


def test_a_group_feeding_a_module_applied_to_two_slices_is_refused_naming_it_and_the_rest_prunes_exactly():
    torch.manual_seed(0)
    model, x = with_batchnorm_statistics(TwoSlicesModel()), torch.randn(2, 8, 4, 4)
    groups = find_channel_groups(model, x)
    refused = {group.root: group.reason for group in refused_channel_groups(model, x)}
    # torch-pruning maps block1's 32 channels onto block2_1's input for one of its two calls only
    assert "block1.3" not in [group.root for group in groups]
    assert "physically" in refused["block1.3"] and "'block2_1.0' is called 2 times" in refused["block1.3"]
    assert [group.root for group in groups] == ["block1.0"]
    assert_prunes_exactly(model, x, groups)


def test_a_linear_viewed_as_transposed_conv_channels_is_refused_and_the_rest_prunes_to_positive_shapes():
    torch.manual_seed(0)
    model, x = LinearToTransposedConv().eval(), torch.randn(2, 512)
    groups = find_channel_groups(model, x)
    refused = {group.root: group.reason for group in refused_channel_groups(model, x)}
    # one Linear feature is 1/16 of a conv channel: the group over the Linear's 4096 features is refused
    assert "Linear" not in [group.root for group in groups] and "physically" in refused["Linear"]
    assert [group.root for group in groups] == ["conv1T1", "conv1T2"]
    assert_prunes_exactly(model, x, groups)
    apply_plan(model, groups, {g.index: torch.tensor([0]) for g in groups}, x)
    assert (model.Linear.out_features, model.conv1T1.in_channels, model.conv1T1.out_channels) == (4096, 256, 1)
    assert (model.conv1T2.in_channels, model.conv1T2.out_channels, model.final.in_features) == (1, 1, 256)


class CacheOutputModel(nn.Module):
    """Returns a tuple (logits, an object holding the features as a cache), as a Hugging Face model does."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, types.SimpleNamespace]:
        features = self.conv2(torch.relu(self.conv1(x)))
        return self.head(features.mean((2, 3))), types.SimpleNamespace(layers=[{"features": features}])


def test_outputs_holding_caches_are_traced_through_and_their_tensors_count_as_outputs():
    model, x = CacheOutputModel().eval(), torch.randn(2, 3, 8, 8)
    groups = find_channel_groups(model, x)
    refused = {group.root: group.reason for group in refused_channel_groups(model, x)}
    # conv2's channels reach the output through the cache object: never pruned
    assert [group.root for group in groups] == ["conv1"] and refused["conv2"] == "coupled to the model's output"
    plan = {0: torch.tensor([1, 5])}
    masked, pruned = masked_and_pruned_outputs(model, x, groups, plan)
    torch.testing.assert_close(pruned[0], masked[0])


def test_search_threshold_without_a_group_says_there_is_no_prunable_channel_group():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    x = torch.randn(1, 3, 8, 8)
    groups = find_channel_groups(model, x, ignored_layers=["0"])
    assert groups == []
    with pytest.raises(ValueError, match="no prunable channel group.*refused_channel_groups"):
        search_threshold([], 0.5, FlopsPredictor(model, x, groups))


@contextmanager
def time_limit(seconds: int):
    """Fail (instead of hanging the suite) when the block runs longer than ``seconds``."""

    def expire(*_):  # noqa: ANN002
        raise TimeoutError(f"did not return within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.zoo
@pytest.mark.parametrize("use_cache", [False, True])
def test_tiny_llama_discovery_returns_its_mlp_groups_and_names_the_attention_it_cannot_trace(use_cache):
    """Without head groups, Llama's attention is left to torch-pruning, whose expansion loops: bounded."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100, use_cache=use_cache,
    )
    torch.manual_seed(0)
    model, x = transformers.LlamaForCausalLM(config).eval(), torch.randint(0, 100, (1, 8))
    with time_limit(120):  # torch-pruning's own expansion loops through the attention for ever
        groups = find_channel_groups(model, x)
        refused = {group.root: group.reason for group in refused_channel_groups(model, x)}
    assert [(group.root, group.size) for group in groups] == [
        ("model.layers.0.mlp.gate_proj", 128), ("model.layers.1.mlp.gate_proj", 128)
    ]
    # stopped where it loops (MAX_NODE_VISITS), long before the million-index bound
    assert "does not terminate" in refused["model.layers.0.self_attn.q_proj"]
    assert f"more than {MAX_NODE_VISITS} times" in refused["model.layers.0.self_attn.q_proj"]
    assert "model.layers.1.self_attn.v_proj" in refused and "lm_head" in refused
    plan = {g.index: torch.arange(0, g.size, 2) for g in groups}
    masked, pruned = masked_and_pruned_outputs(model, x, groups, plan)
    torch.testing.assert_close(pruned.logits, masked.logits, rtol=1e-4, atol=1e-5)
