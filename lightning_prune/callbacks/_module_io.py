"""How the callbacks talk to the user's LightningModule: example inputs and losses through its own hooks.

Nothing here assumes classification, ``(x, y)`` batches or an ``example_input_array``:

- :func:`example_input` finds the arguments of one forward pass (a :class:`~lightning_prune.inputs.ModelInput`:
  positional and keyword arguments): the module's ``example_input_array``, the DataModule's
  ``example_input()`` (a dict is keyword arguments, as Lightning reads it), else the first training batch
  (its first tensor, or the whole batch when the model's forward takes the whole structure, or a dict batch
  as keyword arguments: ``forward(**batch)``), or what ``example_input_fn(batch)`` returns. FLOPs are counted
  on it cut to one sample (:meth:`~lightning_prune.inputs.ModelInput.first_sample`), so every FLOPs figure is
  per sample.
- :func:`module_loss` computes a batch's loss through the module's own ``training_step`` (its
  returned loss, or ``loss`` of a returned dict), or ``loss_fn(pl_module, batch)`` when given.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Callable, Mapping, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from pytorch_lightning.utilities.signature_utils import is_param_in_hook_signature

from lightning_prune.inputs import ModelInput, first_tensor, model_input
from lightning_prune.modes import eval_mode

ExampleInputFn = Callable[[Any], Any]
"""``example_input_fn(batch)`` -> the model's input for that batch: a tensor, a tuple of positional arguments, a dict
of keyword arguments (or, where the model takes the dict itself, positional) or a ``ModelInput``."""

LossFn = Callable[[pl.LightningModule, Any], torch.Tensor]
"""``loss_fn(pl_module, batch)`` -> the scalar loss of ``batch``."""

def check_function(name: str, value: Optional[Callable[..., Any]], arity: int, usage: str) -> None:
    """``value`` must be ``None`` or a callable accepting ``arity`` positional arguments; the error names
    the argument, the value and the expected call (``usage``), before anything runs."""
    if value is None:
        return
    if not callable(value):
        raise ValueError(f"`{name}` must be None or a function called as {usage}, got {value!r}.")
    try:
        inspect.signature(value).bind(*range(arity))
    except TypeError as error:
        raise ValueError(f"`{name}` must be callable as {usage}; {value!r} is not ({error}).") from None
    except ValueError:  # builtins without a signature: accept, they fail loudly when called
        pass


def check_loss_source(callback: str, pl_module: pl.LightningModule, loss_fn: Optional[LossFn]) -> None:
    """At ``setup``: a module with manual optimization returns no loss from ``training_step``, so it needs ``loss_fn``."""
    if loss_fn is None and not pl_module.automatic_optimization:
        raise MisconfigurationException(
            f"{callback}: {type(pl_module).__name__} uses manual optimization (`automatic_optimization=False`), so its "
            "`training_step` steps its own optimizers and returns no loss to differentiate; `loss_fn`=None needs one: "
            "pass `loss_fn=` (pl_module, batch) -> loss."
        )


def explicit_example_input(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Optional[ModelInput]:
    """``pl_module.example_input_array`` or ``datamodule.example_input()`` on the module's device (in
    ``setup`` that is still the CPU), if either exists (both usable in ``setup``, before the training data
    is loaded), read as Lightning reads it (a dict is keyword arguments); else ``None``."""
    candidate: Any = pl_module.example_input_array
    provider = getattr(trainer.datamodule, "example_input", None)
    if candidate is None and callable(provider):
        candidate = provider()
    if candidate is None:
        return None
    return _as_module_reads(pl_module, model_input(trainer.strategy.batch_to_device(candidate, pl_module.device)))


def _as_module_reads(pl_module: pl.LightningModule, inputs: ModelInput) -> ModelInput:
    """``inputs`` with floating tensors in the dtype of the module's floating parameters: Lightning's ``convert_input``
    casts to the precision's dtype (``bf16-true``), but in ``setup`` the module is not converted yet."""
    parameter = next((p for p in pl_module.parameters() if p.is_floating_point()), None)
    return inputs if parameter is None else inputs.like(parameter)


def first_training_batch(trainer: pl.Trainer) -> Any:
    """The first batch of the training data on the module's device, through the module's batch-transfer
    hooks. From ``on_train_start`` on, Lightning's loaded training data; earlier (in ``setup``), the
    loaders ``fit`` was given or the module/DataModule's ``train_dataloader()``, asked once more."""
    loaders = trainer.train_dataloader
    if loaders is None:
        source = trainer.fit_loop._data_source  # no public route to the training data before the fit loop loads it
        loaders = source.dataloader() if source.is_defined() else None
    if loaders is None:
        raise MisconfigurationException("No training data, so no example input can be taken from it.")
    if isinstance(loaders, (Mapping, list, tuple)):
        from pytorch_lightning.utilities import CombinedLoader

        batch = next(iter(CombinedLoader(loaders, "max_size_cycle")), (None,))[0]
    else:
        batch = next(iter(loaders), None)
    if batch is None:
        raise MisconfigurationException("The training dataloader yields no batch, so no example input can be taken from it.")
    pl_module = trainer.lightning_module
    return _as_module_reads(pl_module, ModelInput((trainer.strategy.batch_to_device(batch, pl_module.device),))).args[0]


