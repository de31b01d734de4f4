"""AutoPrune never loses a run: resume anywhere, odd data, manual optimization, tied weights, schedules, bad input."""

from __future__ import annotations

import warnings

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torch.nn.utils.parametrize as parametrize
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune import AutoPruneCallback, DigitsDataModule, ImageClassifier, sparsity_report
from lightning_prune.auxiliary import AuxiliaryParameters
from lightning_prune.structure import find_channel_groups

from task_models import PixelRegressor, pixel_loader
from test_autoprune import CountingLoader

FAST = dict(init=0.1, aux_lr=0.05, reg=2.0, verbose=False)


def _digits():
    return DigitsDataModule(aux_fraction=0.5)


# ---------------------------------------------------------------------- resume
def test_resume_from_a_mid_epoch_checkpoint_with_an_auxiliary_split(tmp_path, trainer_factory):
    checkpoints = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=4, save_top_k=-1, filename="{step}")
    trainer = trainer_factory([AutoPruneCallback(**FAST), checkpoints], max_epochs=2, enable_checkpointing=True, limit_val_batches=0)
    trainer.fit(ImageClassifier("lenet300100"), _digits())
    middle = tmp_path / "ckpt" / "step=4.ckpt"  # inside epoch 0 (10 batches per epoch)
    saved = torch.load(middle, weights_only=False)["callbacks"]["AutoPruneCallback"]["aux"]
    callback = AutoPruneCallback(**FAST)
    model = ImageClassifier("lenet300100")
    resumed = trainer_factory([callback], max_epochs=2, limit_val_batches=0)
    resumed.fit(model, _digits(), ckpt_path=str(middle))
    assert resumed.global_step == trainer.global_step
    assert sparsity_report(model).sparsity > 0.1
    assert any((value <= 0).any() for value in saved["values"].values())


class _CaptureM(pl.Callback):
    """``M`` as it is when training ends (before ``on_fit_end`` makes the masks permanent)."""

    def __init__(self, pruning: AutoPruneCallback) -> None:
        self.pruning, self.values = pruning, None

    def on_train_end(self, trainer, pl_module) -> None:
        self.values = {key: value.clone() for key, value in self.pruning.aux.state_dict()["values"].items()}


def test_mid_epoch_resume_with_a_shuffled_auxiliary_split_ends_as_the_uninterrupted_run(tmp_path, trainer_factory):
    data = _digits()
    data.setup("fit")
    images, labels = data.train_set.tensors
    # every training batch is the same, so the run depends on where the shuffled auxiliary split goes on from
    same_batches = DataLoader(TensorDataset(images[:32].repeat(10, 1, 1, 1), labels[:32].repeat(10)), batch_size=32)

    def run(ckpt_path=None, callbacks=()):
        pl.seed_everything(0)
        pruning = AutoPruneCallback(aux_dataloader=data.aux_dataloader(), **FAST)  # shuffled, reseeded per epoch
        capture, model = _CaptureM(pruning), ImageClassifier("lenet300100")
        trainer = trainer_factory([pruning, capture, *callbacks], max_epochs=2, enable_checkpointing=bool(callbacks), limit_val_batches=0)
        trainer.fit(model, train_dataloaders=same_batches, ckpt_path=ckpt_path)
        return model, capture.values

    checkpoints = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=4, save_top_k=-1, filename="{step}")
    model, values = run(callbacks=[checkpoints])
    assert len(data.aux_dataloader()) > 4  # a restarted pass would draw other batches than the 5th on
    resumed, resumed_values = run(ckpt_path=str(tmp_path / "ckpt" / "step=4.ckpt"))  # inside epoch 0 (10 batches)
    for key, value in model.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert values.keys() == resumed_values.keys() and all(torch.equal(values[k], resumed_values[k]) for k in values)


def test_resume_with_changed_layers_is_refused_not_dropped(tmp_path, trainer_factory):
    checkpoints = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_epochs=1, save_top_k=-1, filename="{epoch}")
    first = AutoPruneCallback(parameters=["network.fc1"], **FAST)
    trainer_factory([first, checkpoints], max_epochs=1, enable_checkpointing=True).fit(ImageClassifier("lenet300100"), _digits())
    path = str(tmp_path / "ckpt" / "epoch=0.ckpt")
    model = ImageClassifier("lenet300100")
    changed = AutoPruneCallback(parameters=["network.fc2"], **FAST)
    with pytest.raises(ValueError, match="resume with the `granularity`, `parameters` and `exclude`"):
        trainer_factory([changed], max_epochs=2).fit(model, _digits(), ckpt_path=path)
    assert not parametrize.is_parametrized(model)


