"""`IterativeMagnitude` in odd set-ups: step schedules, training that ends early, resumes with changed
arguments, mid-epoch resumes after an event, fast_dev_run, reused and multiple instances, layers that would be emptied.
(No host sync in its per-step hooks: ``test_host_syncs.py``.)"""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader

from lightning_prune import DigitsDataModule, ImageClassifier, IterativeMagnitude, sparsity_report
from lightning_prune.demo.data import EpochSeededSampler

from conftest import make_trainer

SMALL = dict(limit_train_batches=5, limit_val_batches=1)


def exact(model, target, layers=None):
    total = sparsity_report(model, layers).total
    return total.total - total.nonzero == round(target * total.total)


class StepProbe(pl.Callback):
    def __init__(self) -> None:
        self.sparsity: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.sparsity.append(sparsity_report(pl_module).sparsity)


def test_a_step_schedule_follows_max_steps_to_the_exact_target(tmp_path):
    probe = StepProbe()
    pruning = IterativeMagnitude(0.8, "agp", start_epoch=2, frequency=2, interval="step", verbose=False)
    model = ImageClassifier("lenet300100")
    make_trainer(tmp_path, [pruning, probe], max_epochs=None, max_steps=24, **SMALL).fit(model, DigitsDataModule())
    assert pruning.schedule.events == [2, 4, 6, 8, 10, 12]  # halfway to max_steps
    assert len(set(round(s, 4) for s in probe.sparsity)) == 7  # dense + six AGP events
    assert probe.sparsity == sorted(probe.sparsity)
    assert exact(model, 0.8)


def test_an_epoch_schedule_without_an_end_and_without_max_epochs_is_refused(tmp_path):
    trainer = make_trainer(tmp_path, [IterativeMagnitude(0.8, "agp")], max_epochs=None, max_steps=20, **SMALL)
    with pytest.raises(ValueError, match="`end_epoch`"):
        trainer.fit(ImageClassifier("lenet300100"), DigitsDataModule())


