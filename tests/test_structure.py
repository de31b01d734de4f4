"""Coupled channel groups, plans, masks, physical removal and restoring a pruned structure."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from lightning_prune import DigitsDataModule, ImageClassifier
from lightning_prune.flops import FlopsPredictor, count_flops
from lightning_prune.demo.models import build_network, conv_bn_relu
from lightning_prune.structure import (
    STRUCTURE_KEY,
    apply_plan,
    channel_masks,
    channel_norms,
    channel_ratio_vector,
    find_channel_groups,
    layer_channel_ratios,
    plan_from_scores,
    refused_channel_groups,
    restore_structure,
    structure_from_state_dict,
    zeroed_channel_plan,
)
from pruning_checks import masked_and_pruned_outputs, with_batchnorm_statistics
from lightning_prune.training_state import rebuild_training_state, restore_structure_from_checkpoint


class TinyDenseNet(nn.Module):
    """Dense connections (each layer's output concatenated to its input), a BatchNorm over the
    concatenation, then an Inception-like pair of branches concatenated before the pool."""

    def __init__(self, in_channels: int = 3, growth: int = 4, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = conv_bn_relu(in_channels, 8)
        self.dense1 = conv_bn_relu(8, growth)
        self.dense2 = conv_bn_relu(8 + growth, growth)
        self.bn = nn.BatchNorm2d(8 + 2 * growth)
        self.transition = nn.Conv2d(8 + 2 * growth, 12, 1)
        self.branch_a = nn.Conv2d(12, 6, 1)
        self.branch_b = nn.Conv2d(12, 5, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(11, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.cat([x, self.dense1(x)], 1)
        x = torch.cat([x, self.dense2(x)], 1)
        x = self.transition(F.relu(self.bn(x)))
        x = torch.cat([self.branch_a(x), self.branch_b(x)], 1)
        return self.fc(torch.flatten(self.pool(x), 1))


def make(arch: str) -> tuple[nn.Module, torch.Tensor]:
    """A small network in eval mode with non-trivial BatchNorm statistics, and an input batch."""
    if arch == "densenet":
        model, size = TinyDenseNet(), 8
    else:
        size = 32 if arch == "lenet5" else 8
        model = build_network(arch, num_classes=10, in_channels=3, image_size=size)
    return with_batchnorm_statistics(model), torch.randn(2, 3, size, size)


def random_plan(groups, seed: int) -> dict[int, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    plan = {}
    for group in groups:
        kept = int(torch.randint(1, group.size + 1, (1,), generator=generator))
        plan[group.index] = torch.randperm(group.size, generator=generator)[:kept].sort().values
    return plan


ARCHS = ["resnet20", "resnet56", "vgg_small", "mobilenetv2", "lenet5", "densenet"]


def test_groups_are_deterministic_in_model_order_and_picklable():
    model, x = make("resnet20")
    groups = find_channel_groups(model, x)
    again = find_channel_groups(model, x)
    assert [g.layers for g in groups] == [g.layers for g in again]
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    assert [order[g.root] for g in groups] == sorted(order[g.root] for g in groups)
    assert [g.index for g in groups] == list(range(len(groups)))
    restored = pickle.loads(pickle.dumps(groups))
    assert [(g.size, g.layers) for g in restored] == [(g.size, g.layers) for g in groups]


def test_residual_adds_couple_the_stem_with_every_block_output_of_a_stage():
    model, x = make("resnet20")
    groups = find_channel_groups(model, x)
    stage1 = next(g for g in groups if g.root == "stem.0")
    assert stage1.layers == ("stem.0", "layers.0.conv2", "layers.1.conv2", "layers.2.conv2")
    members = {(m.module, m.kind) for m in stage1.members}
    assert {("stem.1", "channel"), ("layers.0.bn2", "channel"), ("layers.3.conv1", "in"), ("layers.3.shortcut.0", "in")} <= members
    # the block-internal channels form their own groups
    assert next(g for g in groups if g.root == "layers.0.conv1").layers == ("layers.0.conv1",)


def test_output_units_and_input_channels_are_never_in_a_group():
    model, x = make("resnet20")
    groups = find_channel_groups(model, x)
    assert all(m.module != "fc" or m.kind == "in" for g in groups for m in g.members)
    assert all(m.module != "stem.0" or m.kind == "out" for g in groups for m in g.members)
    assert sum(len(g.layers) for g in groups) == sum(isinstance(m, nn.Conv2d) for m in model.modules())


def test_depthwise_conv_shares_the_group_of_the_expansion_conv():
    model, x = make("mobilenetv2")
    groups = find_channel_groups(model, x)
    group = next(g for g in groups if "features.2.block.0.0" in g.layers)
    assert group.layers == ("features.2.block.0.0", "features.2.block.1.0")
    assert model.features[2].block[1][0].groups == group.size


def test_concatenation_maps_channels_to_offsets_of_the_consumer():
    model, x = make("densenet")
    groups = find_channel_groups(model, x)
    dense2 = next(g for g in groups if g.root == "dense2.0")
    bn = next(m for m in dense2.members if m.module == "bn")
    assert bn.positions.tolist() == list(range(12, 16)) and bn.dim == 16
    branch_b = next(g for g in groups if g.root == "branch_b")
    fc = next(m for m in branch_b.members if m.module == "fc")
    assert fc.positions.tolist() == list(range(6, 11))


def test_flatten_maps_one_channel_to_its_spatial_positions_in_the_linear():
    model, x = make("lenet5")
    groups = find_channel_groups(model, x)
    last_conv = next(g for g in groups if g.root == "features.3")
    linear = next(m for m in last_conv.members if m.module == "classifier.1")
    assert linear.kind == "in" and len(linear.positions) == 16 * 8 * 8
    assert torch.equal(torch.bincount(linear.channels), torch.full((16,), 64))


def test_ignored_layers_keep_their_output_channels():
    model, x = make("resnet20")
    groups = find_channel_groups(model, x, ignored_layers=["layers.0.conv1", "layers.1.conv2"])
    layers = {name for g in groups for name in g.layers}
    assert "layers.0.conv1" not in layers and "stem.0" not in layers
    with pytest.raises(ValueError, match="ignored_layers.*nope"):
        find_channel_groups(model, x, ignored_layers=["nope"])


@pytest.mark.parametrize("arch", ARCHS)
def test_masks_compute_what_the_physically_pruned_model_computes(arch):
    model, x = make(arch)
    groups = find_channel_groups(model, x)
    plan = random_plan(groups, seed=1)
    masked = copy.deepcopy(model)
    masks = channel_masks(masked, groups, plan)
    parameters = dict(masked.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            assert mask.shape == parameters[name].shape and set(mask.unique().tolist()) <= {0.0, 1.0}
            parameters[name].mul_(mask)
        expected = masked(x)
    dense_output_shape = model(x).shape
    apply_plan(model, groups, plan, x)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    assert model(x).shape == dense_output_shape
    assert zeroed_channel_plan(masked, groups).keys() == plan.keys()
    assert all(torch.equal(zeroed_channel_plan(masked, groups)[i], plan[i]) for i in plan)


@pytest.mark.parametrize("arch", ARCHS)
def test_predicted_flops_equal_fvcore_recount_of_pruned_model(arch):
    model, x = make(arch)
    groups = find_channel_groups(model, x)
    predictor = FlopsPredictor(model, x, groups)
    assert predictor.predict({}) == count_flops(model, x).total
    for seed in range(3):
        plan = random_plan(groups, seed)
        pruned = copy.deepcopy(model)
        apply_plan(pruned, groups, plan, x)
        assert predictor.predict(plan) == count_flops(pruned, x).total


def test_pruned_model_trains_and_keeps_requires_grad_and_modes():
    model, x = make("mobilenetv2")
    model.train()
    model.features[0][1].eval()
    model.features[0][1].weight.requires_grad_(False)
    groups = find_channel_groups(model, x)
    apply_plan(model, groups, {g.index: torch.arange(max(1, g.size // 3)) for g in groups}, x)
    assert model.training and not model.features[0][1].training
    assert not model.features[0][1].weight.requires_grad
    target = torch.tensor([1, 7])
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_plan_errors_name_the_argument_and_change_nothing():
    model, x = make("vgg_small")
    groups = find_channel_groups(model, x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad_plans = [
        {99: torch.tensor([0])},
        {0: torch.tensor([], dtype=torch.long)},
        {0: torch.tensor([0, 0])},
        {0: torch.tensor([groups[0].size])},
        {0: torch.tensor([0.0])},
    ]
    for plan in bad_plans:
        with pytest.raises(ValueError, match="plan"):
            apply_plan(model, groups, plan, x)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    apply_plan(model, groups, {0: torch.tensor([0, 1])}, x)
    with pytest.raises(ValueError, match="groups"):
        apply_plan(model, groups, {0: torch.tensor([0])}, x)


def test_channel_norms_sum_the_output_channel_norms_of_every_out_layer():
    model, x = make("resnet20")
    groups = find_channel_groups(model, x)
    l1, l2 = channel_norms(model, groups, "l1"), channel_norms(model, groups, "l2")
    stage1 = next(g for g in groups if g.root == "stem.0")
    weights = [dict(model.named_modules())[name].weight.detach() for name in stage1.layers]
    torch.testing.assert_close(l1[stage1.index], sum(w.abs().sum((1, 2, 3)) for w in weights))
    torch.testing.assert_close(l2[stage1.index], sum(w.flatten(1).norm(dim=1) for w in weights))
    with pytest.raises(ValueError, match="norm"):
        channel_norms(model, groups, "l3")


def test_channel_ratio_vector_has_one_entry_per_layer_in_model_order():
    model, x = make("resnet20")
    groups = find_channel_groups(model, x)
    plan = {g.index: torch.arange(g.size // 4) for g in groups if g.root == "stem.0"}
    ratios = layer_channel_ratios(groups, plan)
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert list(ratios) == convs
    assert ratios["layers.1.conv2"] == 0.25 and ratios["layers.1.conv1"] == 1.0
    assert channel_ratio_vector(groups, plan) == list(ratios.values())


def test_plan_from_scores_keeps_the_top_channels_of_every_group():
    scores = [torch.tensor([0.1, 0.9, 0.5]), torch.tensor([0.2, 0.3])]
    plan = plan_from_scores(scores, threshold=0.4, min_channels=1)
    assert plan[0].tolist() == [1, 2] and plan[1].tolist() == [1]
    assert plan_from_scores(scores, threshold=1.0, min_channels=2)[0].tolist() == [1, 2]
    with pytest.raises(ValueError, match="min_channels"):
        plan_from_scores(scores, 0.5, min_channels=0)


def test_restore_structure_lets_the_pruned_state_dict_load_strictly():
    model, x = make("resnet20")
    groups = find_channel_groups(model, x)
    record = apply_plan(model, groups, random_plan(groups, seed=3), x)
    record = json.loads(json.dumps(record))
    fresh = build_network("resnet20", num_classes=10, in_channels=3, image_size=8).eval()
    restore_structure(fresh, record)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))
    with pytest.raises(ValueError, match="record"):
        restore_structure(nn.Sequential(nn.Linear(2, 2)), record)


@pytest.mark.parametrize("arch", ["mobilenetv2", "densenet"])
def test_structure_from_state_dict_reads_the_record_off_the_weights(arch):
    model, x = make(arch)
    groups = find_channel_groups(model, x)
    record = apply_plan(model, groups, random_plan(groups, seed=4), x)
    fresh = make(arch)[0]
    assert structure_from_state_dict(fresh, model.state_dict()) == record
    prefixed = {f"net.{key}": value for key, value in model.state_dict().items()}
    assert structure_from_state_dict(fresh, prefixed, prefix="net.") == record


def test_restore_structure_from_checkpoint_with_a_prefix_for_a_bare_network(tmp_path):
    module = ImageClassifier("vgg_small", in_channels=3, image_size=8).eval()
    x = torch.randn(2, 3, 8, 8)
    groups = find_channel_groups(module, x)
    assert groups[0].root == "network.features.0.0"
    checkpoint = {"state_dict": module.state_dict()}
    assert not restore_structure_from_checkpoint(module.network, checkpoint)
    checkpoint = {STRUCTURE_KEY: apply_plan(module, groups, random_plan(groups, 0), x), "state_dict": module.state_dict()}
    torch.save(checkpoint, tmp_path / "pruned.ckpt")
    net = build_network("vgg_small", num_classes=10, in_channels=3, image_size=8).eval()
    assert restore_structure_from_checkpoint(net, tmp_path / "pruned.ckpt", prefix="network.")
    net.load_state_dict({k[len("network.") :]: v for k, v in checkpoint["state_dict"].items() if k.startswith("network.")})
    with torch.no_grad():
        torch.testing.assert_close(net(x), module(x))


class PruneOnce(pl.Callback):
    """Applies a plan at the start of one epoch, rebuilds the training state, saves the structure."""

    def __init__(self, epoch: int = 1) -> None:
        self.epoch = epoch
        self.record = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch != self.epoch:
            return
        x = pl_module.example_input_array.to(pl_module.device)
        groups = find_channel_groups(pl_module, x)
        self.lr_before = trainer.optimizers[0].param_groups[0]["lr"]
        self.scheduler_epoch_before = trainer.lr_scheduler_configs[0].scheduler.last_epoch
        self.record = apply_plan(pl_module, groups, {g.index: torch.arange(g.size // 2) for g in groups}, x)
        rebuild_training_state(trainer)
        self.after_pruning = {name: p.detach().clone() for name, p in pl_module.named_parameters()}

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if self.record is not None:
            checkpoint[STRUCTURE_KEY] = self.record


def test_plan_applied_during_fit_trains_new_parameters_and_reloads(trainer_factory, tmp_path):
    data = DigitsDataModule(batch_size=32)
    module = ImageClassifier("vgg_small", lr=0.05, lr_schedule="multistep")
    callback = PruneOnce(epoch=1)
    trainer = trainer_factory([callback], max_epochs=3, limit_train_batches=4, limit_val_batches=1)
    trainer.fit(module, datamodule=data)

    assert module.network.features[0][0].out_channels == 16
    optimizer = trainer.optimizers[0]
    assert {id(p) for group in optimizer.param_groups for p in group["params"]} == {id(p) for p in module.parameters()}
    for name, parameter in module.named_parameters():
        assert not torch.equal(parameter.detach(), callback.after_pruning[name]), name
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    # milestones at epochs 1 and 2: the schedule goes on where it was instead of restarting
    assert callback.scheduler_epoch_before == 1 and callback.lr_before == pytest.approx(0.005)
    assert scheduler.last_epoch == 3 and optimizer.param_groups[0]["lr"] == pytest.approx(0.0005)

    path = tmp_path / "pruned.ckpt"
    trainer.save_checkpoint(path)
    loaded = ImageClassifier.load_from_checkpoint(path).eval()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), module.eval()(x))

    resumed = trainer_factory(max_epochs=4, limit_train_batches=2, limit_val_batches=1)
    resumed.fit(ImageClassifier("vgg_small", lr=0.05, lr_schedule="multistep"), datamodule=data, ckpt_path=path)
    assert resumed.lightning_module.network.features[0][0].out_channels == 16


class PruneOnceAndCheckRanks(PruneOnce):
    """On every rank: prune at epoch 1; at the end, DDP wraps the pruned module and ranks agree."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        wrapper = trainer.strategy.model
        assert isinstance(wrapper, nn.parallel.DistributedDataParallel) and wrapper.module is pl_module
        assert pl_module.network.features[0][0].out_channels == 16
        flat = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        assert not torch.equal(flat, torch.cat([p.flatten() for p in self.after_pruning.values()]))
        gathered = trainer.strategy.all_gather(flat)
        assert torch.equal(gathered[0], gathered[1]), "ranks diverged: DDP did not reduce the new parameters"


def restore_before_loading(module: nn.Module, state_dict: dict, prefix: str, *hook_args) -> None:
    """A load_state_dict pre-hook (a module-level function, so ddp_spawn can pickle it)."""
    restore_structure(module, structure_from_state_dict(module, state_dict, prefix))


@pytest.mark.distributed
def test_plan_applied_under_ddp_rewraps_the_model(trainer_factory):
    module = ImageClassifier("vgg_small", lr=0.05, lr_schedule="multistep")
    # ddp_spawn copies the workers' weights back into this process's dense module with load_state_dict
    module.register_load_state_dict_pre_hook(restore_before_loading)
    trainer = trainer_factory(
        [PruneOnceAndCheckRanks(epoch=1)],
        max_epochs=2,
        limit_train_batches=3,
        limit_val_batches=0,
        strategy="ddp_spawn",
        devices=2,
    )
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=16))
    assert module.network.features[0][0].out_channels == 16


