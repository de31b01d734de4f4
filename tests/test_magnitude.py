"""`IterativeMagnitude` inside real `Trainer.fit` runs on the digits data."""

from __future__ import annotations

import csv

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger

from lightning_prune import DigitsDataModule, ImageClassifier, IterativeMagnitude, hook_optimizer, sparsity_report

from conftest import make_trainer


def prunable_weights(model: pl.LightningModule) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("weight")}


class EpochStartProbe(pl.Callback):
    """Records the sparsity right after the pruning callback acted at each epoch start."""

    def __init__(self) -> None:
        self.sparsity: dict[int, float] = {}

    def on_train_epoch_start(self, trainer, pl_module):
        self.sparsity[trainer.current_epoch] = sparsity_report(pl_module).sparsity


def fit(tmp_path, callback, arch="lenet300100", max_epochs=6, probe=None, **trainer_kwargs):
    model = ImageClassifier(arch)
    callbacks = [callback] + ([probe] if probe else [])
    make_trainer(tmp_path, callbacks, max_epochs=max_epochs, **trainer_kwargs).fit(model, DigitsDataModule())
    return model


@pytest.mark.parametrize("schedule", ["one_shot", "iterative", "agp"])
def test_each_schedule_reaches_the_exact_global_target_and_follows_its_steps(tmp_path, schedule):
    probe = EpochStartProbe()
    callback = IterativeMagnitude(sparsity=0.9, schedule=schedule, start_epoch=1, end_epoch=4, verbose=False)
    model = fit(tmp_path, callback, probe=probe)
    report = sparsity_report(model)
    assert report.total.total - report.total.nonzero == round(0.9 * report.total.total)
    for epoch in range(6):
        fraction = callback.schedule.fraction(epoch)
        if fraction is not None:
            assert probe.sparsity[epoch] == pytest.approx(0.9 * fraction, abs=1e-4)
    assert probe.sparsity[0] == 0.0


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_a_target_between_two_weight_counts_prunes_the_nearest_count(tmp_path, scope):
    """0.333 of LeNet-300-100's 50,200 weights is 16,716.6: 16,717 zeros (round(s·N), as documented; floor gives 16,716).
    Per layer, fc1's 19,200 weights ask for 6,393.6: 6,394."""
    callback = IterativeMagnitude(sparsity=0.333, schedule="one_shot", start_epoch=0, scope=scope, verbose=False)
    model = fit(tmp_path, callback, max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    report = sparsity_report(model)
    zeros = {row.layer: row.total - row.nonzero for row in report.layers}
    if scope == "global":
        assert report.total.total == 50_200 and report.total.total - report.total.nonzero == 16_717
    else:
        assert zeros == {"network.fc1": 6_394, "network.fc2": 9_990, "network.fc3": 333}


def test_layer_scope_prunes_every_layer_to_the_same_sparsity(tmp_path):
    model = fit(tmp_path, IterativeMagnitude(sparsity=0.7, scope="layer", schedule="iterative", start_epoch=1, end_epoch=2))
    for row in sparsity_report(model).layers:
        assert row.total - row.nonzero == round(0.7 * row.total)


def test_per_layer_targets_are_reached_and_unnamed_layers_are_left_dense(tmp_path):
    targets = {"network.fc1": 0.95, "network.fc2": 0.5}
    model = fit(tmp_path, IterativeMagnitude(sparsity=targets, scope="layer", schedule="one_shot", start_epoch=1))
    rows = {row.layer: row for row in sparsity_report(model).layers}
    for layer, target in targets.items():
        assert rows[layer].total - rows[layer].nonzero == round(target * rows[layer].total)
    assert rows["network.fc3"].sparsity == 0.0


class WeightsBeforePruning(pl.Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch, self.weights = epoch, None

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            self.weights = prunable_weights(pl_module)


def test_sensitivity_criterion_drops_weights_below_s_sigma_of_the_dense_layer(tmp_path):
    before = WeightsBeforePruning(epoch=2)
    callback = IterativeMagnitude(criterion="sensitivity", sensitivity={"network.fc1": 1.0, "network.fc2": 0.5, "network.fc3": 0.25}, schedule="one_shot", start_epoch=2, make_permanent=False)
    model = ImageClassifier("lenet300100")
    make_trainer(tmp_path, [before, callback], max_epochs=4).fit(model, DigitsDataModule())
    for layer, s in {"network.fc1": 1.0, "network.fc2": 0.5, "network.fc3": 0.25}.items():
        dense = before.weights[f"{layer}.weight"]
        expected_zero = dense.abs() < s * dense.std()
        assert torch.equal(model.get_parameter(f"{layer}.weight") == 0, expected_zero)
        assert callback.pruner.sigmas[f"{layer}.weight"] == pytest.approx(float(dense.std()))


class ZeroWatcher(pl.Callback):
    """After the pruning callback (its optimizer hooks come first): gradients of pruned weights are zero when the
    optimizer reads them, in every optimizer step."""

    def __init__(self) -> None:
        self.steps_checked = 0

    def on_train_start(self, trainer, pl_module):
        self.pruning = next(cb for cb in trainer.callbacks if isinstance(cb, IterativeMagnitude))
        self.pl_module = pl_module
        for optimizer in trainer.optimizers:
            hook_optimizer(optimizer, self)

    def before_step(self):
        if not self.pruning.masks:
            return
        for name, mask in self.pruning.masks.masks.items():
            grad = self.pl_module.get_parameter(name).grad
            assert grad is not None and not grad[~mask].any(), name
        self.steps_checked += 1

    def after_step(self):
        pass


class Langevin(torch.optim.Optimizer):
    """SGD plus Gaussian noise on every weight (stochastic gradient Langevin dynamics): it moves weights whose
    gradient is zero, so masking gradients and optimizer state alone cannot keep pruned weights at zero."""

    def __init__(self, params, lr: float = 0.05, noise: float = 1e-3) -> None:
        super().__init__(params, dict(lr=lr, noise=noise))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])
                p.add_(torch.randn_like(p), alpha=group["noise"])
        return loss


