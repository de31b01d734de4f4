"""YAML-driven runs: example configs parse, build and (digits) run; --print_config round-trips; bad
values fail at parse time naming the key; the sensitivity command writes CSV/PNG and logs to wandb."""

from __future__ import annotations

import csv
import inspect
from pathlib import Path

import pytest
import yaml
from wandb_reader import latest_run

from lightning_prune import callbacks
from lightning_prune.cli import build_cli, main, sensitivity_main

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "configs"
FIT_CONFIGS = sorted(p.name for p in CONFIGS.glob("*.yaml") if p.name != "digits_sensitivity.yaml")
DIGITS_CONFIGS = [name for name in FIT_CONFIGS if name.startswith("digits_")]
TINY = ["--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", "--trainer.enable_model_summary=false"]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # configs write to relative outputs/ folders
    yield
    import wandb

    wandb.finish()  # a CLI run leaves its wandb run open (the process would end); a later WandbLogger would join it


def printed_config(args: list[str], capsys, entry=main) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        entry([*args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return capsys.readouterr().out


def callback_init_args(config: dict) -> dict[str, dict]:
    entries = config["trainer"]["callbacks"]
    entries = [entries] if isinstance(entries, dict) else entries
    return {cb["class_path"].rsplit(".", 1)[-1]: cb.get("init_args", {}) for cb in entries}


@pytest.mark.parametrize("name", FIT_CONFIGS)
def test_every_example_config_parses_and_builds(name) -> None:
    cli = build_cli(["--config", str(CONFIGS / name)], run=False)  # instantiates; downloads nothing
    assert cli.trainer.callbacks and cli.model is not None and cli.datamodule is not None


@pytest.mark.parametrize("name", DIGITS_CONFIGS)
def test_digits_configs_run_and_their_printed_config_runs_again_unchanged(name, tmp_path, capsys) -> None:
    printed = printed_config(["fit", "--config", str(CONFIGS / name), *TINY], capsys)
    (tmp_path / "printed.yaml").write_text(printed)
    assert printed_config(["fit", "--config", str(tmp_path / "printed.yaml")], capsys) == printed
    cli = build_cli(["fit", "--config", str(tmp_path / "printed.yaml")])
    assert cli.trainer.state.finished and cli.trainer.current_epoch == cli.trainer.max_epochs


@pytest.mark.parametrize("name", callbacks.__all__)
def test_print_config_shows_every_argument_of_every_callback(name, capsys) -> None:
    args = ["fit", "--config", str(CONFIGS / "digits_magnitude.yaml"), f"--trainer.callbacks=lightning_prune.callbacks.{name}"]
    config = yaml.safe_load(printed_config(args, capsys))
    (init_args,) = callback_init_args(config).values()
    assert set(init_args) == set(inspect.signature(getattr(callbacks, name)).parameters)


def bad_config(tmp_path, **init_args) -> str:
    config = yaml.safe_load((CONFIGS / "digits_magnitude.yaml").read_text())
    config["trainer"]["callbacks"][0]["init_args"].update(init_args)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.parametrize(
    "init_args, message",
    [
        ({"sparsity": "ninety"}, 'Parser key "sparsity"'),
        ({"schedule": "cubic"}, 'Parser key "schedule"'),
        ({"sparsityy": 0.5}, "sparsityy"),
    ],
)
def test_bad_yaml_values_fail_at_parse_time_naming_the_key(tmp_path, capsys, init_args, message) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["--config", bad_config(tmp_path, **init_args)], run=False)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_out_of_range_sparsity_fails_at_parse_time(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit):
        build_cli(["--config", bad_config(tmp_path, sparsity=1.5)], run=False)
    assert 'Parser key "sparsity"' in capsys.readouterr().err


def test_sensitivity_cli_writes_csv_png_proposal_and_logs_to_wandb(tmp_path, capsys) -> None:
    # an absolute save_dir: wandb's service process keeps the working directory of the first run in this process
    main(["fit", "--config", str(CONFIGS / "digits_dense.yaml"), "--trainer.max_epochs=3", "--trainer.enable_model_summary=false"])
    assert Path("outputs/digits_dense/checkpoints/last.ckpt").exists()
    args = [
        "--config", str(CONFIGS / "digits_sensitivity.yaml"), "--levels=[0.5, 0.9]", "--progress=false",
        "--logger=pytorch_lightning.loggers.WandbLogger", "--logger.offline=true", f"--logger.save_dir={tmp_path / 'wandb_out'}",
        "--logger.project=lp-test",
    ]
    printed = printed_config(args, capsys, sensitivity_main)
    assert "ckpt_path: outputs/digits_dense/checkpoints/last.ckpt" in printed and "class_path: pytorch_lightning.loggers.WandbLogger" in printed
    sensitivity_main(args)
    out = Path("outputs/digits_sensitivity")
    with open(out / "sensitivity.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["layer"], float(r["sparsity"])) for r in rows] == [("dense", 0.0)] + [
        (layer, level) for layer in ("network.fc1", "network.fc2", "network.fc3") for level in (0.5, 0.9)
    ]
    assert (out / "sensitivity.png").read_bytes()[:4] == b"\x89PNG"
    proposal = yaml.safe_load((out / "proposal.yaml").read_text())
    assert set(proposal["sparsity"]) == {"network.fc1", "network.fc2", "network.fc3"}
    assert set(proposal["sparsity"].values()) <= {0.0, 0.5, 0.9}

    run = latest_run(tmp_path / "wandb_out")
    table = run.table_rows("sensitivity/table")
    assert [(r["layer"], r["sparsity"]) for r in table] == [(r["layer"], float(r["sparsity"])) for r in rows[1:]]
    assert [r["accuracy"] for r in table] == pytest.approx([float(r["accuracy"]) for r in rows[1:]])
    assert run.file(run.values("sensitivity/curves")[0]).read_bytes()[:4] == b"\x89PNG"
    assert run.values("sensitivity/baseline_accuracy") == pytest.approx([float(rows[0]["accuracy"])])
    assert (run.directory / "files" / "sensitivity.csv").read_text() == (out / "sensitivity.csv").read_text()