def test_group_behind_a_module_used_twice_is_refused_and_the_rest_prunes_exactly():
    from zoo_models import SplitModel

    model, x = SplitModel().eval(), torch.randn(2, 3, 8, 8)
    groups = find_channel_groups(model, x)
    refused = {group.root: group.reason for group in refused_channel_groups(model, x)}
    # torch-pruning maps block1's 32 channels onto block2_1's 8 inputs twice: refused, with the reason
    assert "block1.3" in refused and "positions outside" in refused["block1.3"]
    assert "block1.3" not in [group.root for group in groups] and len(groups) == 4
    generator = torch.Generator().manual_seed(0)
    plan = {g.index: torch.randperm(g.size, generator=generator)[: g.size // 2].sort().values for g in groups}
    masked, pruned = masked_and_pruned_outputs(model, x, groups, plan)
    torch.testing.assert_close(pruned, masked)


def test_transposed_conv_channels_prune_and_restore_from_a_state_dict():
    from zoo_models import TransposedConvModel

    model, x = TransposedConvModel().eval(), torch.randn(2, 3, 8, 8)
    groups = find_channel_groups(model, x)
    assert "up" in [group.root for group in groups]
    plan = {g.index: torch.arange(0, g.size, 2) for g in groups}
    masked, pruned = masked_and_pruned_outputs(model, x, groups, plan)
    torch.testing.assert_close(pruned, masked)
    apply_plan(model, groups, plan, x)
    assert (model.up.in_channels, model.up.out_channels) == (12, 6)
    fresh = TransposedConvModel().eval()
    restore_structure(fresh, structure_from_state_dict(fresh, model.state_dict()))
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))