class LangevinClassifier(ImageClassifier):
    def configure_optimizers(self):
        return Langevin(self.parameters())


@pytest.mark.parametrize(
    "make_model, trainer_kwargs",
    [
        (lambda: ImageClassifier("lenet5", optimizer="sgd", momentum=0.9, weight_decay=1e-3), {}),
        (lambda: ImageClassifier("lenet5", optimizer="adam", lr=1e-3, weight_decay=1e-4), dict(accumulate_grad_batches=3)),
        (lambda: ImageClassifier("lenet5", optimizer="sgd", momentum=0.9), dict(precision="bf16-mixed")),
        (lambda: LangevinClassifier("lenet5"), {}),
    ],
    ids=["sgd-momentum-wd", "adam-accumulation", "bf16-amp", "langevin-noise"],
)
def test_pruned_weights_stay_exactly_zero_through_training(tmp_path, make_model, trainer_kwargs):
    watcher = ZeroWatcher()
    pruning = IterativeMagnitude(sparsity=0.8, schedule="one_shot", start_epoch=1, make_permanent=False)
    model = make_model()
    trainer = make_trainer(tmp_path, [pruning, watcher], max_epochs=4, **trainer_kwargs)
    trainer.fit(model, DigitsDataModule())
    assert watcher.steps_checked > 10
    masks = pruning.masks.masks
    moves_zero_gradients = isinstance(model, LangevinClassifier)
    for name, mask in masks.items():
        assert not model.get_parameter(name)[~mask].any(), name  # re-zeroed after every optimizer step
        if not moves_zero_gradients:  # the noise's -0.0 times 0 stays -0.0 (zero either way)
            assert not torch.signbit(model.get_parameter(name)[~mask]).any()  # still the +0.0 the event wrote
    # no optimizer state builds up on pruned weights: momentum / Adam moments stay zero there
    optimizer = trainer.optimizers[0]
    for name, mask in masks.items():
        state = optimizer.state[model.get_parameter(name)]
        for key in ("momentum_buffer", "exp_avg"):
            if state.get(key) is not None:
                assert not state[key][~mask].any(), (name, key)
    assert sparsity_report(model).total.total - sparsity_report(model).total.nonzero == round(0.8 * sparsity_report(model).total.total)