def example_from_batch(pl_module: pl.LightningModule, batch: Any, example_input_fn: Optional[ExampleInputFn] = None) -> ModelInput:
    """The model's input in ``batch``: ``example_input_fn(batch)`` if given (a dict it returns: keyword arguments,
    or the one positional argument where only that runs); else the first of these ``pl_module`` runs on: the
    batch's first tensor, the whole batch, a dict batch as keyword arguments (``forward(**batch)``)."""
    candidates: list[tuple[str, ModelInput]] = []
    if example_input_fn is not None:
        value = example_input_fn(batch)
        if not isinstance(value, Mapping):
            return model_input(value)
        candidates += [("`example_input_fn`'s dict as keyword arguments", model_input(value)),
                       ("`example_input_fn`'s dict as the one argument", ModelInput((value,)))]
    else:
        tensor = first_tensor(batch)
        if tensor is not None and tensor is not batch:
            candidates.append(("the batch's first tensor", ModelInput((tensor,))))
        candidates.append(("the whole batch", ModelInput((batch,))))
        if isinstance(batch, Mapping):
            candidates.append(("the batch as keyword arguments", model_input(batch)))
    errors = []
    for _, inputs in candidates:  # the first that runs one sample (eval mode, no grad)
        try:
            with torch.no_grad(), eval_mode(pl_module), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                inputs.first_sample().call(pl_module)
            return inputs
        except Exception as error:  # noqa: BLE001 - any failure rules this candidate out
            errors.append(f"{type(error).__name__}: {error}")
    tried = ", ".join(f"{what} ({error})" for (what, _), error in zip(candidates, errors))
    raise MisconfigurationException(
        f"No example input found for {type(pl_module).__name__}: its forward fails on each of these, taken from the first "
        f"training batch: {tried}. Set `example_input_array` on the LightningModule, or pass `example_input_fn=` "
        "(batch -> model input: a tensor, a tuple of positional arguments or a dict of keyword arguments) to the callback."
    )


def example_input(
    trainer: pl.Trainer, pl_module: pl.LightningModule, example_input_fn: Optional[ExampleInputFn] = None
) -> ModelInput:
    """Arguments of one forward pass of ``pl_module``, on its device (usable in ``setup`` too):
    ``example_input_array``, else ``datamodule.example_input()``, else taken from the first training batch by
    :func:`example_from_batch` (``example_input_fn`` decides when given, and then comes first)."""
    if example_input_fn is None:
        explicit = explicit_example_input(trainer, pl_module)
        if explicit is not None:
            return explicit
    return example_from_batch(pl_module, first_training_batch(trainer), example_input_fn)


def training_step_loss(pl_module: pl.LightningModule, batch: Any, batch_idx: int = 0) -> torch.Tensor:
    """The loss the module's own ``training_step`` returns for ``batch`` (a tensor, or ``loss`` of a dict),
    with its logging silenced. Metrics it updates see the batch too; pass a ``loss_fn`` where that matters."""
    if not pl_module.automatic_optimization:
        raise MisconfigurationException(
            f"{type(pl_module).__name__} uses manual optimization, so its `training_step` steps its own optimizers and "
            "returns no loss to differentiate: pass `loss_fn=` (pl_module, batch) -> loss to the pruning callback."
        )
    takes_index = is_param_in_hook_signature(pl_module.training_step, "batch_idx", min_args=2)
    # `self.log` does nothing: a step run for the callback's own loss (a held-out batch, a hook where Lightning refuses logging)
    pl_module.log = pl_module.log_dict = lambda *args, **kwargs: None  # type: ignore[method-assign]
    try:
        output = pl_module.training_step(batch, batch_idx) if takes_index else pl_module.training_step(batch)
    finally:
        del pl_module.log, pl_module.log_dict
    loss = output.get("loss") if isinstance(output, Mapping) else output
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise MisconfigurationException(
            f"{type(pl_module).__name__}.training_step returned {type(output).__name__}, not a scalar loss tensor or a dict "
            "with one under 'loss': the pruning callback differentiates that loss. Pass `loss_fn=` (pl_module, batch) -> loss."
        )
    return loss.reshape(())


def module_loss(
    trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, loss_fn: Optional[LossFn] = None, batch_idx: int = 0
) -> torch.Tensor:
    """Loss of ``batch`` (already on the device) under the Trainer's precision context (autocast):
    ``loss_fn(pl_module, batch)`` if given, else :func:`training_step_loss`."""
    with trainer.precision_plugin.forward_context():
        if loss_fn is None:
            return training_step_loss(pl_module, batch, batch_idx)
        loss = loss_fn(pl_module, batch)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise MisconfigurationException(f"`loss_fn`={loss_fn!r} must return a scalar loss tensor, got {type(loss).__name__} {loss!r:.80}.")
    if torch.is_grad_enabled() and not loss.requires_grad:
        raise MisconfigurationException(
            f"`loss_fn`={loss_fn!r} returned a loss that does not depend on the model (requires_grad=False: a constant, "
            "a detached tensor or one computed under torch.no_grad()), so the pruning callback has no gradient to learn from."
        )
    return loss
