"""The FLOPs figures the callbacks print and log equal fvcore's recount of the model they describe
(a U-Net: transposed convs, skip concatenations), and element pruning's non-zero figure is labelled as what a
sparse kernel would run, beside the dense-kernel figure."""

from __future__ import annotations

import logging
import re

import pytest
import torch

from lightning_prune import AutoPruneCallback, DigitsDataModule, GatePruningFromScratch, ImageClassifier, IterativeMagnitude
from lightning_prune.flops import count_flops
from task_models import PixelRegressor, pixel_loader
from test_gate_pruning import ListLogger

SUMMARY = re.compile(r"^MACs per sample \(fvcore\): ([\d,]+) -> ([\d,]+) ", re.MULTILINE)
SPARSE = re.compile(r"^MACs per sample a sparse kernel would run \(zero weights skipped\): ([\d,]+) -> ([\d,]+) ", re.MULTILINE)


def pixel_sample() -> tuple:
    return (next(iter(pixel_loader(samples=1, batch_size=1))),)


def printed(pattern: re.Pattern, text: str) -> tuple[int, int]:
    (match,) = pattern.findall(text)
    return tuple(int(number.replace(",", "")) for number in match)


CALLBACKS = {
    "iterative_magnitude": lambda: IterativeMagnitude(0.6, "agp", start_epoch=0, end_epoch=1, granularity="channel", physical=True, monitor=None),
    "autoprune": lambda: AutoPruneCallback(granularity="channel", physical=True, aux_dataloader=pixel_loader(seed=1), init=0.5, aux_lr=0.5, reg=5.0),
    "gate_pruning": lambda: GatePruningFromScratch(flops_ratio=0.4, gate_epochs=1, gate_lr=0.05, monitor=None),
}


@pytest.mark.parametrize("name", sorted(CALLBACKS))
def test_printed_and_logged_flops_of_a_physically_pruned_unet_equal_its_recount(name, trainer_factory, caplog):
    logger, model = ListLogger(), PixelRegressor(unet=True)
    dense = count_flops(model, pixel_sample()).total
    trainer = trainer_factory([CALLBACKS[name]()], max_epochs=2, limit_val_batches=0, logger=logger)
    with caplog.at_level(logging.INFO):
        trainer.fit(model, train_dataloaders=pixel_loader())
    recount = count_flops(model, pixel_sample()).total
    assert recount < dense
    assert printed(SUMMARY, caplog.text) == (dense, recount)
    assert logger.values("prune/flops_ratio")[-1] == recount / dense
    if name != "iterative_magnitude":
        assert logger.values("prune/flops_macs")[-1] == recount


def test_element_pruning_labels_the_non_zero_figure_as_a_sparse_kernels_beside_the_dense_one(trainer_factory, caplog):
    logger, model = ListLogger(), ImageClassifier("lenet5")
    x = model.example_input_array[:1]
    dense = count_flops(model, x)
    trainer = trainer_factory([IterativeMagnitude(0.7, "one_shot", start_epoch=1)], max_epochs=2, limit_train_batches=3,
                              limit_val_batches=1, logger=logger)
    with caplog.at_level(logging.INFO):
        trainer.fit(model, DigitsDataModule())
    # the model still runs dense: its recount is the dense count
    assert printed(SUMMARY, caplog.text) == (dense.total, count_flops(model, x).total) == (dense.total, dense.total)
    assert logger.values("prune/flops_ratio")[-1] == 1.0
    # a sparse kernel skips each layer's multiplications by its zero weights
    skipped = sum(dense.by_module[name] * float(module.weight.eq(0).float().mean())
                  for name, module in model.named_modules() if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)))
    sparse = printed(SPARSE, caplog.text)
    assert sparse[0] == dense.total and sparse[1] == round(dense.total - skipped) < 0.5 * dense.total
    assert logger.values("prune/sparse_flops_ratio")[-1] == pytest.approx(sparse[1] / dense.total, abs=1e-6)
