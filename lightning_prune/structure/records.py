"""Structure records: the type and shape of every Conv, Linear (Hugging Face ``Conv1D`` included) and BatchNorm module of a (pruned)
model, read off the model or off a ``state_dict``, and a fresh dense model reshaped to one so that the
pruned ``state_dict`` loads (the Lightning layer's checkpoint helpers are in ``training_state.py``).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
import torch.nn.utils.parametrize as parametrize
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from lightning_prune.structure.attention import resize_head_tables, sync_head_counts
from lightning_prune.targets import transposed_linear_types

StructureRecord = dict[str, dict[str, Any]]
"""Module name -> its layer type and shape (JSON/pickle friendly), see :func:`structure_record`."""

STRUCTURE_KEY = "lightning_prune_structure"
"""Checkpoint key under which the :data:`StructureRecord` of a pruned model is stored."""


def _qualified(module: str, parameter: str) -> str:
    return f"{module}.{parameter}" if module else parameter


_SHAPE_FIELDS = {
    "conv": ("in_channels", "out_channels", "groups"),
    "linear": ("in_features", "out_features"),
    "conv1d": ("nx", "nf"),  # Hugging Face's Conv1D: weight (nx, nf)
    "batchnorm": ("num_features",),
}


def _layer_family(module: nn.Module) -> Optional[str]:
    if isinstance(module, _ConvNd):
        return "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, transposed_linear_types()):
        return "conv1d"
    if isinstance(module, _BatchNorm):
        return "batchnorm"
    return None


def structure_record(model: nn.Module) -> StructureRecord:
    """Type and shape of every Conv, Linear and BatchNorm module of ``model``, e.g.
    ``{"layers.0.conv1": {"type": "Conv2d", "in_channels": 16, "out_channels": 9, "groups": 1}}``.
    It covers all of them (not only the changed ones), so the latest record alone restores a model
    pruned several times."""
    record: StructureRecord = {}
    for name, module in model.named_modules():
        family = _layer_family(module)
        if family is not None:
            record[name] = {"type": type(module).__name__, **{f: getattr(module, f) for f in _SHAPE_FIELDS[family]}}
    return record


def _new_parameter(module: nn.Module, name: str, shape: tuple[int, ...]) -> tuple[Optional[nn.Parameter], bool]:
    """Give ``module.<name>`` an uninitialised parameter of ``shape``, under its parametrization when it has
    one (``parametrizations.<name>.original``, set without evaluating the parametrization). Returns the new
    parameter (``None`` for a missing one, e.g. no bias) and whether it is parametrized."""
    if parametrize.is_parametrized(module, name):
        holder = getattr(module.parametrizations, name)
        if not hasattr(holder, "original"):
            raise ValueError(f"Cannot resize the parametrized `{name}` of {type(module).__name__}: its parametrization splits it into several tensors.")
        holder.original = nn.Parameter(holder.original.new_empty(shape))
        return holder.original, True
    if module._parameters.get(name) is None:
        return None, False
    setattr(module, name, nn.Parameter(module._parameters[name].new_empty(shape)))
    return module._parameters[name], False


def _resize(module: nn.Module, shape: dict[str, Any]) -> None:
    """Give ``module`` freshly initialised parameters and buffers of the recorded shape, in place. A module
    with a parametrized weight or bias gets them resized under the parametrization and zero-filled instead
    (its initialisation would evaluate a parametrization that may not fit the new shape until its owner
    rebuilds it, as AutoPrune's gates do on resume), and so does a Hugging Face ``Conv1D`` (it has no
    ``reset_parameters``; the loaded ``state_dict`` fills it)."""
    family = _layer_family(module)
    for field in _SHAPE_FIELDS[family]:
        setattr(module, field, shape[field])
    if family == "batchnorm":
        width, weight_shape = module.num_features, (module.num_features,)
        if module.track_running_stats:
            module.running_mean = module.running_mean.new_zeros(width)
            module.running_var = module.running_var.new_ones(width)
    elif family == "conv":
        width = module.out_channels
        weight_shape = (module.out_channels, module.in_channels // module.groups, *module.kernel_size)
        if module.transposed:
            weight_shape = (module.in_channels, module.out_channels // module.groups, *module.kernel_size)
    elif family == "conv1d":
        width, weight_shape = module.nf, (module.nx, module.nf)
    else:
        width, weight_shape = module.out_features, (module.out_features, module.in_features)
    created = [_new_parameter(module, "weight", weight_shape), _new_parameter(module, "bias", (width,))]
    if not any(parametrized for _, parametrized in created) and family != "conv1d":
        module.reset_parameters()
        return
    with torch.no_grad():
        for parameter, _ in created:
            if parameter is not None:
                parameter.zero_()


def restore_structure(model: nn.Module, record: StructureRecord) -> None:
    """Reshape a fresh dense ``model`` to the recorded shapes so that the pruned ``state_dict`` loads
    strictly. Modules are resized in place (identity, hooks and subclass kept) with freshly initialised
    weights, exactly like torch-pruning resizes them; no example input or graph is needed. Modules
    already of the recorded shape are left untouched. Attention modules' head counts follow their resized
    projections (:func:`~lightning_prune.structure.attention.sync_head_counts`), and so do their per-head tables
    (relative position biases)."""
    modules = dict(model.named_modules())
    for name, shape in record.items():
        module = modules.get(name)
        if module is None or type(module).__name__ != shape.get("type"):
            found = "no such module" if module is None else type(module).__name__
            raise ValueError(f"`record` expects a {shape.get('type')} at {name!r}, the model has {found}.")
        family = _layer_family(module)
        if any(getattr(module, field) != shape[field] for field in _SHAPE_FIELDS[family]):
            _resize(module, shape)
    sync_head_counts(model)
    resize_head_tables(model)


def structure_from_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], prefix: str = ""
) -> StructureRecord:
    """The :data:`StructureRecord` that a (pruned) ``state_dict`` implies for ``model``, read from the
    weight (or running-mean) shapes; a depthwise conv stays depthwise. For state dicts that travel
    without a record, e.g. Lightning's ``ddp_spawn`` copying the workers' weights back into the main
    process's dense module. As a ``load_state_dict`` pre-hook (module-level, so that spawning pickles it)::

        def reshape(module, state_dict, prefix, *_):
            restore_structure(module, structure_from_state_dict(module, state_dict, prefix))

        model.register_load_state_dict_pre_hook(reshape)
    """
    record = structure_record(model)
    modules = dict(model.named_modules())
    for name, shape in record.items():
        module, key = modules[name], prefix + _qualified(name, "weight")
        weight = state_dict.get(key, state_dict.get(prefix + _qualified(name, "running_mean")))
        if weight is None:
            continue
        family = _layer_family(module)
        if family == "conv" and module.transposed:  # weight (in, out / groups, *kernel)
            shape.update(in_channels=weight.shape[0], out_channels=weight.shape[1] * module.groups)
        elif family == "conv":
            depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
            groups = weight.shape[0] if depthwise else module.groups
            shape.update(out_channels=weight.shape[0], in_channels=weight.shape[1] * groups, groups=groups)
        elif family == "linear":
            shape.update(out_features=weight.shape[0], in_features=weight.shape[1])
        elif family == "conv1d":
            shape.update(nx=weight.shape[0], nf=weight.shape[1])
        else:
            shape.update(num_features=weight.shape[0])
    return record
