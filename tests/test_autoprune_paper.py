"""``paper_defaults``: the paper's numbers (µ = 5e-2, auxiliary lr 1.5e-2, no normalisation) against the calibrated ones."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from lightning_prune import AutoPruneCallback, DigitsDataModule, ImageClassifier
from lightning_prune.auxiliary import auxiliary_gradient


class RecordSteps(pl.Callback):
    """Reads the core's optimizer learning rates and records what every auxiliary step of the core receives."""

    def on_train_start(self, trainer, pl_module):
        core = next(cb for cb in trainer.callbacks if isinstance(cb, AutoPruneCallback)).aux
        self.lrs = [group["lr"] for group in core.optimizer.param_groups]
        self.steps = []
        step = core.step

        def recording(gate_grad, reg, normalize=True, **consistency):
            self.steps.append((reg, normalize))
            return step(gate_grad, reg, normalize, **consistency)

        core.step = recording


def _fit(trainer_factory, callback, seed=0):
    pl.seed_everything(seed)
    model, record = ImageClassifier("lenet300100"), RecordSteps()
    trainer_factory([callback, record], max_epochs=1, limit_train_batches=3, limit_val_batches=0).fit(
        model, DigitsDataModule(aux_fraction=0.5)
    )
    return model, record


@pytest.mark.filterwarnings("ignore:.*fine-tun.*")
def test_paper_defaults_reach_the_core_and_the_calibrated_defaults_are_unchanged(trainer_factory):
    _, paper = _fit(trainer_factory, AutoPruneCallback(paper_defaults=True, verbose=False))
    assert paper.lrs == [1.5e-2] and paper.steps == [(5e-2, False)] * 3
    calibrated_model, calibrated = _fit(trainer_factory, AutoPruneCallback(verbose=False))
    assert calibrated.lrs == [1.5e-2] and calibrated.steps == [(1.25, True)] * 3
    explicit_model, _ = _fit(trainer_factory, AutoPruneCallback(aux_lr=1.5e-2, reg=1.25, verbose=False))
    for key, value in calibrated_model.state_dict().items():  # None resolves to the former explicit defaults
        assert torch.equal(value, explicit_model.state_dict()[key]), key


def test_normalize_off_is_the_literal_signal():
    gate_grad, aux = torch.tensor([2.0, -1.0, 4.0, -3.0]), torch.tensor([1.0, 1.0, -1.0, -1.0])
    plain = dict(sensitivity=False, correlation=False, direction=False)
    literal = auxiliary_gradient(gate_grad, aux, torch.ones(4), 0.0, "leaky_relu", 0.1, normalize=False, **plain)
    assert literal.tolist() == pytest.approx([2.0, -1.0, 0.4, -0.3])  # h̃'(m) ⊙ ∂L/∂h, s = 1
    assert auxiliary_gradient(gate_grad, aux, torch.ones(4), 0.0, "leaky_relu", 0.1, **plain).tolist() == pytest.approx(
        (literal / 2.5).tolist()  # normalised by mean |∂L/∂h| = 2.5
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"paper_defaults": True, "reg": 1.0}, "`reg`=1.0 contradicts `paper_defaults`=True, which sets `reg`=0.05"),
        ({"paper_defaults": True, "aux_lr": 0.1}, "`aux_lr`=0.1 contradicts `paper_defaults`=True, which sets `aux_lr`=0.015"),
        ({"paper_defaults": "yes"}, "`paper_defaults` must be True or False"),
        ({"paper_defaults": True, "reg": -1.0}, "`reg` must be in"),
    ],
)
def test_explicit_values_contradicting_paper_defaults_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AutoPruneCallback(**kwargs)


def test_explicit_values_equal_to_the_papers_are_accepted():
    callback = AutoPruneCallback(paper_defaults=True, reg=5e-2, aux_lr=1.5e-2)
    assert (callback.aux_lr, callback.reg, callback.normalize) == (1.5e-2, 5e-2, False)
