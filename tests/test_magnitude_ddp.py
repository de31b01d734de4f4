"""Under DDP (2 CPU processes, gloo) every rank holds bit-identical masks and logging happens once."""

from __future__ import annotations

import json
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import Logger

from lightning_prune import DigitsDataModule, ImageClassifier, IterativeMagnitude

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


class SaveMasks(pl.Callback):
    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_train_end(self, trainer, pl_module):
        pruning = next(cb for cb in trainer.callbacks if isinstance(cb, IterativeMagnitude))
        torch.save(pruning.masks.state_dict(), Path(self.directory) / f"masks_rank{trainer.global_rank}.pt")


def test_ddp_ranks_hold_identical_masks_and_log_once(tmp_path):
    pruning = IterativeMagnitude(0.8, "agp", start_epoch=1, end_epoch=2, make_permanent=False, verbose=False)
    trainer = make_trainer(
        tmp_path,
        [pruning, SaveMasks(str(tmp_path))],
        max_epochs=3,
        strategy="ddp_spawn",
        devices=2,
        logger=FileLogger(str(tmp_path)),
        deterministic=False,
    )
    trainer.fit(ImageClassifier("lenet300100"), DigitsDataModule())
    rank0 = torch.load(tmp_path / "masks_rank0.pt")
    rank1 = torch.load(tmp_path / "masks_rank1.pt")
    assert rank0.keys() == rank1.keys() and rank0
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    zeros = sum(int((~m).sum()) for m in rank0.values())
    assert zeros == round(0.8 * sum(m.numel() for m in rank0.values()))
    pruning_rows = [json.loads(line) for line in open(tmp_path / "log_rank0.jsonl")]
    assert len([row for row in pruning_rows if "prune/target_sparsity" in row]) == 2
    rank1_log = tmp_path / "log_rank1.jsonl"
    assert not rank1_log.exists() or not any("prune/target_sparsity" in line for line in open(rank1_log))
