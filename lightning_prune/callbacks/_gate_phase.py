"""The Lightning side of ``GatePruningFromScratch``, with no pruning decision in it (those are
:class:`~lightning_prune.gate_search.GatePruning`'s and :class:`~lightning_prune.gate_search.GateSearch`'s).

The gate phase runs as a loop of its own over the Trainer's training data (:func:`run_gate_phase`):
Lightning's fit loop cannot run it, because it would step the user's optimizers, run their callbacks and
count global steps. What it takes from Lightning: the data (``limit_*_batches``, device transfer and the
module's transfer hooks), the loss (the module's own ``training_step`` under the precision plugin's autocast),
the validation metric (``validation_step``'s logs, ``callbacks/_monitor.py``), ``log_every_n_steps`` and
the loggers, and whether a progress bar is shown (a ``tqdm`` bar of its own: Lightning's progress bar
callbacks have no public API for an extra loop). Also here: the checks at ``setup``, the channel expansion
(:class:`Expansion`) and the report of the chosen structure (:func:`log_structure`).
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Iterator, Mapping, Optional

import pytorch_lightning as pl
import torch
from lightning_utilities.core.overrides import is_overridden
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from lightning_prune.callbacks._module_io import LossFn, module_loss
from lightning_prune.callbacks._monitor import is_metric, monitored_value, validation_metrics
from lightning_prune.gate_search import GatePruned, GateSearch
from lightning_prune.gates import GatePhaseResult
from lightning_prune.loggers import log_metrics, log_pruning_event
from lightning_prune.report import channel_rows, pruning_summary
from lightning_prune.structure import ChannelGroup, layer_channel_ratios


def check_single_instance(trainer: pl.Trainer, callback: pl.Callback) -> None:
    """One ``GatePruningFromScratch`` per Trainer: a second would search a model the first already pruned."""
    others = [cb for cb in trainer.callbacks if isinstance(cb, type(callback)) and cb is not callback]
    if others:
        raise MisconfigurationException(
            f"The Trainer has {len(others) + 1} GatePruningFromScratch callbacks; one gate phase chooses one structure, "
            "so give it one (the second would search a model the first already pruned)."
        )


def check_fit(trainer: pl.Trainer, pl_module: pl.LightningModule, budget_training: bool, expansion: float) -> None:
    """What ``setup`` refuses before a gate phase: a budget without a finite ``max_epochs`` or after
    StochasticWeightAveraging fixed its schedule, and an expansion the module cannot make."""
    if budget_training and (trainer.max_epochs is None or trainer.max_epochs < 1):
        raise ValueError(
            f"`budget_training=True` scales the Trainer's `max_epochs`, which must be a positive number, got {trainer.max_epochs!r}."
        )
    if budget_training and trainer.max_steps not in (None, -1):
        rank_zero_warn(
            f"`budget_training=True` trains for round(max_epochs / flops_ratio) epochs, but `max_steps`={trainer.max_steps} "
            "may end training first: the pruned network would get less than the dense model's training budget."
        )
    if budget_training and averaging_callbacks(trainer):
        raise MisconfigurationException(
            "`budget_training=True` changes `max_epochs` after StochasticWeightAveraging fixed its schedule on it: "
            "set the Trainer's `max_epochs` to the budget yourself, or drop one of the two."
        )
    if expansion != 1 and not (callable(getattr(pl_module, "set_width", None)) and hasattr(pl_module, "width")):
        raise ValueError(
            f"`expansion`={expansion} needs a LightningModule that can rebuild itself wider: define a `width` "
            f"attribute and `set_width(width: float)` (as `ImageClassifier` does); {type(pl_module).__name__} has not."
        )


def averaging_callbacks(trainer: pl.Trainer) -> list[pl.callbacks.StochasticWeightAveraging]:
    return [callback for callback in trainer.callbacks if isinstance(callback, pl.callbacks.StochasticWeightAveraging)]


class Expansion:
    """The module widened by ``factor`` (its ``set_width``) for the gate phase; :meth:`restore` gives it back
    its width and weights (on any failure), :meth:`keep` makes the widened, now pruned, module the result."""

    def __init__(self, pl_module: pl.LightningModule, factor: float) -> None:
        self.pl_module = pl_module
        self.original: Optional[tuple[float, dict[str, torch.Tensor]]] = None
        if factor != 1:
            self.original = (pl_module.width, {k: v.detach().clone() for k, v in pl_module.state_dict().items()})
            pl_module.set_width(pl_module.width * factor)

    def keep(self) -> None:
        self.original = None

    def restore(self) -> None:
        if self.original is not None:
            (width, state), self.original = self.original, None
            self.pl_module.set_width(width)
            self.pl_module.load_state_dict(state)


def run_gate_phase(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    search: GateSearch,
    *,
    epochs: int,
    validate: bool,
    monitor: Optional[str],
    val_every: Optional[int],
    loss_fn: Optional[LossFn],
) -> GatePhaseResult:
    """:meth:`GateSearch.run` over the Trainer's training batches (one epoch under ``fast_dev_run``), validating
    on its first validation loader when ``validate`` (and the module has a ``validation_step``), logging to its
    loggers and a progress bar; the module's torchmetrics metrics, which saw the gate batches, are reset."""
    val_loader = trainer.val_dataloaders
    if isinstance(val_loader, (list, tuple)):
        val_loader = val_loader[0] if val_loader else None
    base = next(c for c in type(pl_module).__mro__ if c.__name__ == "LightningModule" and c.__module__.endswith("core.module"))
    if validate and (val_loader is None or not is_overridden("validation_step", pl_module, parent=base)):
        rank_zero_warn("GatePruningFromScratch: no validation data or `validation_step`, so the last gates are kept.")
        validate = False
    val_limit = _limit((trainer.num_val_batches or [math.inf])[0])
    limit = _limit(trainer.num_training_batches)
    epochs = 1 if trainer.fast_dev_run else epochs
    bar = _progress_bar(trainer, None if limit is None else epochs * limit)

    def log(metrics: dict[str, float]) -> None:
        log_metrics(trainer, {**metrics, "gate/step": float(search.steps)})
        if bar is not None and "gate/loss" in metrics:
            bar.set_postfix(loss=f"{metrics['gate/loss']:.3f}", mean_gate=f"{metrics['gate/mean']:.3f}")

    def batches() -> Iterator[Any]:
        loaders = trainer.train_dataloader
        if isinstance(loaders, (Mapping, list, tuple)):  # several loaders: one combined batch per step, as Lightning's fit loop
            loaders = (batch for batch, _, _ in pl.utilities.CombinedLoader(loaders, "max_size_cycle"))
        for batch in itertools.islice(loaders, limit):
            yield trainer.precision_plugin.convert_input(trainer.strategy.batch_to_device(batch))

    try:
        return search.run(
            batches,
            lambda batch, index: module_loss(trainer, pl_module, batch, loss_fn, index),
            epochs=epochs,
            log_every=max(1, trainer.log_every_n_steps),
            validate=(lambda: monitored_value(validation_metrics(trainer, pl_module, val_loader, val_limit), monitor)) if validate else None,
            val_every=val_every,
            log=log,
            on_step=None if bar is None else (lambda: bar.update(1)),
        )
    finally:
        if bar is not None:
            bar.close()
        for module in pl_module.modules():
            if module is not pl_module and is_metric(module):
                module.reset()


