"""`IterativeMagnitude(granularity="channel")`: coupled channel groups, exact masks, physical removal."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from lightning_prune import DigitsDataModule, ImageClassifier, IterativeMagnitude, sparsity_report
from lightning_prune.flops import count_flops
from lightning_prune.magnitude import ChannelMagnitude
from lightning_prune.structure import channel_norms
from lightning_prune.training_state import restore_structure_from_checkpoint

from conftest import make_trainer
from task_models import UNet

SMALL = dict(limit_train_batches=6, limit_val_batches=2)


def resnet() -> ImageClassifier:
    return ImageClassifier("resnet20", in_channels=3, image_size=32, width=0.5)


def data() -> DigitsDataModule:
    return DigitsDataModule(image_size=32, channels=3, batch_size=32)


class OutputAtFitEnd(pl.Callback):
    def __init__(self) -> None:
        self.logits = None

    def on_fit_end(self, trainer, pl_module):
        pl_module.eval()
        with torch.no_grad():
            self.logits = pl_module(torch.linspace(-1, 1, 2 * 3 * 32 * 32).view(2, 3, 32, 32))
        pl_module.train()


def test_physical_removal_keeps_the_function_and_meets_the_predicted_flops(tmp_path):
    masked, physical = OutputAtFitEnd(), OutputAtFitEnd()
    pruning = IterativeMagnitude(0.5, "iterative", start_epoch=1, end_epoch=2, granularity="channel", physical=True)
    model = resnet()
    dense_flops = count_flops(model, model.example_input_array).total
    class Plan(pl.Callback):
        def on_fit_end(self, trainer, pl_module):
            self.plan = dict(pruning.pruner.plan)

    keep = Plan()
    trainer = make_trainer(tmp_path, [masked, keep, pruning, physical], max_epochs=3, **SMALL)
    trainer.fit(model, data())
    plan = keep.plan
    # the masked network (before removal) and the physically smaller one compute the same function
    assert torch.allclose(masked.logits, physical.logits, atol=1e-5)
    assert model.network.fc.out_features == 10
    recount = count_flops(model, model.example_input_array).total
    assert recount == pruning.figures.predictor.predict(plan) < dense_flops
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in resnet().parameters())
    assert sparsity_report(model).sparsity == 0.0  # every zeroed channel is gone, no zero left behind
    # the pruned model is a plain module that keeps training
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    make_trainer(tmp_path, [], max_epochs=1, limit_train_batches=3, limit_val_batches=0).fit(model, data())
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_global_channel_target_is_met_within_one_channel(tmp_path):
    pruning = IterativeMagnitude(0.6, "one_shot", start_epoch=1, granularity="channel", make_permanent=False, verbose=False)
    model = resnet()
    make_trainer(tmp_path, [pruning], max_epochs=2, **SMALL).fit(model, data())
    report = sparsity_report(model)
    largest_channel = max(p.numel() // p.shape[0] + p.numel() // p.shape[1]
                          for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1)
    zeros = report.total.total - report.total.nonzero
    assert round(0.6 * report.total.total) <= zeros <= round(0.6 * report.total.total) + 2 * largest_channel
    ratios = pruning.pruner.channel_ratios()
    assert ratios and all(0 < r <= 1 for r in ratios.values()) and min(ratios.values()) < 1


def test_layer_scope_removes_the_same_fraction_of_every_group(tmp_path):
    pruning = IterativeMagnitude(0.5, "one_shot", start_epoch=1, scope="layer", granularity="channel", physical=True)
    model = ImageClassifier("vgg_small", in_channels=3, image_size=32, width=0.25)
    dense = ImageClassifier("vgg_small", in_channels=3, image_size=32, width=0.25)
    make_trainer(tmp_path, [pruning], max_epochs=2, **SMALL).fit(model, data())
    convs = [m for m in model.network.features.modules() if isinstance(m, torch.nn.Conv2d)]
    dense_convs = [m for m in dense.network.features.modules() if isinstance(m, torch.nn.Conv2d)]
    for pruned, original in zip(convs, dense_convs):
        assert pruned.out_channels == original.out_channels - round(0.5 * original.out_channels)
    assert model.network.classifier.out_features == 10


def test_a_pruned_checkpoint_rebuilds_with_and_without_lightning(tmp_path):
    pruning = IterativeMagnitude(0.5, "one_shot", start_epoch=1, granularity="channel", physical=True, verbose=False)
    model = resnet()
    trainer = make_trainer(tmp_path, [pruning], max_epochs=2, **SMALL)
    trainer.fit(model, data())
    path = tmp_path / "pruned.ckpt"
    trainer.save_checkpoint(path)
    x = torch.randn(3, 3, 32, 32)
    model.eval()
    expected = model(x)
    loaded = ImageClassifier.load_from_checkpoint(path).eval()
    assert torch.allclose(loaded(x), expected, atol=1e-6)
    direct = resnet()
    direct.load_state_dict(model.state_dict())  # ImageClassifier reshapes itself to a pruned state dict
    assert torch.allclose(direct.eval()(x), expected, atol=1e-6)
    plain = resnet()
    checkpoint = torch.load(path, weights_only=False)
    assert restore_structure_from_checkpoint(plain, checkpoint)
    plain.load_state_dict(checkpoint["state_dict"])
    assert torch.allclose(plain.eval()(x), expected, atol=1e-6)


def test_resume_restores_the_channel_plan_and_ends_like_an_uninterrupted_run(tmp_path):
    from pytorch_lightning.callbacks import ModelCheckpoint

    def run(directory, ckpt_path=None):
        pl.seed_everything(0)
        pruning = IterativeMagnitude(0.5, "iterative", start_epoch=1, end_epoch=2, granularity="channel",
                                     make_permanent=False, verbose=False)
        checkpoint = ModelCheckpoint(dirpath=directory, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
        model = resnet()
        make_trainer(directory, [pruning, checkpoint], max_epochs=4, enable_checkpointing=True, **SMALL).fit(
            model, data(), ckpt_path=ckpt_path
        )
        return model, pruning

    (_, whole_pruning), (_, resumed_pruning) = run(tmp_path / "a"), run(tmp_path / "b", tmp_path / "a" / "epoch=2.ckpt")  # after the last event
    whole_plan, resumed_plan = whole_pruning.pruner.plan, resumed_pruning.pruner.plan
    assert whole_plan.keys() == resumed_plan.keys()
    for index, keep in whole_plan.items():
        assert torch.equal(keep, resumed_plan[index])
    assert resumed_pruning.figures.predictor.predict(resumed_plan) == whole_pruning.figures.predictor.predict(whole_plan) < resumed_pruning.figures.dense_flops.total
    for name, mask in whole_pruning.masks.masks.items():
        assert torch.equal(mask, resumed_pruning.masks.masks[name]), name


def unet_magnitude() -> tuple[torch.nn.Module, ChannelMagnitude]:
    model = UNet().eval()
    layers = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Conv2d)]
    return model, ChannelMagnitude.for_model(model, (torch.randn(1, 1, 16, 16),), layers, "l1", 0.99)


def test_channel_scores_read_a_transposed_convs_output_channels_from_weight_dim_one():
    model, channels = unet_magnitude()
    assert any(isinstance(model.get_submodule(g.root), torch.nn.ConvTranspose2d) for g in channels.groups)
    for score, norm in zip(channels.scores(model), channel_norms(model, channels.groups, "l1")):
        assert torch.allclose(score, norm / norm.mean(), rtol=1e-5)


@pytest.mark.parametrize("target", [0.5, "layer"])
def test_a_channel_dropped_by_an_earlier_plan_stays_dropped(target):
    model, channels = unet_magnitude()
    target = {g.root: 0.5 for g in channels.groups} if target == "layer" else target
    earlier = channels.plan(channels.decide(model, target))
    scores = channels.scores(model)
    channels.scores = lambda model: [2 - score for score in scores]  # now the dropped channels score highest
    later = channels.plan(channels.decide(model, target, earlier))
    for index, keep in later.items():
        assert set(keep.tolist()) <= set(earlier[index].tolist())