def test_rewind_to_init_resets_surviving_weights_after_pruning(tmp_path):
    class InitAndAfter(pl.Callback):
        def on_fit_start(self, trainer, pl_module):
            self.init = prunable_weights(pl_module)

        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                self.after = prunable_weights(pl_module)

    probe = InitAndAfter()
    model = ImageClassifier("lenet300100")
    make_trainer(tmp_path, [IterativeMagnitude(0.5, "one_shot", start_epoch=1, rewind="init"), probe], max_epochs=2).fit(
        model, DigitsDataModule()
    )
    zeros = total = 0
    for name, after in probe.after.items():
        kept = after != 0
        assert torch.equal(after[kept], probe.init[name][kept])
        zeros, total = zeros + int((~kept).sum()), total + after.numel()
    assert zeros == round(0.5 * total)


def test_make_permanent_false_keeps_enforcing_masks_in_a_second_fit(tmp_path):
    pruning = IterativeMagnitude(0.6, "one_shot", start_epoch=0, make_permanent=False, verbose=False)
    model = ImageClassifier("lenet300100")
    data = DigitsDataModule()
    make_trainer(tmp_path, [pruning], max_epochs=2).fit(model, data)
    zeros = {n: p == 0 for n, p in model.named_parameters() if n in pruning.masks.masks}
    make_trainer(tmp_path, [pruning], max_epochs=2).fit(model, data)
    for name, was_zero in zeros.items():
        assert not model.get_parameter(name)[was_zero].any()


def test_permanent_model_holds_plain_weights_and_its_checkpoint_loads_into_a_fresh_model(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    pruning = IterativeMagnitude(0.9, "agp", start_epoch=1, end_epoch=3)
    model = ImageClassifier("lenet300100")
    make_trainer(tmp_path, [pruning, checkpoint], max_epochs=5, enable_checkpointing=True).fit(model, DigitsDataModule())
    assert pruning.masks is None
    assert sorted(model.state_dict()) == sorted(ImageClassifier("lenet300100").state_dict())
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["state_dict"]
    fresh = ImageClassifier("lenet300100")
    fresh.load_state_dict(state)
    assert sparsity_report(fresh).sparsity == pytest.approx(0.9, abs=1e-4)


def test_pruning_metrics_reach_the_trainer_logger(tmp_path):
    logger = CSVLogger(tmp_path, name="run")
    fit(tmp_path, IterativeMagnitude(0.8, "iterative", start_epoch=1, end_epoch=2), logger=logger)
    with open(logger.log_dir + "/metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    targets = [float(r["prune/target_sparsity"]) for r in rows if r.get("prune/target_sparsity")]
    sparsities = [float(r["prune/sparsity"]) for r in rows if r.get("prune/sparsity")]
    assert targets == pytest.approx([0.4, 0.8])
    assert sparsities == pytest.approx([0.4, 0.8], abs=1e-4)
    assert any(r.get("prune/sparsity/network.fc1") for r in rows)


def test_resume_mid_schedule_ends_with_the_masks_of_an_uninterrupted_run(tmp_path):
    def run(directory, ckpt_path=None):
        pl.seed_everything(0)
        model = ImageClassifier("lenet300100")
        checkpoint = ModelCheckpoint(dirpath=directory, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
        pruning = IterativeMagnitude(0.9, "agp", start_epoch=1, end_epoch=5, verbose=False)
        trainer = make_trainer(directory, [pruning, checkpoint], max_epochs=7, enable_checkpointing=True)
        trainer.fit(model, DigitsDataModule(), ckpt_path=ckpt_path)
        return model

    uninterrupted = run(tmp_path / "a")
    resumed = run(tmp_path / "b", ckpt_path=tmp_path / "a" / "epoch=2.ckpt")
    for (name, a), (_, b) in zip(uninterrupted.state_dict().items(), resumed.state_dict().items()):
        if name.endswith("weight"):
            assert torch.equal(a == 0, b == 0), name
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name


def test_a_model_fvcore_cannot_trace_still_prunes_without_flops(tmp_path):
    class Untraceable(ImageClassifier):
        def __init__(self):
            super().__init__("lenet300100")
            self.example_input_array = torch.zeros(1, 1, 4, 4)  # wrong shape: tracing fails, training does not

    pruning = IterativeMagnitude(0.5, "one_shot", start_epoch=1)
    model = Untraceable()
    with pytest.warns(UserWarning, match="FLOPs are not reported"):
        make_trainer(tmp_path, [pruning], max_epochs=2).fit(model, DigitsDataModule())
    assert pruning.figures.dense_flops is None
    report = sparsity_report(model)
    assert report.total.total - report.total.nonzero == round(0.5 * report.total.total)