def _limit(value: float) -> Optional[int]:
    return None if value == math.inf else int(value)


def _progress_bar(trainer: pl.Trainer, total: Optional[int]) -> Optional[Any]:
    """A ``tqdm`` bar on global rank zero when the Trainer shows a progress bar."""
    if trainer.progress_bar_callback is None or not trainer.is_global_zero:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="Gate phase (pruning from scratch)", leave=False, dynamic_ncols=True)


def log_structure(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    groups: list[ChannelGroup],
    pruned: GatePruned,
    result: GatePhaseResult,
    *,
    dense_flops: int,
    dense_params: int,
    seconds: float,
    budget_epochs: Optional[int],
    verbose: bool,
) -> None:
    """The chosen structure to the loggers (``prune/*``, the channel-ratio vector, a gate histogram) and, with
    ``verbose``, a table of kept channels on global rank zero."""
    params = sum(p.numel() for p in pl_module.parameters())
    flops = round(pruned.flops_ratio * dense_flops)  # the predictor's exact count (ratio = count / dense)
    extra = {
        "flops_macs": float(flops),
        "dense_flops_macs": float(dense_flops),
        "params_ratio": params / dense_params,
        "threshold": pruned.threshold,
        "gate_phase_seconds": seconds,
        "gate_snapshot_step": float(result.step),
    }
    if budget_epochs is not None:
        extra["max_epochs"] = float(budget_epochs)
    log_pruning_event(
        trainer,
        flops_ratio=pruned.flops_ratio,
        channel_ratios=layer_channel_ratios(groups, pruned.plan),
        histograms={"gates": torch.cat(list(result.gates.values()))},
        extra=extra,
    )
    if verbose and trainer.is_global_zero:
        snapshot = f"gate snapshot: {result.selected} at gate step {result.step}/{result.steps}"
        facts = [snapshot + (f" (monitored {result.metric:.4f})" if result.metric is not None else "")]
        if budget_epochs is not None:
            facts.append(f"budget training: max_epochs -> {budget_epochs}")
        rank_zero_info(pruning_summary("GatePruningFromScratch structure", channels=channel_rows(groups, pruned.plan),
                                       parameters=(dense_params, params), flops=(dense_flops, flops), facts=facts, kept="remaining"))


def changed_arguments(saved: Mapping[str, Any], current: Mapping[str, Any]) -> Optional[str]:
    """The warning for a resume whose structure-deciding arguments differ from the checkpoint's, else ``None``."""
    changed = {k: v for k, v in saved.items() if current.get(k, v) != v}
    if not changed:
        return None
    return (
        "GatePruningFromScratch: resuming the structure this checkpoint chose with "
        + ", ".join(f"{k}={v!r}" for k, v in changed.items())
        + "; the gate phase is not run again, so the current "
        + ", ".join(f"{k}={current[k]!r}" for k in changed)
        + " does not apply (the checkpoint's structure and training budget do). Start a new run to use them."
    )