class StopAfterTwoEpochs(pl.Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = trainer.current_epoch >= 1


def test_training_that_stops_before_the_schedule_ends_is_warned_about_at_the_start_and_in_the_summary(tmp_path, caplog):
    # the Trainer's own limits are refused at the start (tests/test_bad_input_at_setup.py); a stop no limit predicts is reported
    pruning = IterativeMagnitude(0.9, "agp", start_epoch=1, end_epoch=4)
    with pytest.warns(UserWarning, match="schedule incomplete"):
        make_trainer(tmp_path, [pruning, StopAfterTwoEpochs()], max_epochs=6, **SMALL).fit(ImageClassifier("lenet300100"), DigitsDataModule())
    assert "WARNING: schedule incomplete" in caplog.text
    with pytest.warns(UserWarning, match="EarlyStopping may end training"):
        make_trainer(tmp_path, [IterativeMagnitude(0.5, "agp", 1, 2), EarlyStopping("val/acc", patience=0, mode="max")],
                     max_epochs=3, **SMALL).fit(ImageClassifier("lenet300100"), DigitsDataModule())


def run_with_checkpoints(directory, pruning, ckpt_path=None, max_epochs=5):
    pl.seed_everything(0)
    model = ImageClassifier("lenet300100")
    checkpoint = ModelCheckpoint(dirpath=directory, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    make_trainer(directory, [pruning, checkpoint], max_epochs=max_epochs, enable_checkpointing=True, **SMALL).fit(
        model, DigitsDataModule(), ckpt_path=ckpt_path)
    return model


def zero_masks_at(path):
    state = torch.load(path, weights_only=False)["state_dict"]
    return {k: v == 0 for k, v in state.items() if k.endswith("weight")}


def test_a_resume_with_changed_arguments_keeps_every_mask(tmp_path):
    run_with_checkpoints(tmp_path / "a", IterativeMagnitude(0.9, "agp", 1, 3, make_permanent=False, verbose=False))
    saved = zero_masks_at(tmp_path / "a" / "epoch=1.ckpt")
    changed = IterativeMagnitude(0.8, "iterative", 1, 3, parameters=["network.fc*"], make_permanent=False, verbose=False)
    with pytest.warns(UserWarning, match="changed arguments"):
        model = run_with_checkpoints(tmp_path / "b", changed, tmp_path / "a" / "epoch=1.ckpt")
    for name, was_zero in saved.items():
        assert not model.state_dict()[name][was_zero].any(), name  # nothing grew back
    assert exact(model, 0.8)


def test_state_saved_under_an_older_key_is_adopted_and_an_ambiguous_one_refused(tmp_path):
    run_with_checkpoints(tmp_path / "a", IterativeMagnitude(0.9, "agp", 1, 3, make_permanent=False, verbose=False))
    checkpoint = torch.load(tmp_path / "a" / "epoch=1.ckpt", weights_only=False)
    state = checkpoint["callbacks"].pop("IterativeMagnitude")
    checkpoint["callbacks"]["IterativeMagnitude{'sparsity': 0.9, 'schedule': 'agp'}"] = state
    torch.save(checkpoint, tmp_path / "legacy.ckpt")
    saved = zero_masks_at(tmp_path / "a" / "epoch=1.ckpt")
    with pytest.warns(UserWarning, match="resuming the state saved under"):
        model = run_with_checkpoints(tmp_path / "b", IterativeMagnitude(0.9, "agp", 1, 3, verbose=False), tmp_path / "legacy.ckpt")
    for name, was_zero in saved.items():
        assert not model.state_dict()[name][was_zero].any(), name
    checkpoint["callbacks"]["IterativeMagnitude[name=other]"] = state
    torch.save(checkpoint, tmp_path / "two.ckpt")
    with pytest.raises(MisconfigurationException, match="pass the `name`"):
        run_with_checkpoints(tmp_path / "c", IterativeMagnitude(0.9, "agp", 1, 3, verbose=False), tmp_path / "two.ckpt")


@pytest.mark.parametrize("fast_dev_run", [True, 2])
def test_fast_dev_run_runs_the_callback_to_completion(tmp_path, fast_dev_run):
    model = ImageClassifier("lenet300100")
    pruning = IterativeMagnitude(0.7, "agp", start_epoch=2, end_epoch=6)
    make_trainer(tmp_path, [pruning], fast_dev_run=fast_dev_run).fit(model, DigitsDataModule())
    assert exact(model, 0.7) and pruning.pruner is None  # pruned and made permanent


def test_one_instance_reused_for_a_second_fit_and_two_named_instances(tmp_path):
    pruning = IterativeMagnitude(0.5, "one_shot", start_epoch=0, verbose=False)
    data = DigitsDataModule()
    for _ in range(2):
        model = ImageClassifier("lenet300100")
        make_trainer(tmp_path, [pruning], max_epochs=1, **SMALL).fit(model, data)
        assert exact(model, 0.5)
    with pytest.raises(RuntimeError, match="state_key` must be unique"):  # Lightning's own check: pass `name`
        make_trainer(tmp_path, [IterativeMagnitude(0.5, "one_shot"), IterativeMagnitude(0.5, "one_shot")], max_epochs=1).fit(
            ImageClassifier("lenet300100"), data)
    first = IterativeMagnitude(0.5, "one_shot", parameters=["network.fc1"], name="fc1", verbose=False)
    second = IterativeMagnitude(0.3, "one_shot", parameters=["network.fc2"], name="fc2", verbose=False)
    model = ImageClassifier("lenet300100")
    make_trainer(tmp_path, [first, second], max_epochs=1, **SMALL).fit(model, data)
    assert exact(model, 0.5, ["network.fc1"]) and exact(model, 0.3, ["network.fc2"])


class ShrinkLastLayer(pl.Callback):
    def on_train_start(self, trainer, pl_module):
        with torch.no_grad():
            pl_module.network.fc3.weight.mul_(1e-6)


def test_no_layer_is_emptied_by_default_and_an_emptied_layer_is_warned_about(tmp_path):
    model = ImageClassifier("lenet300100")
    make_trainer(tmp_path, [ShrinkLastLayer(), IterativeMagnitude(0.9, "one_shot", verbose=False)], max_epochs=1, **SMALL).fit(model, DigitsDataModule())
    rows = {row.layer: row for row in sparsity_report(model).layers}
    assert rows["network.fc3"].nonzero == 10  # held at max_layer_sparsity=0.99 of its 1,000 weights
    assert exact(model, 0.9)
    model = ImageClassifier("lenet300100")
    with pytest.warns(UserWarning, match="every weight of 'network.fc3' is pruned"):
        make_trainer(tmp_path, [ShrinkLastLayer(), IterativeMagnitude(0.9, "one_shot", max_layer_sparsity=1.0, verbose=False)],
                     max_epochs=1, **SMALL).fit(model, DigitsDataModule())


class ResumableLoader(DataLoader):
    """A DataLoader Lightning resumes mid-epoch: ``state_dict`` (saved in the checkpoint) counts the batches given
    this epoch; after ``load_state_dict`` the next epoch's iteration skips that many (DigitsDataModule's loader is
    not resumable: a mid-epoch resume would replay the epoch's first batches)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.given, self.skip = 0, 0

    def __iter__(self):
        skip, self.skip = self.skip, 0
        for index, batch in enumerate(super().__iter__()):
            self.given = index + 1
            if index >= skip:
                yield batch

    def state_dict(self) -> dict:
        return {"given": self.given}

    def load_state_dict(self, state: dict) -> None:
        self.skip = state["given"]


class ResumableDigits(DigitsDataModule):
    def train_dataloader(self) -> DataLoader:
        return ResumableLoader(self.train_set, batch_size=self.batch_size, sampler=EpochSeededSampler(len(self.train_set), self.seed))


def fit_saving_at(directory, make_pruning, step, ckpt_path=None, max_epochs=3):
    """Six optimizer steps per epoch, a checkpoint at optimizer step ``step``, one validation batch per epoch."""
    pl.seed_everything(0)
    model, pruning = ImageClassifier("lenet300100"), make_pruning()
    checkpoint = ModelCheckpoint(dirpath=directory, save_top_k=-1, every_n_train_steps=step, filename="{step}")
    trainer = make_trainer(directory, [pruning, checkpoint], max_epochs=max_epochs, enable_checkpointing=True,
                           limit_train_batches=6, limit_val_batches=1)
    trainer.fit(model, ResumableDigits(), ckpt_path=ckpt_path)
    return model, pruning


@pytest.mark.parametrize(
    "make_pruning",
    [  # each holds state the zeros do not show: sigma of the dense layers, the weights at init, that the last event ran
        lambda: IterativeMagnitude(criterion="sensitivity", sensitivity=0.8, schedule="iterative", start_epoch=1, end_epoch=2, make_permanent=False, verbose=False),
        lambda: IterativeMagnitude(0.8, "iterative", start_epoch=1, end_epoch=2, rewind="init", make_permanent=False, verbose=False),
        lambda: IterativeMagnitude(0.8, "agp", start_epoch=2, end_epoch=8, frequency=2, interval="step", make_permanent=False, verbose=False),
    ],
    ids=["sensitivity", "rewind-init", "step-interval"],
)
def test_a_mid_epoch_resume_after_an_event_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, make_pruning):
    """The checkpoint at step 9 lies inside epoch 1: after the event at its start and before the one at epoch 2
    (epoch schedules), after the last event at step 8 (interval="step"). The resumed run also keeps the dense
    model's score of the summary (taken before the first event only) and knows its schedule is complete."""
    uninterrupted, first = fit_saving_at(tmp_path / "a", make_pruning, 9)
    resumed, second = fit_saving_at(tmp_path / "b", make_pruning, 9, ckpt_path=tmp_path / "a" / "step=9.ckpt")
    for name, value in uninterrupted.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
    assert first.masks.masks.keys() == second.masks.masks.keys()
    assert all(torch.equal(mask, second.masks.masks[name]) for name, mask in first.masks.masks.items())
    assert second.last_event == first.last_event == second.schedule.last_event  # the schedule is complete
    assert second.figures.dense_score == first.figures.dense_score
    assert (first.figures.dense_score is None) == (first.interval == "step")  # epoch schedules: epoch 0 validated first
