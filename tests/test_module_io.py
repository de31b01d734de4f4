"""Example inputs and losses through the user's own LightningModule: no (x, y), no cross-entropy assumed."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader

from lightning_prune.callbacks._module_io import (
    check_function,
    example_from_batch,
    example_input,
    module_loss,
    training_step_loss,
)
from lightning_prune.inputs import ModelInput, first_tensor


class DictRegressor(pl.LightningModule):
    """Per-pixel regression whose forward takes the whole dict batch, and logs in training_step."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 1, 3, padding=1))

    def forward(self, batch: dict) -> torch.Tensor:
        return self.net(torch.cat([batch["image"], batch["mask"]], 1))

    def training_step(self, batch: dict, batch_idx: int) -> dict:
        loss = nn.functional.mse_loss(self(batch), batch["target"])
        self.log("train/mse", loss)
        return {"loss": loss, "aux": loss.detach()}

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _dict_batches(n: int = 8) -> list[dict]:
    return [
        {"image": torch.randn(4, 1, 8, 8), "mask": torch.ones(4, 1, 8, 8), "target": torch.randn(4, 1, 8, 8)}
        for _ in range(n)
    ]


def test_first_tensor_and_one_sample_follow_nesting() -> None:
    batch = {"meta": "id", "x": (torch.zeros(3, 2), [torch.ones(3)]), "scale": torch.tensor(2.0)}
    assert first_tensor(batch) is batch["x"][0]
    cut = ModelInput((batch,)).first_sample().args[0]
    assert cut["x"][0].shape == (1, 2) and cut["x"][1][0].shape == (1,)
    assert cut["scale"].shape == () and cut["meta"] == "id"


def test_example_from_batch_uses_the_whole_dict_when_forward_takes_it() -> None:
    model = DictRegressor()
    batch = _dict_batches(1)[0]
    (args,) = example_from_batch(model, batch).args
    assert args is batch  # forward(batch["image"]) fails, forward(batch) runs


def test_example_from_batch_uses_the_first_tensor_of_an_xy_batch() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    x, y = torch.randn(5, 4), torch.randint(0, 2, (5,))
    assert example_from_batch(model, (x, y)).args[0] is x


def test_example_input_fn_decides_and_a_failing_forward_names_the_remedy() -> None:
    model = DictRegressor()
    batch = _dict_batches(1)[0]
    assert example_from_batch(model, batch, lambda b: (b,)).args[0] is batch
    assert example_from_batch(model, batch, lambda b: b).args[0] is batch  # a dict the forward takes whole
    with pytest.raises(MisconfigurationException, match="example_input_fn"):
        example_from_batch(nn.Linear(3, 3), {"a": torch.randn(2, 5)})


def test_example_input_from_the_first_training_batch_inside_fit(trainer_factory) -> None:
    seen = {}

    class Probe(pl.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            seen["args"] = example_input(trainer, pl_module)

    model = DictRegressor()
    trainer_factory([Probe()], max_epochs=1, limit_train_batches=1).fit(model, DataLoader(_dict_batches(), batch_size=None))
    (batch,) = seen["args"].args
    assert set(batch) == {"image", "mask", "target"} and batch["image"].shape == (4, 1, 8, 8)


def test_example_input_is_read_in_the_dtype_of_the_module_at_setup(trainer_factory) -> None:
    """A float64 module fed float32 batches: the example input (taken in ``setup``, before Lightning converts anything)
    is cast to the module's floating dtype, else the module could not run on it."""
    seen = {}

    class Probe(pl.Callback):
        def setup(self, trainer, pl_module, stage) -> None:
            seen["args"] = example_input(trainer, pl_module)

    model = DictRegressor().double()
    with pytest.raises(RuntimeError):  # the fit itself fails on float32 batches; the example was taken before
        trainer_factory([Probe()], max_epochs=1, limit_train_batches=1).fit(model, DataLoader(_dict_batches(), batch_size=None))
    (batch,) = seen["args"].args
    assert batch["image"].dtype == torch.float64 and model(batch).dtype == torch.float64


def test_training_step_loss_takes_the_dict_loss_and_silences_logging(trainer_factory) -> None:
    model = DictRegressor()
    batch = _dict_batches(1)[0]
    loss = training_step_loss(model, batch)
    assert loss.shape == () and loss.requires_grad
    assert torch.allclose(loss, nn.functional.mse_loss(model(batch), batch["target"]))
    assert "log" not in vars(model)  # the silencing is undone

    class Probe(pl.Callback):
        def on_train_start(self, trainer, pl_module) -> None:  # Lightning refuses self.log here
            self.loss = module_loss(trainer, pl_module, batch)

    probe = Probe()
    trainer_factory([probe], max_epochs=1, limit_train_batches=1).fit(model, DataLoader(_dict_batches(), batch_size=None))
    assert probe.loss.shape == ()


def test_module_loss_prefers_loss_fn_and_refuses_manual_optimization() -> None:
    model = DictRegressor()
    batch = _dict_batches(1)[0]
    trainer = pl.Trainer(accelerator="cpu", logger=False)
    assert float(module_loss(trainer, model, batch, loss_fn=lambda m, b: 3.0 + 0.0 * next(m.parameters()).sum())) == 3.0
    model.automatic_optimization = False
    with pytest.raises(MisconfigurationException, match="loss_fn"):
        training_step_loss(model, batch)


def test_training_step_without_a_loss_is_refused_by_name() -> None:
    class NoLoss(DictRegressor):
        def training_step(self, batch: dict, batch_idx: int) -> None:
            return None

    with pytest.raises(MisconfigurationException, match="training_step returned NoneType"):
        training_step_loss(NoLoss(), _dict_batches(1)[0])


def test_check_function_names_the_argument() -> None:
    check_function("loss_fn", lambda module, batch: 0, 2, "loss_fn(pl_module, batch)")
    with pytest.raises(ValueError, match="`loss_fn` must be None or a function"):
        check_function("loss_fn", "ce", 2, "loss_fn(pl_module, batch)")
    with pytest.raises(ValueError, match="`loss_fn` must be callable as loss_fn\\(pl_module, batch\\)"):
        check_function("loss_fn", lambda batch: 0, 2, "loss_fn(pl_module, batch)")
