"""Under DDP (2 CPU processes, gloo) every rank learns the same gates, prunes to the same structure,
trains identical weights, and the structure is logged once. Lightning's DistributedSampler gives the ranks
different shards of the data, so without the all-reduce of the gate gradient their gates diverge: the gates are
a parameter registered on the LightningModule before DDP wraps it, so DDP's own all-reduce averages their gradient
(checked: without the registration DDP refuses the module, whose every weight is frozen)."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from lightning_prune import DigitsDataModule, GatePruningFromScratch, ImageClassifier

from ddp_support import ddp_trainer, logged_rows


class SaveState(pl.Callback):
    def __init__(self, directory: str) -> None:
        self.directory = directory

    def setup(self, trainer, pl_module, stage):
        self.first_labels = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.first_labels is None:
            self.first_labels = batch[1].clone()

    def on_train_end(self, trainer, pl_module):
        pruning = next(cb for cb in trainer.callbacks if isinstance(cb, GatePruningFromScratch))
        state = {"gates": pruning.gates, "plan": pruning.plan, "snapshot": pruning.snapshot, "weights": pl_module.state_dict(), "first_labels": self.first_labels}
        torch.save(state, Path(self.directory) / f"state_rank{trainer.global_rank}.pt")


@pytest.mark.distributed
def test_ddp_ranks_end_with_the_same_structure_and_log_once(tmp_path) -> None:
    # gate_ratio 0.95 so that a validated snapshot is sparse enough and selected, identically on both ranks
    pruning = GatePruningFromScratch(flops_ratio=0.5, gate_epochs=2, gate_lr=0.3, gate_ratio=0.95, verbose=False)
    trainer = ddp_trainer(
        tmp_path,
        [pruning, SaveState(str(tmp_path))],
        max_epochs=3,  # 2 gate epochs, then 1 epoch of the pruned network
        limit_train_batches=4,
        limit_val_batches=2,
        num_sanity_val_steps=0,
    )
    model = ImageClassifier("vgg_small", in_channels=3, image_size=32, width=0.25)
    trainer.fit(model, DigitsDataModule(batch_size=32, image_size=32, channels=3))
    rank0, rank1 = (torch.load(tmp_path / f"state_rank{r}.pt") for r in (0, 1))
    assert not torch.equal(rank0["first_labels"], rank1["first_labels"])  # each rank trains on its own shard
    assert rank0["snapshot"] == rank1["snapshot"] and rank0["snapshot"]["selected"] == "best_val"
    for index in rank0["gates"]:
        assert torch.equal(rank0["gates"][index], rank1["gates"][index])  # all-reduced gate gradients
        assert torch.equal(rank0["plan"][index], rank1["plan"][index])
    assert any((g < 1).any() for g in rank0["gates"].values())
    for name, value in rank0["weights"].items():
        assert torch.equal(value, rank1["weights"][name]), name  # DDP re-wrapped on the pruned parameters
    # ImageClassifier reshapes itself to the incoming tensors, so the main process gets rank 0's pruned network
    for name, value in model.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, rank0["weights"][name]), name
    assert len([row for row in logged_rows(tmp_path, 0) if "prune/flops_ratio" in row]) == 1
    assert not any("prune/flops_ratio" in row for row in logged_rows(tmp_path, 1))