# ---------------------------------------------------------------------- data
def test_an_empty_auxiliary_loader_is_a_clear_error(trainer_factory):
    empty = DataLoader(TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)), batch_size=4)
    trainer = trainer_factory([AutoPruneCallback(aux_dataloader=empty, verbose=False)], max_epochs=1)
    with pytest.raises(MisconfigurationException, match="yields no batch"):
        trainer.fit(ImageClassifier("lenet300100"), _digits())


# ---------------------------------------------------------------------- channel floor
def test_channel_groups_keep_one_channel_and_warn(trainer_factory):
    callback = AutoPruneCallback(granularity="channel", physical=True, aux_dataloader=pixel_loader(seed=1),
                                 init=0.01, aux_lr=0.5, reg=50.0, verbose=False)
    model = PixelRegressor()
    with pytest.warns(UserWarning, match="largest m was kept"):
        trainer_factory([callback], max_epochs=2, limit_val_batches=0).fit(model, train_dataloaders=pixel_loader())
    widths = [m.out_channels for m in model.net if isinstance(m, nn.Conv2d)]
    assert widths[:2] == [1, 1]
    assert model({"image": torch.rand(2, 1, 16, 16)}).std() > 0  # not a constant output


def test_core_channel_floor_keeps_the_largest_m():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))
    groups = find_channel_groups(net, torch.zeros(1, 1, 8, 8))
    core = AuxiliaryParameters(net, granularity="channel", groups=groups, init=0.01)
    core.prepare()
    core.build_optimizer("sgd", 1.0)
    core.values["0"].copy_(torch.tensor([0.01, 0.02, 0.5, 0.03]))
    core.step(torch.zeros(4), reg=100.0)
    assert int((core.values["0"] > 0).sum()) == 1  # every m was pulled below zero; the largest is kept on
    assert core.take_counts()["collapsed"]


# ---------------------------------------------------------------------- tied weights
class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_tied_weights_share_one_auxiliary_tensor_in_state_and_checkpoint():
    net = Tied()
    core = AuxiliaryParameters(net, ["a", "b"], init=0.5)
    core.prepare()
    assert list(core.values) == ["a"]
    core.values["a"][0] = -1.0
    assert torch.equal(net.a.weight[0], torch.zeros(6)) and torch.equal(net.b.weight[0], torch.zeros(6))
    state = core.state_dict()
    assert list(state["values"]) == ["a"] and len(state["switched_off"]) == 1
    core.finalize()
    assert net.a.weight is net.b.weight and torch.equal(net.a.weight[0], torch.zeros(6))


