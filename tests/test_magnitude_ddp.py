"""Under DDP (2 CPU processes, gloo) every rank holds bit-identical masks and logging happens once."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch

from lightning_prune import DigitsDataModule, ImageClassifier, IterativeMagnitude

from ddp_support import ddp_trainer, logged_rows


class SaveMasks(pl.Callback):
    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_train_end(self, trainer, pl_module):
        pruning = next(cb for cb in trainer.callbacks if isinstance(cb, IterativeMagnitude))
        torch.save(pruning.masks.state_dict(), Path(self.directory) / f"masks_rank{trainer.global_rank}.pt")


def test_ddp_ranks_hold_identical_masks_and_log_once(tmp_path):
    pruning = IterativeMagnitude(0.8, "agp", start_epoch=1, end_epoch=2, make_permanent=False, verbose=False)
    trainer = ddp_trainer(tmp_path, [pruning, SaveMasks(str(tmp_path))], max_epochs=3)
    trainer.fit(ImageClassifier("lenet300100"), DigitsDataModule())
    rank0 = torch.load(tmp_path / "masks_rank0.pt")
    rank1 = torch.load(tmp_path / "masks_rank1.pt")
    assert rank0.keys() == rank1.keys() and rank0
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    zeros = sum(int((~m).sum()) for m in rank0.values())
    assert zeros == round(0.8 * sum(m.numel() for m in rank0.values()))
    assert len([row for row in logged_rows(tmp_path, 0) if "prune/target_sparsity" in row]) == 2
    assert not any("prune/target_sparsity" in row for row in logged_rows(tmp_path, 1))
