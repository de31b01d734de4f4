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
    trainer = trainer_factory([pruning], max_epochs=2, **LIMITS)
    trainer.fit(model, pixel_loader(), pixel_loader(seed=1))
    recount = count_flops(model, pixel_sample()).total
    assert recount <= 0.5 * dense and recount / dense == pytest.approx(pruning.reached_flops_ratio)
    assert any(len(keep) < 8 for keep in pruning.plan.values())
    assert pruning.snapshot["monitor"] == "val/mse" and pruning.snapshot["metric"] is not None
    assert math.isfinite(float(trainer.callback_metrics["val/mse"]))
    assert trainer.global_step == 8


def test_token_tagger_gates_its_mlp_linears_and_meets_the_flops_target(trainer_factory) -> None:
    model = TokenTagger()
    dense = count_flops(model, token_sample()).total
    pruning = GatePruningFromScratch(flops_ratio=0.75, gate_epochs=2, gate_position="conv", gate_lr=0.05, verbose=False)
    trainer = trainer_factory([pruning], max_epochs=2, **LIMITS)
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
        trainer_factory([pruning], max_epochs=3, **LIMITS).fit(CraftedMetric(), DigitsDataModule(batch_size=32, image_size=32, channels=3))
        assert pruning.snapshot["selected"] == "best_val"
        chosen[mode] = (pruning.snapshot["step"], pruning.snapshot["metric"])
    assert chosen == {"min": (8, 1.0), "max": (4, 3.0)}  # 4 gate steps per gate epoch


def test_a_missing_monitor_is_named_and_nothing_changes(trainer_factory) -> None:
    model = PixelRegressor()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = trainer_factory([GatePruningFromScratch(gate_epochs=1, monitor="val/psnr", verbose=False)], max_epochs=1, **LIMITS)
    with pytest.raises(MisconfigurationException, match=r"`monitor`='val/psnr' was not logged.*\['val/mse'\]"):
        trainer.fit(model, pixel_loader(), pixel_loader(seed=1))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_without_a_logged_loss_the_default_monitor_keeps_the_last_gates(trainer_factory) -> None:
    pruning = GatePruningFromScratch(gate_epochs=1, verbose=False)  # PixelRegressor logs only val/mse
    trainer = trainer_factory([pruning], max_epochs=1, **LIMITS)
    with pytest.warns(UserWarning, match=r"no key ending in 'loss' \(\['val/mse'\]\), so the last gates are kept"):
        trainer.fit(PixelRegressor(), pixel_loader(), pixel_loader(seed=1))
    assert pruning.snapshot["selected"] == "last"


def test_without_validation_data_the_last_gates_are_kept(trainer_factory) -> None:
    pruning = GatePruningFromScratch(gate_epochs=1, monitor="val/mse", verbose=False)
    trainer = trainer_factory([pruning], max_epochs=1, **LIMITS)
    with pytest.warns(UserWarning, match="last gates are kept"):
        trainer.fit(PixelRegressor(), pixel_loader())
    assert pruning.snapshot["selected"] == "last" and pruning.snapshot["step"] == 4


def test_loss_fn_replaces_the_training_step(trainer_factory) -> None:
    seen = []

    def loss_fn(pl_module, batch):
        seen.append(sorted(batch))
        return torch.nn.functional.l1_loss(pl_module(batch), batch["target"])

    pruning = GatePruningFromScratch(gate_epochs=1, select="last", loss_fn=loss_fn, verbose=False)
    trainer_factory([pruning], max_epochs=1, **LIMITS).fit(PixelRegressor(), pixel_loader())
    assert seen == [["image", "target"]] * 4 and pruning.pruned


def test_the_monitored_value_is_aggregated_as_lightning_aggregates_it(trainer_factory) -> None:
    from lightning_prune.callbacks._monitor import validation_metrics

    model, loader = PixelRegressor(), pixel_loader(samples=20, batch_size=8, seed=3)  # batches of 8, 8, 4
    trainer = trainer_factory([], max_epochs=1)
    (lightning,) = trainer.validate(model, loader, verbose=False)
    ours = validation_metrics(trainer, model, loader, None)
    assert list(ours) == ["val/mse"]
    assert ours["val/mse"] == pytest.approx(lightning["val/mse"], rel=1e-6)
    model.eval()
    with torch.no_grad():
        per_batch = [float(torch.nn.functional.mse_loss(model(b), b["target"])) for b in loader]
    assert sum(p * n for p, n in zip(per_batch, (8, 8, 4))) / 20 == pytest.approx(ours["val/mse"], rel=1e-5)
    unweighted = sum(per_batch) / 3
    assert ours["val/mse"] != pytest.approx(unweighted, rel=1e-6)  # the batch-size weighting matters here


class TwoLoaders(PixelRegressor):
    """training_step receives {"a": batch, "b": batch} from two training loaders."""

    def training_step(self, batch, batch_idx):
        return super().training_step(batch["a"], batch_idx)["loss"] + super().training_step(batch["b"], batch_idx)["loss"]


def test_several_training_loaders_give_one_combined_batch_per_gate_step(trainer_factory) -> None:
    pruning = GatePruningFromScratch(gate_epochs=1, select="last", verbose=False, example_input_fn=lambda batch: (batch["a"],))
    trainer_factory([pruning], max_epochs=1, **LIMITS).fit(TwoLoaders(), {"a": pixel_loader(), "b": pixel_loader(seed=2)})
    assert pruning.pruned and pruning.snapshot["steps"] == 4
