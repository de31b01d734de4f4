"""One bridge from the core's numbers to the Trainer's loggers (any logger; once, on global rank zero)."""

from __future__ import annotations

from typing import Mapping

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_only


@rank_zero_only
def log_metrics(trainer: pl.Trainer, metrics: Mapping[str, float]) -> None:
    """Send scalars to every logger of ``trainer`` at the current global step.

    Works in hooks where ``LightningModule.log`` is refused (``setup``, ``on_fit_start/end``).
    """
    for logger in trainer.loggers:
        logger.log_metrics(dict(metrics), step=trainer.global_step)
