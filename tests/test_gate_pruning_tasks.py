"""GatePruningFromScratch on a user's own non-classification LightningModules (dict batches, their own
losses, no example_input_array): the gate loss is their training_step's, the snapshot is chosen on their
own validation metric (`monitor`/`mode`), the FLOPs target holds by an fvcore recount (per sample)."""

from __future__ import annotations

import math

import pytest
import torch
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from lightning_prune import DigitsDataModule, GatePruningFromScratch, ImageClassifier
from lightning_prune.flops import count_flops
from task_models import PixelRegressor, TokenTagger, pixel_loader, token_loader

LIMITS = dict(limit_train_batches=4, limit_val_batches=2, num_sanity_val_steps=0)


def pixel_sample() -> tuple:
    batch = next(iter(pixel_loader(samples=1, batch_size=1)))
    return (batch,)


def token_sample() -> tuple:
    return (next(iter(token_loader(samples=1, batch_size=1)))["tokens"],)


def test_pixel_regressor_gates_at_bn_meet_the_flops_target_and_train(trainer_factory) -> None:
    model = PixelRegressor()
    dense = count_flops(model, pixel_sample()).total
    pruning = GatePruningFromScratch(flops_ratio=0.5, gate_epochs=2, monitor="val/mse", gate_lr=0.05, verbose=False)
    trainer = trainer_factory([pruning], max_epochs=3, **LIMITS)
    trainer.fit(model, pixel_loader(), pixel_loader(seed=1))
    recount = count_flops(model, pixel_sample()).total
    assert recount <= 0.5 * dense and recount / dense == pytest.approx(pruning.reached_flops_ratio)
    assert any(len(keep) < 8 for keep in pruning.plan.values())
    assert pruning.snapshot["monitor"] == "val/mse" and pruning.snapshot["metric"] is not None
    assert math.isfinite(float(trainer.callback_metrics["val/mse"]))
    assert trainer.global_step == 12  # 2 gate epochs and 1 of the pruned network, 4 steps each


def test_token_tagger_gates_its_mlp_linears_and_meets_the_flops_target(trainer_factory) -> None:
    model = TokenTagger()
    dense = count_flops(model, token_sample()).total
    pruning = GatePruningFromScratch(flops_ratio=0.75, gate_epochs=2, gate_position="conv", gate_lr=0.05, verbose=False)
    trainer = trainer_factory([pruning], max_epochs=3, **LIMITS)
    trainer.fit(model, token_loader(), token_loader(seed=1))
    recount = count_flops(model, token_sample()).total
    assert recount <= 0.75 * dense and recount / dense == pytest.approx(pruning.reached_flops_ratio)
    assert model.encoder.layers[0].linear1.out_features < 64 or model.encoder.layers[1].linear1.out_features < 64
    assert pruning.snapshot["monitor"] is None  # the default: the logged key ending in "loss", val/loss
    assert math.isfinite(float(trainer.callback_metrics["val/loss"]))


