"""AutoPrune with ``target_sparsity``: the controller of the pull µ reaches the fraction asked for, on weights and on
channels, resumes exactly, stays on the device; without a target, a run that pruned almost nothing is warned about."""

from __future__ import annotations

import pytest
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_prune import AutoPruneCallback, DigitsDataModule, ImageClassifier, sparsity_report
from lightning_prune.auxiliary import AuxiliaryParameters, PullController
from lightning_prune.demo.models import LeNet300100
from lightning_prune.diagnostics import count_ops


def _digits() -> DigitsDataModule:
    return DigitsDataModule(aux_fraction=0.5)


def test_element_target_is_reached_by_the_controller_on_lenet300100(trainer_factory):
    model = ImageClassifier("lenet300100")
    callback = AutoPruneCallback(target_sparsity=0.9, verbose=False)
    trainer_factory([callback], max_epochs=10, limit_val_batches=0).fit(model, _digits())
    assert sparsity_report(model).sparsity == pytest.approx(0.9, abs=0.01)  # the weights themselves, after fit
    assert callback.landed == pytest.approx(0.9, abs=0.01)  # the controller of µ, before the final correction


def test_channel_target_is_reached_and_removed_physically(trainer_factory):
    model = ImageClassifier("lenet5")
    widths = [m.out_features if isinstance(m, nn.Linear) else m.out_channels
              for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))][:-1]  # the output layer is never pruned
    callback = AutoPruneCallback(target_sparsity=0.5, granularity="channel", physical=True, verbose=False)
    trainer_factory([callback], max_epochs=8, limit_val_batches=0).fit(model, _digits())
    kept = [m.out_features if isinstance(m, nn.Linear) else m.out_channels
            for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))][:-1]
    assert 1 - sum(kept) / sum(widths) == pytest.approx(0.5, abs=0.01)


def test_a_run_that_switched_off_under_five_percent_warns_naming_the_arguments(trainer_factory):
    callback = AutoPruneCallback(verbose=False)  # one learning epoch: M (init 1.0) cannot reach 0 yet
    with pytest.warns(UserWarning, match=r"switched off only .*`target_sparsity`.*`reg`"):
        trainer_factory([callback], max_epochs=2, limit_val_batches=0).fit(ImageClassifier("lenet300100"), _digits())
    assert callback.switched_off < 0.05


def test_a_run_that_pruned_gives_no_low_sparsity_warning(trainer_factory, recwarn):
    callback = AutoPruneCallback(init=0.1, aux_lr=0.05, reg=2.0, verbose=False)
    trainer_factory([callback], max_epochs=2, limit_val_batches=0).fit(ImageClassifier("lenet300100"), _digits())
    assert callback.switched_off > 0.05
    assert not [w for w in recwarn if "switched off only" in str(w.message)]


@pytest.mark.parametrize("value", [1.5, 0.0, 1.0, -0.1, {}, "0.9", True, float("nan")])
def test_bad_target_is_a_value_error_naming_the_argument(value):
    with pytest.raises(ValueError, match=r"`target_sparsity` must be None or a number in \(0, 1\)"):
        AutoPruneCallback(target_sparsity=value)


def test_a_target_without_an_end_of_the_window_is_refused(trainer_factory):
    trainer = trainer_factory([AutoPruneCallback(target_sparsity=0.5, verbose=False)], max_epochs=-1)
    with pytest.raises(MisconfigurationException, match="`target_sparsity`=0.5 is reached by the end of the learning window"):
        trainer.fit(ImageClassifier("lenet300100"), _digits())


def test_resume_carries_the_controller_and_ends_as_the_uninterrupted_run(tmp_path, trainer_factory):
    def run(ckpt_path=None, callbacks=()):
        torch.manual_seed(0)
        model = ImageClassifier("lenet300100")
        callback = AutoPruneCallback(target_sparsity=0.8, verbose=False)
        trainer = trainer_factory([callback, *callbacks], max_epochs=4, enable_checkpointing=bool(callbacks), limit_val_batches=0)
        trainer.fit(model, _digits(), ckpt_path=ckpt_path)
        return model, callback

    checkpoints = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    uninterrupted, first = run(callbacks=[checkpoints])
    middle = str(tmp_path / "ckpt" / "epoch=0.ckpt")  # inside the learning window (epochs 0-1), µ already moved
    saved = torch.load(middle, weights_only=False)["callbacks"]["AutoPruneCallback"]["controller"]
    assert saved["control"] != PullController(0.8, 1.25).control
    resumed, second = run(ckpt_path=middle)
    assert second.landed == first.landed
    for key, value in uninterrupted.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_a_controlled_auxiliary_step_never_synchronises_with_the_host():
    net = LeNet300100()
    core = AuxiliaryParameters(net, ["fc1", "fc2"], init=0.1)
    core.prepare()
    core.build_optimizer("sgd", 0.05)
    controller = PullController(0.5, 1.0)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))

    def learn(reg: torch.Tensor) -> None:
        core.learn(lambda: torch.nn.functional.cross_entropy(net(x), y), reg=reg)

    _, count = count_ops(lambda: [controller.step(core, progress, learn) for progress in (0.1, 0.2, 0.3)])
    assert count.syncs == 0
    before = controller.reg.clone()
    controller.step(core, 0.4, learn)
    assert not torch.equal(before, controller.reg)  # µ moves


def test_settle_switches_off_exactly_the_smallest_entries():
    net = nn.Sequential(nn.Linear(4, 5))
    core = AuxiliaryParameters(net, ["0"])
    core.values["0"].copy_(torch.arange(20.0).view(5, 4) - 5)  # 5 entries <= 0, 15 > 0
    core.update(0.5)
    off = core.values["0"].flatten() <= 0
    assert off.sum() == 10 and off[:10].all()
    assert torch.equal(core.values["0"].flatten()[10:], torch.arange(10.0, 20.0) - 5)  # those on keep their m
    core.update(0.1)
    off = core.values["0"].flatten() <= 0
    assert off.sum() == 2 and off[:2].all() and (core.values["0"].flatten()[2:10] == 1e-6).all()


def test_paper_defaults_prune(trainer_factory):
    model = ImageClassifier("lenet300100")
    callback = AutoPruneCallback(paper_defaults=True, verbose=False)
    assert (callback.init, callback.reg, callback.normalize) == (1e-2, 5e-2, False)
    trainer_factory([callback], max_epochs=6, limit_val_batches=0).fit(model, _digits())
    assert sparsity_report(model).sparsity > 0.5
