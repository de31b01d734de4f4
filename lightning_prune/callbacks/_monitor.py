"""The user's own validation metric, read from what the LightningModule's ``validation_step`` logs.

A callback that must compare models during ``fit`` (the gate phase of ``GatePruningFromScratch``)
runs ``validation_step`` over the validation batches itself, with ``self.log``/``self.log_dict``
captured instead of sent to Lightning, and aggregates each logged key as Lightning does for an
``on_epoch`` value with the default ``reduce_fx="mean"``: the mean over batches weighted by the batch
size (the ``batch_size=`` given to ``self.log``, else ``extract_batch_size(batch)``). A logged
``torchmetrics.Metric`` object is read with its own ``compute()`` after the pass, then ``reset()``.
Unlike Lightning (which syncs only with ``sync_dist=True``), values are always summed over
processes, so every rank decides the same.
"""

from __future__ import annotations

import itertools
from typing import Any, Iterable, Mapping, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.data import extract_batch_size
from pytorch_lightning.utilities import rank_zero_warn
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from pytorch_lightning.utilities.signature_utils import is_param_in_hook_signature

from lightning_prune.modes import eval_mode


def is_metric(value: Any) -> bool:
    """Duck-typed torchmetrics ``Metric``: ``compute``, ``reset`` and ``update``."""
    return all(callable(getattr(value, name, None)) for name in ("compute", "reset", "update"))


def default_monitor(logged: Iterable[str]) -> Optional[str]:
    """The default monitored key: the first logged key, in logging order, whose name ends in ``loss``
    (``val_loss``, ``val/loss``, ``valid.loss``), or ``None``."""
    return next((name for name in logged if name.lower().endswith("loss")), None)


@torch.no_grad()
def validation_metrics(trainer: pl.Trainer, pl_module: pl.LightningModule, loader: Any, limit: Optional[int]) -> dict[str, float]:
    """Every key ``validation_step`` logs over the first ``limit`` batches of ``loader`` (in eval mode,
    under the precision plugin's autocast), aggregated as described in the module docstring; keys in
    logging order. One host synchronisation per call, none per batch."""
    takes_index = is_param_in_hook_signature(pl_module.validation_step, "batch_idx", min_args=2)
    sums: dict[str, torch.Tensor] = {}
    weights: dict[str, float] = {}  # batch sizes are host numbers
    metrics: dict[str, Any] = {}

    def record(name: str, value: Any, batch_size: Optional[int], batch: Any) -> None:
        if is_metric(value):
            metrics[name] = value
            return
        size = batch_size if batch_size is not None else extract_batch_size(batch)
        value = torch.as_tensor(value, device=pl_module.device).detach().float().mean()
        sums[name] = sums.get(name, 0.0) + value * size
        weights[name] = weights.get(name, 0.0) + float(size)

    batch = None

    def log(name: str, value: Any, *args: Any, batch_size: Optional[int] = None, **kwargs: Any) -> None:
        record(name, value, batch_size, batch)

    def log_dict(dictionary: Mapping[str, Any], *args: Any, batch_size: Optional[int] = None, **kwargs: Any) -> None:
        for name, value in dictionary.items():
            record(name, value, batch_size, batch)

    pl_module.log, pl_module.log_dict = log, log_dict  # type: ignore[method-assign]
    try:
        with eval_mode(pl_module), trainer.precision_plugin.forward_context():
            for index, raw in enumerate(itertools.islice(loader, limit)):
                batch = trainer.precision_plugin.convert_input(trainer.strategy.batch_to_device(raw))
                pl_module.validation_step(batch, index) if takes_index else pl_module.validation_step(batch)
    finally:
        del pl_module.log, pl_module.log_dict
    values: dict[str, float] = {}
    if sums:
        names = list(sums)
        packed = torch.cat([torch.stack([sums[n] for n in names]), torch.tensor([weights[n] for n in names], device=pl_module.device)])
        if trainer.world_size > 1:
            packed = trainer.strategy.reduce(packed, reduce_op="sum")
        numbers = packed.tolist()
        values = {name: numbers[i] / numbers[len(names) + i] for i, name in enumerate(names)}
    for name, metric in metrics.items():
        values[name] = float(metric.compute())
        metric.reset()
    return values


def monitored_value(values: Mapping[str, float], monitor: Optional[str]) -> Optional[tuple[str, float]]:
    """``(key, value)`` of ``monitor`` among the logged ``values``; a clear error naming ``monitor`` when it
    is not there. With ``monitor=None`` the :func:`default_monitor` key, or ``None`` (with a warning, once)
    when no logged key ends in ``loss``: there is nothing to select on, so the last gates are kept."""
    key = monitor if monitor is not None else default_monitor(values)
    if monitor is None and key is None:
        rank_zero_warn(
            f"GatePruningFromScratch: the `validation_step` logged no key ending in 'loss' ({sorted(values)}), so the "
            "last gates are kept; pass `monitor=` one of the logged keys (and `mode=`) to select a snapshot."
        )
        return None
    if key not in values:
        raise MisconfigurationException(
            f"`monitor`={monitor!r} was not logged by the LightningModule's `validation_step` during the gate phase's "
            f"validation; it logged {sorted(values)}. Pass `monitor=` one of those (and `mode='min'` or 'max'), or `select='last'`."
        )
    return key, values[key]
