"""Shared fixtures: small, deterministic Trainers on the bundled digits data."""

from __future__ import annotations

import os
import runpy
import warnings
from pathlib import Path

# Before anything imports torchmetrics (pytorch_lightning does): PyPI's torchvision needs its operator schemas
# defined beside a CPU build of torch (see the shim). The shim folder goes first on PYTHONPATH, so DDP-spawned
# workers and subprocesses load it too, as their sitecustomize.
_SHIM = Path(__file__).parent / "torchvision_shim"
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_SHIM), os.environ.get("PYTHONPATH")]))
runpy.run_path(str(_SHIM / "sitecustomize.py"))

import pytest  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(1)
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*GPU available but not used.*")


@pytest.fixture(autouse=True)
def _seed() -> None:
    pl.seed_everything(0, workers=True)


def make_trainer(tmp_path, callbacks=(), max_epochs: int = 3, **kwargs) -> pl.Trainer:
    """A quiet CPU Trainer writing only under ``tmp_path``."""
    options = dict(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        default_root_dir=str(tmp_path),
    )
    options.update(kwargs)
    return pl.Trainer(callbacks=list(callbacks), **options)


@pytest.fixture
def trainer_factory(tmp_path):
    return lambda callbacks=(), **kwargs: make_trainer(tmp_path, callbacks, **kwargs)
