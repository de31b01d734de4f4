"""The ``lightning-prune`` command: LightningCLI over any LightningModule, DataModule and callbacks."""

from __future__ import annotations

from typing import Optional

import pytorch_lightning as pl
from pytorch_lightning.cli import ArgsType, LightningCLI


def build_cli(args: ArgsType = None, run: bool = True) -> LightningCLI:
    """LightningCLI where the model, the data and every callback are chosen by ``class_path`` in YAML."""
    return LightningCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main(args: Optional[list[str]] = None) -> None:
    """Entry point of the ``lightning-prune`` console script (``fit``, ``validate``, ``test``, ``predict``)."""
    build_cli(args)
