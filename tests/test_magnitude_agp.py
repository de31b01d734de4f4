"""Zhu & Gupta's AGP inside a real `Trainer.fit`: s_t = s_f + (s_i - s_f)(1 - (t - t0)/(nΔt))^3 at every Δt
optimizer steps, per layer toward each layer's own s_f (Distiller's AutomatedGradualPruner)."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from lightning_prune import DigitsDataModule, ImageClassifier, IterativeMagnitude, PruningSchedule
from lightning_prune.magnitude import MagnitudePruner

from conftest import make_trainer

STEPS_PER_EPOCH = 20  # batches of DigitsDataModule()'s training split (checked below)


class ZerosPerStep(pl.Callback):
    """Zeros of each weight at every training batch start, after the pruning callback acted (it runs first)."""

    def __init__(self) -> None:
        self.zeros: dict[int, dict[str, int]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.zeros[trainer.global_step] = {
            n: int((p == 0).sum()) for n, p in pl_module.named_parameters() if n.endswith("weight")
        }


def zhu_gupta(t: int, t0: int, dt: int, n: int, s_i: float, s_f: float) -> float:
    return s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3


def run(tmp_path, pruning: IterativeMagnitude, max_epochs: int = 2) -> tuple[ImageClassifier, ZerosPerStep]:
    probe = ZerosPerStep()
    model = ImageClassifier("lenet300100")
    make_trainer(tmp_path, [pruning, probe], max_epochs=max_epochs, limit_val_batches=1).fit(model, DigitsDataModule())
    return model, probe


def expected_zeros(step: int, t0: int, dt: int, n: int, s_i: float, s_f: float, numel: int) -> int:
    """round(s·N) at the last event at or before ``step`` (no zeros before t0)."""
    if step < t0:
        return 0
    last = t0 + min((step - t0) // dt, n) * dt
    return round(zhu_gupta(last, t0, dt, n, s_i, s_f) * numel)


def test_per_layer_agp_with_initial_sparsity_hits_the_exact_count_at_every_step_of_a_two_epoch_run(tmp_path):
    finals = {"network.fc1": 0.9, "network.fc2": 0.7}
    s_i, t0, dt = 0.3, 4, 3
    pruning = IterativeMagnitude(finals, "agp", start_epoch=t0, frequency=dt, interval="step", initial_sparsity=s_i,
                                 scope="layer", verbose=False)
    model, probe = run(tmp_path, pruning)
    # end_epoch=None: halfway to the fit's 40 optimizer steps (2 epochs, no max_steps), on an event
    end = t0 + (2 * STEPS_PER_EPOCH - t0) // 2 // dt * dt
    assert pruning.schedule.events == list(range(t0, end + 1, dt)) and end == 22
    n = (end - t0) // dt
    numel = {"network.fc1.weight": 300 * 64, "network.fc2.weight": 100 * 300}
    assert sorted(probe.zeros) == list(range(2 * STEPS_PER_EPOCH))
    for step, zeros in probe.zeros.items():
        for layer, s_f in finals.items():
            name = f"{layer}.weight"
            assert zeros[name] == expected_zeros(step, t0, dt, n, s_i, s_f, numel[name]), (step, layer)
        assert zeros["network.fc3.weight"] == 0  # no target: dense, s_i does not apply
    # s_i is honoured at t0 itself, and each layer ends at its own s_f
    assert probe.zeros[t0]["network.fc1.weight"] == round(s_i * numel["network.fc1.weight"]) > 0
    assert probe.zeros[t0 - 1]["network.fc1.weight"] == 0
    assert (model.network.fc2.weight == 0).sum() == round(0.7 * numel["network.fc2.weight"])


def test_global_agp_with_initial_sparsity_in_a_one_epoch_run(tmp_path):
    s_i, s_f, t0, dt, end = 0.25, 0.8, 2, 2, 12
    pruning = IterativeMagnitude(s_f, "agp", start_epoch=t0, end_epoch=end, frequency=dt, interval="step",
                                 initial_sparsity=s_i, verbose=False)
    _, probe = run(tmp_path, pruning, max_epochs=1)
    total = 300 * 64 + 100 * 300 + 10 * 100
    n = (end - t0) // dt
    for step, zeros in probe.zeros.items():
        assert sum(zeros.values()) == expected_zeros(step, t0, dt, n, s_i, s_f, total), step


def test_initial_sparsity_zero_keeps_the_schedule_of_before():
    """s_i = 0: t0 = start_epoch - Δt, so the first event already prunes (1 - (1 - k/n)^3 at the k-th of n)."""
    assert PruningSchedule("agp", 2, 8, 2).fraction(2) == pytest.approx(1 - (1 - 1 / 4) ** 3)
    with_s_i = PruningSchedule("agp", 2, 8, 2, initial_sparsity=0.1)
    assert [with_s_i.fraction(t) for t in (2, 4, 8)] == pytest.approx([0.0, 1 - (1 - 1 / 3) ** 3, 1.0])


def test_a_bare_training_loop_takes_the_schedules_targets_and_a_restored_pruner_holds_the_same_masks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 5))
    schedule = PruningSchedule("agp", start_epoch=10, end_epoch=40, frequency=10, initial_sparsity=0.2)
    pruner = MagnitudePruner(model, ["0", "2"], {"0": 0.8, "2": 0.5}, scope="layer")
    for t in range(50):
        target = schedule.target(t, pruner.final)
        assert (target is not None) == (t in (10, 20, 30, 40))
        if target is not None:
            pruner.update(target)
        for layer, s_f, numel in (("0", 0.8, 1200), ("2", 0.5, 150)):
            last = min(max(t // 10 * 10, 10), 40)
            expected = 0 if t < 10 else round(zhu_gupta(last, 10, 10, 3, 0.2, s_f) * numel)
            assert int((model.get_submodule(layer).weight == 0).sum()) == expected, (t, layer)
        if t == 25:
            state = pruner.state_dict()
    restored = MagnitudePruner(nn.Sequential(nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 5)), ["0", "2"], {"0": 0.8, "2": 0.5}, scope="layer")
    restored.load_state_dict(state)
    assert all(torch.equal(restored.masks.masks[name], mask) for name, mask in state["masks"].items())
    assert int((restored.model[0].weight == 0).sum()) == round(zhu_gupta(20, 10, 10, 3, 0.2, 0.8) * 1200)
    with pytest.raises(ValueError, match="`initial_sparsity`"):
        schedule.target(10, {"0": 0.8, "2": 0.1})  # s_i = 0.2 above a final target
