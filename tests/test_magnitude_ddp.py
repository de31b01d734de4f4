"""Under DDP (2 CPU processes, gloo) every rank holds bit-identical masks and logging happens once."""

from __future__ import annotations

from pathlib import Path

import pytest
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


@pytest.mark.distributed
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


class Diverge(pl.Callback):
    """Before the pruning callback acts at ``epoch``, rank 1's weights are scrambled, so a rank that
    decided on its own weights would pick other masks."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch and trainer.global_rank == 1:
            generator = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for p in pl_module.parameters():
                    p.mul_(torch.rand(p.shape, generator=generator))


@pytest.mark.distributed
@pytest.mark.parametrize("granularity", ["element", "channel"])
def test_ddp_ranks_take_rank_zeros_decision_even_when_their_weights_diverged(tmp_path, granularity):
    pruning = IterativeMagnitude(0.6, "one_shot", start_epoch=1, granularity=granularity, make_permanent=False, verbose=False)
    model = ImageClassifier("lenet5" if granularity == "channel" else "lenet300100")
    trainer = ddp_trainer(tmp_path, [Diverge(1), pruning, SaveMasks(str(tmp_path))], max_epochs=2, limit_train_batches=4, limit_val_batches=1)
    trainer.fit(model, DigitsDataModule())
    rank0 = torch.load(tmp_path / "masks_rank0.pt")
    rank1 = torch.load(tmp_path / "masks_rank1.pt")
    assert rank0.keys() == rank1.keys() and rank0
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
