"""Shared fixtures: small, deterministic Trainers on the bundled digits data."""

from __future__ import annotations

import os
import warnings

import pytest
import pytorch_lightning as pl
import torch

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