# ---------------------------------------------------------------------- manual optimization
class TwoOptimizers(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.body, self.head = nn.Linear(64, 32), nn.Linear(32, 10)

    def forward(self, x):
        return self.head(torch.relu(self.body(x.flatten(1))))

    def training_step(self, batch, batch_idx):
        first, second = self.optimizers()
        loss = F.cross_entropy(self(batch[0]), batch[1])
        first.zero_grad()
        second.zero_grad()
        self.manual_backward(loss)
        first.step()
        second.step()

    def configure_optimizers(self):
        return (torch.optim.SGD(self.body.parameters(), lr=0.1, momentum=0.9, weight_decay=0.05),
                torch.optim.AdamW(self.head.parameters(), lr=0.01, weight_decay=0.1))


class HiddenWeightsStay(pl.Callback):
    """While M learns (up to ``last_epoch``), weights switched off when a batch starts have the same hidden value
    when the next one starts (afterwards M is fixed and they never return)."""

    def __init__(self, last_epoch):
        self.previous, self.checked, self.last_epoch = None, 0, last_epoch

    def _state(self, trainer):
        pruning = next(cb for cb in trainer.callbacks if isinstance(cb, AutoPruneCallback))
        return {key: (pruning.aux.original((key, "weight")).detach().clone(), (value <= 0).clone())
                for key, value in pruning.aux.values.items()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch > self.last_epoch:
            return
        state = self._state(trainer)
        for key, (weight, off) in (self.previous or {}).items():
            assert torch.equal(state[key][0][off], weight[off]), key
            self.checked += int(off.sum())
        self.previous = state


def test_manual_optimization_with_two_optimizers_keeps_switched_off_weights(trainer_factory):
    def loss_fn(module, batch):
        return F.cross_entropy(module(batch[0]), batch[1])

    guard = HiddenWeightsStay(last_epoch=1)
    callback = AutoPruneCallback(loss_fn=loss_fn, end_epoch=1, **FAST)
    trainer_factory([callback, guard], max_epochs=3, limit_val_batches=0).fit(TwoOptimizers(), _digits())
    assert guard.checked > 100


# ---------------------------------------------------------------------- schedules and limits
def test_no_fine_tuning_phase_warns_at_setup_and_in_the_summary(trainer_factory):
    with pytest.warns(UserWarning) as record:
        trainer_factory([AutoPruneCallback(**FAST)], max_epochs=1).fit(ImageClassifier("lenet300100"), _digits())
    messages = [str(w.message) for w in record]
    assert any("never fine-tuned" in m for m in messages)
    assert any("training ended before the fine-tuning phase" in m for m in messages)


def test_max_steps_learns_m_for_the_first_three_quarters(trainer_factory):
    data = _digits()
    data.setup("fit")
    loader = CountingLoader(data.aux_dataloader())
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer = trainer_factory([AutoPruneCallback(aux_dataloader=loader, **FAST)], max_epochs=-1, max_steps=16,
                                  limit_val_batches=0)
        trainer.fit(ImageClassifier("lenet300100"), data)
    assert loader.batches == 12


@pytest.mark.parametrize("fast_dev_run", [True, 2])
def test_fast_dev_run_completes(trainer_factory, fast_dev_run):
    callback = AutoPruneCallback(**FAST)
    model = ImageClassifier("lenet300100")
    trainer_factory([callback], fast_dev_run=fast_dev_run).fit(model, _digits())
    assert callback.aux is None and not parametrize.is_parametrized(model)


def test_bf16_true_precision(trainer_factory):
    callback = AutoPruneCallback(**{**FAST, "reg": 3.0})
    model = ImageClassifier("lenet300100")
    trainer_factory([callback], max_epochs=2, precision="bf16-true", limit_val_batches=0).fit(model, _digits())
    assert model.network.fc1.weight.dtype == torch.bfloat16
    assert sparsity_report(model).sparsity > 0.1


def test_bf16_true_precision_with_channel_groups_found_at_setup(trainer_factory):
    """The groups are found in ``setup``, before Lightning converts the module to bf16: the example input is read in the
    module's dtype of that moment, not cast ahead of it."""
    callback = AutoPruneCallback(**{**FAST, "reg": 3.0}, granularity="channel")
    model = ImageClassifier("resnet20")
    trainer_factory([callback], max_epochs=2, precision="bf16-true", limit_train_batches=4, limit_val_batches=0).fit(model, _digits())
    assert model.network.stem[0].weight.dtype == torch.bfloat16
    assert callback.figures.groups


def test_reused_instance_and_two_instances(trainer_factory):
    callback = AutoPruneCallback(**FAST)
    for _ in range(2):
        model = ImageClassifier("lenet300100")
        trainer_factory([callback], max_epochs=2, limit_val_batches=0).fit(model, _digits())
        assert sparsity_report(model).sparsity > 0.1 and not parametrize.is_parametrized(model)
    model = ImageClassifier("lenet300100")
    refused = "Only one AutoPruneCallback|more than one stateful callback of type `AutoPruneCallback`"
    with pytest.raises((MisconfigurationException, RuntimeError), match=refused):  # Lightning's own check comes first
        trainer_factory([AutoPruneCallback(**FAST), AutoPruneCallback(**FAST)], max_epochs=1).fit(model, _digits())
    assert not parametrize.is_parametrized(model)


# ---------------------------------------------------------------------- bad input
def _two_args(a, b):
    return a


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"aux_lr": "0.1"}, "aux_lr"),
        ({"aux_lr": True}, "aux_lr"),
        ({"reg": float("nan")}, "reg"),
        ({"ste_slope": "0.5"}, "ste_slope"),
        ({"init": -1.0}, "init"),
        ({"start_epoch": 1.5}, "start_epoch"),
        ({"start_epoch": True}, "start_epoch"),
        ({"end_epoch": "3"}, "end_epoch"),
        ({"sensitivity": 1}, "sensitivity"),
        ({"verbose": "yes"}, "verbose"),
        ({"aux_dataloader": 123}, "aux_dataloader"),
        ({"aux_dataloader": "data"}, "aux_dataloader"),
        ({"loss_fn": "ce"}, "loss_fn"),
        ({"loss_fn": lambda batch: batch}, "loss_fn"),
        ({"example_input_fn": _two_args}, "example_input_fn"),
        ({"parameters": "fc1"}, "parameters"),
        ({"parameters": [None]}, "parameters"),
        ({"exclude": "fc1"}, "exclude"),
        ({"granularity": "kernel"}, "granularity"),
    ],
)
def test_bad_input_names_the_argument_before_anything_runs(kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        AutoPruneCallback(**kwargs)
