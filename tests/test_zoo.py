"""Structure discovery, the FLOPs predictor, masks, physical removal, gates and the three callbacks on real
model zoos (torchvision, timm, Torch-Pruning-style test models): random weights, CPU, small inputs.
Each model is one row of the README's "Model zoo support" table."""

from __future__ import annotations

import copy
import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from pruning_checks import masked_and_pruned_outputs
from zoo_models import ZOO, ZooClassifier, build

from lightning_prune import AutoPruneCallback, GatePruningFromScratch, IterativeMagnitude
from lightning_prune.flops import FlopsPredictor, count_flops
from lightning_prune.gates import ChannelGates, gate_sites
from lightning_prune.structure import apply_plan, find_channel_groups, refused_channel_groups

pytestmark = pytest.mark.zoo

UNSUPPORTED = {
    # model -> the ValueError discovery raises (early, with bounded memory)
    "tv_shufflenet_v2_x1_0": "cannot map channels through .*channel shuffle",
}
SUPPORTED = [name for name in ZOO if name not in UNSUPPORTED]
PRUNABLE = SUPPORTED


@functools.lru_cache(maxsize=None)
def discovered(name: str):  # noqa: ANN201 - (model, input, groups), shared by the cells of one row
    model, x = build(name)
    return model, x, find_channel_groups(model, x)


def random_plans(groups, count: int, seed: int = 0) -> list[dict[int, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    plans = []
    for _ in range(count):
        plan = {}
        for group in groups:
            keep = int(torch.randint(1, group.size + 1, (1,), generator=generator))
            plan[group.index] = torch.randperm(group.size, generator=generator)[:keep].sort().values
        plans.append(plan)
    return plans


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_unsupported_models_fail_early_with_a_clear_message(name):
    model, x = build(name)
    with pytest.raises(ValueError, match=UNSUPPORTED[name]):
        find_channel_groups(model, x)


@pytest.mark.parametrize("name", SUPPORTED)
def test_groups_found(name):
    model, x, groups = discovered(name)
    assert len(groups) > 0
    assert all(refused.reason for refused in refused_channel_groups(model, x))


@pytest.mark.parametrize("name", PRUNABLE)
def test_predicted_flops_equal_fvcore_recount(name):
    model, x, groups = discovered(name)
    predictor = FlopsPredictor(model, x, groups)
    assert predictor.dense == count_flops(model, x).total
    for plan in random_plans(groups, 2):
        pruned = copy.deepcopy(model)
        apply_plan(pruned, groups, plan, x)
        assert predictor.predict(plan) == count_flops(pruned, x).total


@pytest.mark.parametrize("name", PRUNABLE)
def test_masked_output_equals_physically_pruned_output(name):
    model, x, groups = discovered(name)
    (plan,) = random_plans(groups, 1, seed=1)
    masked, pruned = masked_and_pruned_outputs(model, x, groups, plan)
    torch.testing.assert_close(pruned, masked, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", PRUNABLE)
def test_gate_phase_gives_finite_nonzero_gate_gradients(name):
    model, x, groups = discovered(name)
    position = "bn" if gate_sites(model, groups, "bn") else "conv"  # ViT, ConvNeXt: no BatchNorm
    gates = ChannelGates.for_groups(model, groups, position)
    assert gates.num_gates > 0
    with gates.inserted():
        model(x).square().sum().backward()
    grads = [gate.grad for gate in gates.parameters()]
    model.zero_grad(set_to_none=True)
    assert all(grad is not None and torch.isfinite(grad).all() for grad in grads)
    assert any(grad.abs().sum() > 0 for grad in grads)


CALLBACKS = {
    "IterativeMagnitude": lambda position, flops_ratio: IterativeMagnitude(granularity="channel", sparsity=0.3, physical=True),
    # gates on BatchNorms where the groups have them, else (ViT, ConvNeXt) on the layers' outputs
    "GatePruningFromScratch": lambda position, flops_ratio: GatePruningFromScratch(
        flops_ratio=flops_ratio, gate_epochs=1, gate_position=position
    ),
    "AutoPruneCallback": lambda position, flops_ratio: AutoPruneCallback(),
}

FLOPS_RATIO = {"tv_swin_t": 0.8}
"""The gate callback's target where 0.6 is out of reach: swin_t prunes only its MLP widths (at least 0.71 of the FLOPs)."""


HEAVY = {
    "tv_resnet50", "tv_resnext50_32x4d", "tv_wide_resnet50_2", "tv_densenet121", "tv_convnext_tiny", "tv_vit_b_16",
    "tv_swin_t",
}
"""Rows whose callback fits take tens of seconds each on CPU: also marked ``slow``."""


@pytest.mark.parametrize("callback", sorted(CALLBACKS))
@pytest.mark.parametrize(
    "name", [pytest.param(name, marks=pytest.mark.slow) if name in HEAVY else name for name in PRUNABLE]
)
def test_callback_fits_one_epoch(name, callback, trainer_factory):
    network, x = build(name)
    side = x.shape[-1]
    data = TensorDataset(torch.randn(8, 3, side, side), torch.randint(0, 10, (8,)))
    pruning = CALLBACKS[callback]("bn", FLOPS_RATIO.get(name, 0.6))  # the default: layer outputs where there is no BatchNorm
    epochs = 2 if isinstance(pruning, GatePruningFromScratch) else 1  # one gate epoch, then one of the pruned network
    trainer = trainer_factory([pruning], max_epochs=epochs, limit_train_batches=2, limit_val_batches=0)
    trainer.fit(ZooClassifier(network.train(), side), DataLoader(data, batch_size=4))
    assert trainer.state.finished


def test_swin_discovery_refuses_its_runaway_groups_in_bounded_memory():
    """Torch-Pruning's group expansion on swin_t grows past 5 GB; ours stops each runaway group early and refuses
    it with the reason. Run in a subprocess capped at 4 GB of address space, and check its own peak resident
    memory (VmHWM: ``ru_maxrss`` would include the forking pytest process's)."""
    script = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
sys.path.insert(0, sys.argv[1])
from zoo_models import build
from lightning_prune.structure import refused_channel_groups
model, x = build("tv_swin_t")
for group in refused_channel_groups(model, x):
    print("refused", group.root, group.reason)
peak = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))  # this process's peak RSS
print("peak_mb", int(peak.split()[1]) // 1024)
"""
    tests = str(Path(__file__).parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(tests).parent), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", script, tests], capture_output=True, text=True, env=env, timeout=300)
    assert "refused features.7.1.mlp.3 torch-pruning's channel mapping does not terminate" in result.stdout, (
        result.stdout[-2000:] + result.stderr[-2000:]
    )
    peak = int(result.stdout.split("peak_mb")[1])
    assert peak < 2048
