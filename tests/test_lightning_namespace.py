"""The callbacks under ``lightning.pytorch.Trainer``: same classes and logic, the other base class mixed in."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

L = pytest.importorskip("lightning.pytorch")

import pytorch_lightning as pl  # noqa: E402
from lightning.pytorch.loggers import CSVLogger as LitCSVLogger  # noqa: E402
from lightning.pytorch.loggers import WandbLogger as LitWandbLogger  # noqa: E402
from wandb_reader import latest_run  # noqa: E402

import lightning_prune.lightning as lp_lightning  # noqa: E402
from lightning_prune import DigitsDataModule, callbacks, sparsity_report  # noqa: E402
from lightning_prune.demo.models import build_network  # noqa: E402


class LitNet(L.LightningModule):
    """A user's own ``lightning.pytorch`` module (the package's ImageClassifier is a pytorch_lightning one)."""

    def __init__(self, arch: str = "lenet300100") -> None:
        super().__init__()
        self.network = build_network(arch, image_size=8)
        self.example_input_array = torch.zeros(1, 1, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx) -> None:
        x, y = batch
        self.log("val/acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def loaders(batch_size: int = 32):
    data = DigitsDataModule(batch_size=batch_size)
    data.setup("fit")
    return data.train_dataloader(), data.val_dataloader()


def lit_trainer(tmp_path, callback, logger=False, **kwargs) -> "L.Trainer":
    return L.Trainer(
        max_epochs=3, accelerator="cpu", devices=1, logger=logger, callbacks=[callback], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_train_batches=4, limit_val_batches=2,
        default_root_dir=str(tmp_path), deterministic=True, **kwargs,
    )


@pytest.mark.parametrize("name", callbacks.__all__)
def test_every_callback_is_offered_for_both_trainers_without_a_copy(name) -> None:
    original, lit = getattr(callbacks, name), getattr(lp_lightning, name)
    assert issubclass(lit, original) and issubclass(lit, L.Callback) and issubclass(lit, pl.Callback)
    assert not issubclass(original, L.Callback)
    assert lit.__name__ == original.__name__ and lit.__doc__ == original.__doc__
    assert inspect.signature(lit) == inspect.signature(original)
    # every method is the original's own function object: no logic lives in the subclass
    assert set(vars(lit)) <= {"__module__", "__qualname__", "__doc__", "__dict__", "__weakref__", "__firstlineno__", "__static_attributes__"}
    source = inspect.getsource(lp_lightning)
    assert f"class {name}(_callbacks.{name}, L.Callback):" in source and "globals()" not in source  # statically visible


def test_the_pytorch_lightning_cli_names_the_entry_point_of_a_lightning_class(tmp_path, capsys) -> None:
    from lightning_prune.cli import build_cli

    with pytest.raises(SystemExit):
        build_cli(["fit", "--config", cli_config(tmp_path, "lightning_prune.lightning.IterativeMagnitude")])
    error = capsys.readouterr().err
    assert "`test_lightning_namespace.LitNet` is a `lightning.pytorch` class" in error or (
        "`lightning_prune.lightning.IterativeMagnitude` is a `lightning.pytorch` class" in error
    )
    assert "`python -m lightning_prune.lightning`" in error


CALLBACK_ARGS = {
    "IterativeMagnitude": dict(sparsity=0.5, granularity="channel", schedule="one_shot", start_epoch=0, verbose=False),
    "GatePruningFromScratch": dict(flops_ratio=0.5, gate_epochs=1, verbose=False),
    "AutoPruneCallback": dict(granularity="channel", physical=True, init=0.1, aux_lr=0.1, reg=3.0, verbose=False),
}


@pytest.mark.parametrize("namespace", ["pytorch_lightning", "lightning"])
@pytest.mark.parametrize("name", callbacks.__all__)
def test_every_callback_prunes_in_a_real_fit_under_both_trainers(name, namespace, tmp_path) -> None:
    L.seed_everything(0)
    model = LitNet("vgg_small")
    dense = sum(p.numel() for p in model.parameters())
    if namespace == "lightning":
        callback = getattr(lp_lightning, name)(**CALLBACK_ARGS[name])
        lit_trainer(tmp_path, callback).fit(model, *loaders())
    else:
        callback = getattr(callbacks, name)(**CALLBACK_ARGS[name])
        wrapped = PlWrapper(model.network)
        wrapped.example_input_array = model.example_input_array
        pl.Trainer(max_epochs=3, logger=False, callbacks=[callback], enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, limit_train_batches=4, limit_val_batches=0,
                   default_root_dir=str(tmp_path)).fit(wrapped, loaders()[0])
    kept = sum(int(p.count_nonzero()) for p in model.parameters())
    assert kept < 0.9 * dense, f"{name} under {namespace} pruned nothing"


def test_for_lightning_rejects_non_callbacks() -> None:
    with pytest.raises(TypeError, match="`cls`"):
        lp_lightning.for_lightning(torch.nn.Linear)


class LitDigits(L.LightningDataModule):
    """The digits splits served by a ``lightning.pytorch`` data module."""

    def __init__(self, batch_size: int = 32) -> None:
        super().__init__()
        self.train_loader, self.val_loader = loaders(batch_size)

    def train_dataloader(self):
        return self.train_loader

    def val_dataloader(self):
        return self.val_loader


def cli_config(tmp_path, callback_path: str) -> str:
    path = tmp_path / "lit.yaml"
    path.write_text(f"""
