"""Discovery on a model too large to copy: built on the meta device, traced as it is, its groups matched (block
indices aside) to groups checked by numbers on a smaller real ``check_model`` of its layout; a Llama-7B layout's
head and MLP groups without materialising a parameter."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from lightning_prune.structure import find_channel_groups, refused_channel_groups
from pruning_checks import with_batchnorm_statistics
from test_discovery import TwoSlicesModel

transformers = pytest.importorskip("transformers")


def llama(layers: int, vocab: int = 100, intermediate: int = 128, head_dim: int = 16) -> nn.Module:
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab, head_dim=head_dim,
    )
    return transformers.LlamaForCausalLM(config).eval()


def described(groups) -> list[tuple]:
    return [
        (g.root, g.size, g.heads, g.hidden, [(m.module, m.kind, m.parameter, m.dim, m.positions.tolist(), m.channels.tolist()) for m in g.members])
        for g in groups
    ]


@pytest.mark.parametrize("hidden", [False, True])
def test_a_meta_llama_checked_on_two_real_layers_has_the_groups_of_the_real_four_layer_model(hidden) -> None:
    """Heads (grouped-query: 2 kv-head units), MLP widths and, with ``hidden``, the residual stream: the same
    groups as discovery on the real model, while the meta model stays on meta (no weight materialised)."""
    torch.manual_seed(0)
    real, x = llama(4), torch.randint(0, 50, (1, 8))
    with torch.device("meta"):
        meta = llama(4)
    check = llama(2, vocab=50)  # fewer layers, a smaller vocabulary: the same widths
    groups = find_channel_groups(meta, x, heads=True, hidden=hidden, check_model=check)
    assert described(groups) == described(find_channel_groups(real, x, heads=True, hidden=hidden))
    assert [g.size for g in groups if g.heads] == [2] * 4 and [g.size for g in groups if not g.heads and not g.hidden] == [128] * 4
    assert [g.hidden for g in groups].count(True) == int(hidden)
    assert all(p.is_meta for p in meta.parameters())


def test_a_group_that_fails_the_numbers_on_the_check_model_is_refused_in_every_block_of_the_meta_model() -> None:
    """Torch-Pruning's two-slices model as a block: its ``block1.3`` group prunes wrongly (``block2_1`` is applied
    to two slices), so it is refused in all three meta blocks with the check model's reason."""

    class Stack(nn.Module):
        def __init__(self, blocks: int) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(TwoSlicesModel() for _ in range(blocks))

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return sum((block(x) for block in self.blocks), ())

    torch.manual_seed(0)
    x = torch.randn(2, 8, 4, 4)
    with torch.device("meta"):
        meta = Stack(3)
    groups = find_channel_groups(meta, x, check_model=with_batchnorm_statistics(Stack(1)))
    refused = {g.root: g.reason for g in refused_channel_groups(meta, x, check_model=with_batchnorm_statistics(Stack(1)))}
    assert [g.root for g in groups] == [f"blocks.{i}.block1.0" for i in range(3)]
    for i in range(3):
        reason = refused[f"blocks.{i}.block1.3"]
        assert "not checked by numbers on `check_model`" in reason and "'blocks.0.block2_1.0' is called 2 times" in reason


@pytest.mark.parametrize("widths, refused_root", [
    (dict(intermediate=96), "model.layers.3.mlp.gate_proj"),  # MLP groups of 96 channels, not 128
    (dict(head_dim=8), "model.layers.3.self_attn.q_proj"),  # as many heads (2 kv-head units), each narrower
])
def test_a_check_model_of_other_widths_checks_no_group_of_those_widths(widths, refused_root) -> None:
    """Positions are compared, not only names and sizes: groups whose widths differ on the check model are
    refused, the others kept."""
    x = torch.randint(0, 50, (1, 8))
    with torch.device("meta"):
        meta = llama(4)
    check = llama(2, **widths)
    groups = find_channel_groups(meta, x, heads=True, check_model=check)
    refused = {g.root: g.reason for g in refused_channel_groups(meta, x, heads=True, check_model=check)}
    assert len(groups) == 4 and refused_root.replace(".3.", ".0.") not in [g.root for g in groups]
    assert "no group of `check_model` removes the same positions" in refused[refused_root]


def test_meta_models_and_foreign_check_models_are_refused_naming_the_argument() -> None:
    x = torch.randint(0, 50, (1, 8))
    with torch.device("meta"):
        meta = llama(2)
    with pytest.raises(ValueError, match="`model` is on the meta device.*`check_model`"):
        find_channel_groups(meta, x, heads=True)
    with pytest.raises(ValueError, match="`check_model` must hold real weights"):
        find_channel_groups(meta, x, heads=True, check_model=meta)
    with pytest.raises(ValueError, match="`check_model` must have `model`'s layout.*Linear"):
        find_channel_groups(meta, x, heads=True, check_model=nn.Sequential(nn.Linear(8, 8)))
    with pytest.raises(ValueError, match="`check_model` must be a torch.nn.Module"):
        find_channel_groups(meta, x, heads=True, check_model="small")


_SEVEN_B = textwrap.dedent(
    """
    import resource, sys, time
    import torch, transformers
    from lightning_prune.structure import find_channel_groups
    torch.set_num_threads(1)
    held = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (held + 4 * 2**30, held + 4 * 2**30))  # 4 GiB more than after imports
    def config(layers, vocab):
        return transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                                        num_attention_heads=32, num_key_value_heads=8, vocab_size=vocab)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config(32, 32000)).eval()
    check = transformers.LlamaForCausalLM(config(1, 256)).to(torch.bfloat16).eval()  # one real layer: 0.4 GB
    start = time.perf_counter()
    groups = find_channel_groups(model, torch.randint(0, 256, (1, 8)), heads=True, check_model=check)
    print(time.perf_counter() - start)
    print([(g.root, g.size, g.heads is not None) for g in groups])
    print(all(p.is_meta for p in model.parameters()))
    """
)


@pytest.mark.slow
def test_a_llama_7b_layout_gives_its_head_and_mlp_groups_under_a_4_gib_address_space() -> None:
    """The 32-layer Llama-7B layout with 8 key/value heads (5.9 B parameters, 24 GB in fp32) on the meta device, checked on one real
    bf16 layer: 32 head groups of 8 kv-head units and 32 MLP groups of 11008 channels, in a process whose address
    space is capped at 4 GiB above what it held after its imports (one materialised parameter set could not fit)."""
    done = subprocess.run([sys.executable, "-c", _SEVEN_B], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    seconds, groups, still_meta = done.stdout.strip().splitlines()[-3:]
    groups = eval(groups)  # noqa: S307 - our own child's printed list
    assert [(root, size) for root, size, heads in groups if heads] == [(f"model.layers.{i}.self_attn.q_proj", 8) for i in range(32)]
    assert [(root, size) for root, size, heads in groups if not heads] == [(f"model.layers.{i}.mlp.gate_proj", 11008) for i in range(32)]
    assert still_meta == "True" and float(seconds) < 600
