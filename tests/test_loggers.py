"""Pruning events reach every logger once: scalars everywhere, wandb objects only to wandb (read back offline)."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger, WandbLogger
from wandb_reader import BLOCK_SIZE, latest_run

from lightning_prune import DigitsDataModule, ImageClassifier, IterativeMagnitude, sparsity_report
from lightning_prune.loggers import log_pruning_event, pruning_scalars


def row_ratios(module: torch.nn.Module) -> dict[str, float]:
    """Kept/original output rows of each Linear layer (rows with a non-zero weight count as kept)."""
    return {
        name: float((m.weight.detach().abs().sum(1) > 0).float().mean())
        for name, m in module.named_modules()
        if isinstance(m, torch.nn.Linear)
    }


class EventLogger(pl.Callback):
    """Zero some rows of fc1 at every epoch start, then log the event like a channel-pruning callback."""

    def __init__(self) -> None:
        self.logged: list[dict] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        fc1 = pl_module.network.fc1
        with torch.no_grad():
            fc1.weight[: 60 * (trainer.current_epoch + 1)] = 0.0
        report = sparsity_report(pl_module)
        ratios = row_ratios(pl_module)
        gates = fc1.weight.detach().abs().sum(1)
        self.logged.append({"report": report, "ratios": ratios, "step": trainer.global_step, "gates": gates.clone()})
        log_pruning_event(
            trainer, report=report, flops_ratio=ratios["network.fc1"], channel_ratios=ratios,
            histograms={"gates": gates}, extra={"flops_macs": 1000.0 * ratios["network.fc1"]},
        )


def fit(tmp_path: Path, trainer_factory, callbacks, logger, epochs: int = 2, **kwargs) -> pl.Trainer:
    trainer = trainer_factory(callbacks, logger=logger, max_epochs=epochs, limit_train_batches=4, limit_val_batches=2, **kwargs)
    trainer.fit(ImageClassifier(), DigitsDataModule(batch_size=32))
    return trainer


def read_csv(logger: CSVLogger) -> list[dict[str, str]]:
    with open(Path(logger.log_dir) / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


def test_pruning_scalars_names_and_prefix() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    with torch.no_grad():
        model[0].weight[0] = 0.0
    scalars = pruning_scalars(sparsity_report(model), 0.25, {"flops_macs": 7, "prune/compression": 1.5}, "prune/")
    assert scalars == {
        "prune/sparsity": pytest.approx(1 / 3), "prune/sparsity/0": pytest.approx(1 / 3),
        "prune/flops_ratio": 0.25, "prune/flops_macs": 7.0, "prune/compression": 1.5,
    }


def test_wandb_receives_scalars_table_line_plot_histogram_and_images(tmp_path, trainer_factory) -> None:
    wandb_logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="lp-test")
    csv_logger = CSVLogger(str(tmp_path), name="csv")
    events = EventLogger()
    fit(tmp_path, trainer_factory, [events], [wandb_logger, csv_logger], epochs=2)
    wandb_logger.experiment.finish()
    run = latest_run(tmp_path)

    rows = run.rows_with("prune/channel_ratios")
    assert [row["trainer/global_step"] for row in rows] == [e["step"] for e in events.logged] == [0, 4]
    for row, event in zip(rows, events.logged):
        assert row["prune/sparsity"] == pytest.approx(event["report"].sparsity)
        for layer in event["report"].layers:
            assert row[f"prune/sparsity/{layer.layer}"] == pytest.approx(layer.sparsity)
        assert row["prune/flops_ratio"] == pytest.approx(event["ratios"]["network.fc1"])
        assert row["prune/flops_macs"] == pytest.approx(1000 * event["ratios"]["network.fc1"])
        assert sum(row["prune/hist/gates"]["values"]) == event["gates"].numel()
        for image in ("prune/structure_chart", "prune/sparsity_chart"):
            assert run.file(row[image]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert not any(key.startswith("prune/channel_ratio/") for key in row)  # the table replaces the scalars
    assert events.logged[1]["ratios"]["network.fc1"] == pytest.approx(1 - 120 / 300)

    for index, event in enumerate(events.logged):
        table = run.table_rows("prune/channel_ratios", index)
        assert [(r["layer_index"], r["layer"]) for r in table] == list(enumerate(event["ratios"]))
        assert [r["channel_ratio"] for r in table] == pytest.approx(list(event["ratios"].values()))
    overlay = run.table_rows("prune/structure")  # the last, cumulative table: one line per event
    assert sorted({(r["event"], r["label"]) for r in overlay}) == [(0, "epoch 0 (step 0)"), (1, "epoch 1 (step 4)")]
    assert len(overlay) == 2 * len(events.logged[0]["ratios"])
    chart = run.chart("prune/structure")
    assert chart["panelDefId"] == "wandb/line/v0"
    assert chart["fieldSettings"] == {"x": "layer_index", "y": "channel_ratio", "stroke": "label"}

    csv_rows = [row for row in read_csv(csv_logger) if row.get("prune/sparsity")]
    assert len(csv_rows) == 2
    assert float(csv_rows[1]["prune/channel_ratio/network.fc1"]) == pytest.approx(0.6)
    assert not any("hist" in key or "chart" in key or key == "prune/channel_ratios" for key in csv_rows[0])


def test_iterative_magnitude_events_read_back_from_wandb(tmp_path, trainer_factory) -> None:
    wandb_logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="lp-test")
    callback = IterativeMagnitude(sparsity=0.8, schedule="iterative", start_epoch=0, end_epoch=1, verbose=False)
    model = ImageClassifier()
    trainer = trainer_factory([callback], logger=wandb_logger, max_epochs=3, limit_train_batches=4, limit_val_batches=2, log_every_n_steps=1)
    trainer.fit(model, DigitsDataModule(batch_size=32))
    wandb_logger.experiment.finish()
    run = latest_run(tmp_path)
    assert run.values("prune/sparsity") == pytest.approx([0.4, 0.8], abs=1e-4)
    assert run.values("prune/target_sparsity") == pytest.approx([0.4, 0.8])
    assert [row["trainer/global_step"] for row in run.rows_with("prune/sparsity")] == [0, 4]
    for row in run.rows_with("prune/sparsity"):
        assert run.file(row["prune/sparsity_chart"]).read_bytes()[:4] == b"\x89PNG"
    final = sparsity_report(model)
    for layer in final.layers:
        assert run.values(f"prune/sparsity/{layer.layer}")[-1] == pytest.approx(layer.sparsity)
    assert [row["trainer/global_step"] for row in run.rows_with("train/loss")] == list(range(12))


def test_reader_reassembles_records_across_blocks(tmp_path) -> None:
    import wandb

    run = wandb.init(dir=str(tmp_path), mode="offline", project="lp-test")
    long_texts = [f"{i}:" + "x" * (BLOCK_SIZE + 5000 * i) for i in range(3)]  # FIRST/MIDDLE/LAST chunks
    for i in range(40):
        run.log({"i": i, "noise": float(i) / 7, **({"text": long_texts[i // 15]} if i % 15 == 0 else {})})
    run.finish()
    assert next(tmp_path.glob("wandb/offline-run-*/run-*.wandb")).stat().st_size > 3 * BLOCK_SIZE
    back = latest_run(tmp_path)
    assert back.values("i") == list(range(40))
    assert back.values("noise") == pytest.approx([i / 7 for i in range(40)])
    assert back.values("text") == long_texts


def test_other_loggers_and_no_logger_do_not_break(tmp_path, trainer_factory) -> None:
    csv_logger = CSVLogger(str(tmp_path), name="csv")
    fit(tmp_path, trainer_factory, [EventLogger()], csv_logger, epochs=1)
    (row,) = [row for row in read_csv(csv_logger) if row.get("prune/sparsity")]
    assert float(row["prune/channel_ratio/network.fc1"]) == pytest.approx(0.8)
    assert float(row["prune/flops_ratio"]) == pytest.approx(0.8)
    events = EventLogger()
    fit(tmp_path, trainer_factory, [events], False, epochs=1)
    assert len(events.logged) == 1


def test_only_global_rank_zero_logs(tmp_path) -> None:
    logger = CSVLogger(str(tmp_path))
    model = torch.nn.Linear(3, 2)
    for rank_zero, expected in ((False, 0), (True, 1)):
        trainer = SimpleNamespace(is_global_zero=rank_zero, loggers=[logger], global_step=5, current_epoch=0)
        log_pruning_event(trainer, report=sparsity_report(model), channel_ratios={"": 1.0}, flops_ratio=1.0)
        assert len(logger.experiment.metrics) == expected


def test_gate_pruning_structure_read_back_from_wandb(tmp_path, trainer_factory) -> None:
    from lightning_prune import GatePruningFromScratch
    from lightning_prune.structure import layer_channel_ratios

    wandb_logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="lp-test")
    callback = GatePruningFromScratch(flops_ratio=0.5, gate_epochs=1, verbose=False)
    model = ImageClassifier("vgg_small", in_channels=1, image_size=8)
    trainer = trainer_factory([callback], logger=wandb_logger, max_epochs=2, limit_train_batches=3, limit_val_batches=1)
    trainer.fit(model, DigitsDataModule(batch_size=32))
    wandb_logger.experiment.finish()
    run = latest_run(tmp_path)
    (row,) = run.rows_with("prune/channel_ratios")
    assert row["prune/flops_ratio"] == pytest.approx(callback.reached_flops_ratio) and row["prune/flops_ratio"] <= 0.5
    expected = layer_channel_ratios(callback.figures.groups, callback.plan)
    table = run.table_rows("prune/channel_ratios")
    assert [r["layer"] for r in table] == list(expected)
    assert [r["channel_ratio"] for r in table] == pytest.approx(list(expected.values()))
    kept = {name: m.out_channels for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    dense = {name: m.out_channels for name, m in ImageClassifier("vgg_small", in_channels=1, image_size=8).named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert {r["layer"]: r["channel_ratio"] for r in table} == pytest.approx({name: kept[name] / dense[name] for name in expected})
    assert sum(row["prune/hist/gates"]["values"]) == sum(dense[name] for name in expected)
    assert run.file(row["prune/structure_chart"]).read_bytes()[:4] == b"\x89PNG"
    assert run.chart("prune/structure")["fieldSettings"]["stroke"] == "label"


def test_autoprune_events_read_back_from_wandb(tmp_path, trainer_factory) -> None:
    from lightning_prune import AutoPruneCallback

    wandb_logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="lp-test")
    callback = AutoPruneCallback(verbose=False)
    model = ImageClassifier("lenet300100")
    trainer = trainer_factory([callback], logger=wandb_logger, max_epochs=2, limit_train_batches=4, limit_val_batches=1)
    trainer.fit(model, DigitsDataModule(batch_size=32, aux_fraction=0.5))
    wandb_logger.experiment.finish()
    run = latest_run(tmp_path)
    rows = run.rows_with("prune/sparsity")
    assert rows and all("prune/flops_ratio" in row for row in rows)
    final = sparsity_report(model)
    assert rows[-1]["prune/sparsity"] == pytest.approx(final.sparsity)
    for layer in final.layers:
        assert rows[-1][f"prune/sparsity/{layer.layer}"] == pytest.approx(layer.sparsity)
        assert sum(rows[-1][f"prune/hist/aux/{layer.layer}"]["values"]) == layer.total
    assert run.file(rows[-1]["prune/sparsity_chart"]).read_bytes()[:4] == b"\x89PNG"