seed_everything: 0
trainer:
  max_epochs: 2
  limit_train_batches: 3
  limit_val_batches: 1
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  default_root_dir: {tmp_path}
  callbacks:
    - class_path: {callback_path}
      init_args: {{sparsity: 0.5, schedule: one_shot, start_epoch: 1, verbose: false}}
model:
  class_path: test_lightning_namespace.LitNet
data:
  class_path: test_lightning_namespace.LitDigits
""")
    return str(path)


def test_lightning_cli_takes_the_lightning_callbacks_and_refuses_the_others(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit):
        lp_lightning.main(["fit", "--config", cli_config(tmp_path, "lightning_prune.IterativeMagnitude")])
    error = capsys.readouterr().err
    assert "does not correspond to a subclass of Callback" in error
    assert "`lightning_prune.IterativeMagnitude` is a `pytorch_lightning` class" in error
    assert "run the `lightning-prune` command" in error and "`python -m lightning_prune.lightning`" in error
    cli = lp_lightning.main(["fit", "--config", cli_config(tmp_path, "lightning_prune.lightning.IterativeMagnitude")])
    assert sparsity_report(cli.model).sparsity == pytest.approx(0.5, abs=1e-4)


def test_iterative_magnitude_under_lightning_trainer_logs_to_lightning_wandb(tmp_path) -> None:
    L.seed_everything(0)
    model = LitNet()
    callback = lp_lightning.IterativeMagnitude(sparsity=0.8, schedule="iterative", start_epoch=0, end_epoch=1, verbose=False)
    wandb_logger = LitWandbLogger(save_dir=str(tmp_path), offline=True, project="lp-test")
    csv_logger = LitCSVLogger(str(tmp_path), name="csv")
    lit_trainer(tmp_path, callback, logger=[wandb_logger, csv_logger]).fit(model, *loaders())
    wandb_logger.experiment.finish()
    assert sparsity_report(model).sparsity == pytest.approx(0.8, abs=1e-4)
    run = latest_run(tmp_path)
    assert run.values("prune/sparsity") == pytest.approx([0.4, 0.8], abs=1e-4)
    assert all(run.file(row["prune/sparsity_chart"]).exists() for row in run.rows_with("prune/sparsity"))
    with open(f"{csv_logger.log_dir}/metrics.csv") as handle:
        assert "prune/sparsity" in handle.readline()


def test_same_masks_under_both_trainers(tmp_path) -> None:
    results = []
    for namespace in ("pytorch_lightning", "lightning"):
        L.seed_everything(0)
        model = LitNet()
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        results.append(weights)
        cls = lp_lightning.IterativeMagnitude if namespace == "lightning" else callbacks.IterativeMagnitude
        callback = cls(sparsity=0.7, schedule="one_shot", start_epoch=0, verbose=False)
        if namespace == "lightning":
            lit_trainer(tmp_path, callback, max_steps=1).fit(model, *loaders())
        else:
            # the pytorch_lightning Trainer needs a pytorch_lightning module: wrap the same network
            wrapped = PlWrapper(model.network)
            pl.Trainer(max_steps=1, logger=False, callbacks=[callback], enable_checkpointing=False, enable_progress_bar=False,
                       enable_model_summary=False, limit_val_batches=0, default_root_dir=str(tmp_path)).fit(wrapped, loaders()[0])
        results[-1] = {name: model.get_parameter(f"{name}.weight") != 0 for name in ("network.fc1", "network.fc2", "network.fc3")}
    for name in results[0]:
        assert torch.equal(results[0][name], results[1][name])


class PlWrapper(pl.LightningModule):
    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.network(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
