"""No host synchronisation in the callbacks' own per-step work, counted (``lightning_prune.diagnostics.count_ops``)
in real ``Trainer.fit`` runs: every per-step Callback hook of each pruning callback, every hook registered on
the Trainer's optimizers, and the ``before_step``/``after_step`` that ``hook_optimizer`` calls around each optimizer
step (``before_step`` runs inside the step's closure, after the backward pass)."""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Optional

import pytest
import pytorch_lightning as pl
import torch.nn.functional as F

from lightning_prune import AutoPruneCallback, DigitsDataModule, GatePruningFromScratch, ImageClassifier, IterativeMagnitude
from lightning_prune.diagnostics import count_ops

from conftest import make_trainer

PER_STEP_HOOKS = ("on_train_batch_start", "on_before_backward", "on_after_backward", "on_before_optimizer_step",
                  "on_before_zero_grad", "on_train_batch_end")


class PerStepCounts(pl.Callback):
    """Counts ops and host syncs, by hook and global step, in ``callback``'s per-step hooks, in every optimizer
    step hook and in the step verbs of the objects ``hook_optimizer`` hooked (wrapped at ``on_train_start``, after
    the callbacks registered theirs)."""

    def __init__(self, callback: pl.Callback) -> None:
        self.calls: Counter = Counter()
        self.ops: Counter = Counter()
        self.syncs: Counter = Counter()  # (hook, reason, global step) -> count
        self.trainer: Optional[pl.Trainer] = None
        for name in PER_STEP_HOOKS:
            setattr(callback, name, self._counted(name, getattr(callback, name)))

    def _counted(self, name: str, hook: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            result, count = count_ops(hook, *args, **kwargs)
            self.calls[name] += 1
            self.ops[name] += count.ops
            self.syncs.update({(name, reason, self.trainer.global_step): n for reason, n in count.sync_ops.items()})
            return result

        return counted

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.trainer = trainer

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for optimizer in trainer.optimizers:
            for kind, hooks in (("optimizer pre-step", optimizer._optimizer_step_pre_hooks),
                                ("optimizer post-step", optimizer._optimizer_step_post_hooks)):
                for key, hook in list(hooks.items()):
                    hooks[key] = self._counted(kind, hook)
                    for hooked in getattr(hook, "args", ())[:1]:  # hook_optimizer's partial(_before/_after, pruner)
                        for verb in ("before_step", "after_step"):
                            if verb not in vars(hooked):  # once per object
                                setattr(hooked, verb, self._counted(verb, getattr(hooked, verb)))


def cross_entropy(pl_module: pl.LightningModule, batch: Any) -> Any:
    x, y = batch
    return F.cross_entropy(pl_module(x), y)


def held_out_batches() -> list:
    """The digits' held-out split as a list of batches: loading them (a sampler's permutation, a DataLoader's seed)
    reads host tensors once per epoch, which is data loading, not the callback's per-step work."""
    data = DigitsDataModule(aux_fraction=0.5)
    data.setup("fit")
    return list(data.aux_dataloader())


# case -> (callback, the hook that must do per-step work, the (hook, global step) pairs of one-off events that may read
# the host: a pruning event deciding masks)
CASES: dict[str, tuple[Callable[[], pl.Callback], Optional[str], set[tuple[str, int]]]] = {
    "magnitude-element": (lambda: IterativeMagnitude(0.8, "agp", start_epoch=0, end_epoch=1, make_permanent=False, verbose=False),
                          "before_step", set()),
    "magnitude-channel": (lambda: IterativeMagnitude(0.5, "agp", start_epoch=0, end_epoch=1, granularity="channel",
                                                     make_permanent=False, verbose=False), "before_step", set()),
    "magnitude-step-interval": (lambda: IterativeMagnitude(0.8, "agp", start_epoch=1, end_epoch=3, interval="step",
                                                           make_permanent=False, verbose=False), "after_step", {("on_train_batch_start", step) for step in (1, 2, 3)}),
    "autoprune-learning": (lambda: AutoPruneCallback(init=0.1, aux_lr=0.05, reg=2.0, loss_fn=cross_entropy, aux_dataloader=held_out_batches(),
                                                     end_epoch=0, verbose=False), "on_train_batch_end", set()),
    "gates-in-the-fit": (lambda: GatePruningFromScratch(flops_ratio=0.5, gate_epochs=1, gate_position="conv", verbose=False),
                         "before_step", set()),
}


@pytest.mark.parametrize("case", list(CASES))
def test_no_callback_synchronises_with_the_host_in_a_training_step(tmp_path, case):
    """Two epochs of four steps: IterativeMagnitude with its masks enforced (events at epoch starts, or at steps 1-3
    with interval="step", where deciding a mask may read the host), AutoPrune learning M in epoch 0 and
    fine-tuning in epoch 1 (its masks fixed in the first fine-tuning step, the fraction switched off read at the
    epoch's end), GatePruningFromScratch's gate epoch (the penalty's gradient, the clamp and its `self.log` of
    the gate metrics each step; the finiteness check at the epoch's end) and then the pruned network."""
    make, busy, events = CASES[case]
    callback = make()
    counts = PerStepCounts(callback)
    trainer = make_trainer(tmp_path, [callback, counts], max_epochs=2, limit_train_batches=4, limit_val_batches=1)
    trainer.fit(ImageClassifier("lenet5"), DigitsDataModule(aux_fraction=0.5))
    assert all(counts.calls[name] == trainer.global_step == 8 for name in PER_STEP_HOOKS)
    assert busy is None or counts.ops[busy] > 0  # the hook did its per-step work under the counter
    outside_events = {key: n for key, n in counts.syncs.items() if (key[0], key[2]) not in events}
    assert not outside_events, outside_events