class CraftedMetric(ImageClassifier):
    """Logs `val/crafted` = 3, 1, 2 on the gate phase's 1st, 2nd, 3rd validation pass (2 batches each)."""

    def __init__(self) -> None:
        super().__init__("vgg_small", in_channels=3, image_size=32, width=0.25)
        self.calls = 0

    def validation_step(self, batch, batch_idx):
        super().validation_step(batch, batch_idx)
        self.log("val/crafted", (3.0, 1.0, 2.0, 0.0, 0.0)[min(self.calls // 2, 4)])
        self.calls += 1


def test_monitor_and_mode_choose_the_snapshot(trainer_factory) -> None:
    chosen = {}
    for mode in ("min", "max"):
        # gate_ratio 0.95: the three snapshots are sparse enough (about 0.92, 0.79, 0.79 of the gates non-zero)
        pruning = GatePruningFromScratch(flops_ratio=0.5, gate_epochs=3, gate_lr=0.3, gate_ratio=0.95, monitor="val/crafted", mode=mode, verbose=False)
        trainer_factory([pruning], max_epochs=4, **LIMITS).fit(CraftedMetric(), DigitsDataModule(batch_size=32, image_size=32, channels=3))
        assert pruning.snapshot["selected"] == "best_val"
        chosen[mode] = (pruning.snapshot["step"], pruning.snapshot["metric"])
    assert chosen == {"min": (8, 1.0), "max": (4, 3.0)}  # 4 gate steps per gate epoch


def test_a_missing_monitor_is_named_and_nothing_changes(trainer_factory) -> None:
    model = PixelRegressor()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = trainer_factory([GatePruningFromScratch(gate_epochs=1, monitor="val/psnr", verbose=False)], max_epochs=2, **LIMITS)
    with pytest.raises(MisconfigurationException, match=r"`monitor`='val/psnr' was not logged.*\['val/mse'\]"):
        trainer.fit(model, pixel_loader(), pixel_loader(seed=1))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_without_a_logged_loss_the_default_monitor_keeps_the_last_gates(trainer_factory) -> None:
    pruning = GatePruningFromScratch(gate_epochs=1, verbose=False)  # PixelRegressor logs only val/mse
    trainer = trainer_factory([pruning], max_epochs=2, **LIMITS)
    with pytest.warns(UserWarning, match=r"no key ending in 'loss' \(\['val/mse'\]\), so the last gates are kept"):
        trainer.fit(PixelRegressor(), pixel_loader(), pixel_loader(seed=1))
    assert pruning.snapshot["selected"] == "last"


def test_without_validation_data_the_last_gates_are_kept(trainer_factory) -> None:
    pruning = GatePruningFromScratch(gate_epochs=1, monitor="val/mse", verbose=False)
    trainer = trainer_factory([pruning], max_epochs=2, **LIMITS)
    with pytest.warns(UserWarning, match="no validation ran during the gate epochs, so the last gates are kept"):
        trainer.fit(PixelRegressor(), pixel_loader())
    assert pruning.snapshot["selected"] == "last" and pruning.snapshot["step"] == 4


class ManualPixelRegressor(PixelRegressor):
    """Manual optimization with one optimizer: during the gate epochs `self.optimizers()` is the gate optimizer."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.stepped = []

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(torch.nn.functional.l1_loss(self(batch), batch["target"]))
        optimizer.step()
        self.stepped.append(type(optimizer.optimizer).__name__)


def test_manual_optimization_steps_the_gate_optimizer_in_the_gate_epochs(trainer_factory) -> None:
    model = ManualPixelRegressor()
    pruning = GatePruningFromScratch(gate_epochs=1, select="last", gate_lr=0.05, verbose=False)
    trainer_factory([pruning], max_epochs=2, **LIMITS).fit(model, pixel_loader())
    assert model.stepped == ["Adam"] * 4 + ["SGD"] * 4 and pruning.pruned and pruning.snapshot["steps"] == 4
    gates = torch.cat(list(pruning.gates.values()))
    assert 0 <= gates.min() < gates.max() < 1  # learned and clamped


class TwoLoaders(PixelRegressor):
    """training_step receives {"a": batch, "b": batch} from two training loaders."""

    def training_step(self, batch, batch_idx):
        return super().training_step(batch["a"], batch_idx)["loss"] + super().training_step(batch["b"], batch_idx)["loss"]


def test_several_training_loaders_give_one_combined_batch_per_gate_step(trainer_factory) -> None:
    pruning = GatePruningFromScratch(gate_epochs=1, select="last", verbose=False, example_input_fn=lambda batch: (batch["a"],))
    trainer_factory([pruning], max_epochs=2, **LIMITS).fit(TwoLoaders(), {"a": pixel_loader(), "b": pixel_loader(seed=2)})
    assert pruning.pruned and pruning.snapshot["steps"] == 4
