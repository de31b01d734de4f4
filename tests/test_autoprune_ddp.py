"""Under DDP (2 CPU processes, gloo) every rank holds identical auxiliary parameters `M`, and logs once.

The held-out loader is sharded per rank, so the ranks' `M` gradients differ: without the all-reduce of those
gradients the ranks' `M` (and then their weights) diverge and this test fails (checked by deleting it).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from lightning_prune import AutoPruneCallback, DigitsDataModule, ImageClassifier

from ddp_support import ddp_trainer, logged_rows


class SaveAuxiliary(pl.Callback):
    """Before the masks are made permanent: each rank's `M` and weights."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_train_end(self, trainer, pl_module):
        pruning = next(cb for cb in trainer.callbacks if isinstance(cb, AutoPruneCallback))
        state = {"aux": pruning.aux.state_dict()["values"], "weights": pl_module.state_dict()}
        torch.save(state, Path(self.directory) / f"aux_rank{trainer.global_rank}.pt")


@pytest.mark.distributed
def test_ddp_ranks_hold_identical_auxiliary_parameters_and_log_once(tmp_path) -> None:
    trainer = ddp_trainer(
        tmp_path,
        [AutoPruneCallback(verbose=False), SaveAuxiliary(str(tmp_path))],
        max_epochs=2,
        limit_val_batches=2,
        num_sanity_val_steps=0,
    )
    trainer.fit(ImageClassifier("lenet300100"), DigitsDataModule(aux_fraction=0.5))
    rank0, rank1 = (torch.load(tmp_path / f"aux_rank{r}.pt") for r in (0, 1))
    assert rank0["aux"].keys() == rank1["aux"].keys() and rank0["aux"]
    for name, value in rank0["aux"].items():
        assert torch.equal(value, rank1["aux"][name]), name  # M's gradients are averaged over ranks
    assert any((value <= 0).any() for value in rank0["aux"].values())  # something was switched off
    for name, value in rank0["weights"].items():
        assert torch.equal(value, rank1["weights"][name]), name
    assert any("prune/sparsity" in row for row in logged_rows(tmp_path, 0))
    assert not any("prune/sparsity" in row for row in logged_rows(tmp_path, 1))


@pytest.mark.distributed
def test_ddp_module_without_example_input_attaches_m_before_the_wrap_identically_on_both_ranks(tmp_path) -> None:
    from task_models import PixelRegressor, pixel_loader

    callback = AutoPruneCallback(granularity="channel", aux_dataloader=pixel_loader(samples=64, seed=1),
                                 init=0.1, aux_lr=0.1, reg=3.0, end_epoch=1, verbose=False)
    trainer = ddp_trainer(tmp_path, [callback, SaveAuxiliary(str(tmp_path))], max_epochs=3, limit_val_batches=0)
    trainer.fit(PixelRegressor(), train_dataloaders=pixel_loader(samples=128))
    rank0, rank1 = (torch.load(tmp_path / f"aux_rank{r}.pt") for r in (0, 1))
    assert rank0["aux"].keys() == rank1["aux"].keys() and rank0["aux"]
    for name, value in rank0["aux"].items():
        assert torch.equal(value, rank1["aux"][name]), name
    assert any((value <= 0).any() for value in rank0["aux"].values())
    for name, value in rank0["weights"].items():  # BatchNorm statistics are per rank under DDP (no SyncBatchNorm)
        assert "running_" in name or "num_batches" in name or torch.equal(value, rank1["weights"][name]), name
