"""Two-process DDP runs (ddp_spawn, gloo) for the tests, and what each rank logged."""

from __future__ import annotations

import json
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import Logger

from conftest import make_trainer


class FileLogger(Logger):
    """Appends every `log_metrics` call, with the calling rank, to one file per rank."""

    def __init__(self, directory: str) -> None:
        super().__init__()
        self.directory = directory

    @property
    def name(self) -> str:
        return "file"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        with open(Path(self.directory) / f"log_rank{rank}.jsonl", "a") as handle:
            handle.write(json.dumps({k: float(v) for k, v in metrics.items() if k.startswith("prune/")}) + "\n")


def ddp_trainer(tmp_path: Path, callbacks, **kwargs) -> pl.Trainer:
    """A 2-process ``ddp_spawn`` Trainer whose logger writes one file per rank under ``tmp_path``."""
    return make_trainer(
        tmp_path, callbacks, strategy="ddp_spawn", devices=2, logger=FileLogger(str(tmp_path)), deterministic=False, **kwargs
    )


def logged_rows(tmp_path: Path, rank: int) -> list[dict[str, float]]:
    """The ``prune/`` metrics each ``log_metrics`` call of ``rank`` sent to the logger."""
    path = Path(tmp_path) / f"log_rank{rank}.jsonl"
    return [json.loads(line) for line in open(path)] if path.exists() else []
