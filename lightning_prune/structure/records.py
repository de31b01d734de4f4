"""Structure records: the type and shape of every Conv, Linear (Hugging Face ``Conv1D`` included), BatchNorm,
norm over one dimension (LayerNorm, RMSNorm), ``nn.Embedding`` and loose ``nn.Parameter`` (a class token, a
position embedding: ``"type": "Parameter"`` under its parameter name) of a (pruned) model, read off the model or
off a ``state_dict``, and a fresh dense model reshaped to one so that the pruned ``state_dict`` loads (the
Lightning layer's checkpoint helpers are in ``training_state.py``).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
import torch.nn.utils.parametrize as parametrize
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from lightning_prune.structure.attention import sync_head_counts
from lightning_prune.structure.groups import is_norm, norm_width
from lightning_prune.structure.hidden import sync_hidden_widths
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
    "norm": ("width",),  # read off the weight (or normalized_shape): LayerNorm, RMSNorm over one dimension
    "embedding": ("num_embeddings", "embedding_dim"),
}
_PARAMETER = "Parameter"


def _layer_family(module: nn.Module) -> Optional[str]:
    if isinstance(module, _ConvNd):
        return "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, transposed_linear_types()):
        return "conv1d"
    if isinstance(module, _BatchNorm):
        return "batchnorm"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if is_norm(module) and len(getattr(module, "normalized_shape", (0,))) == 1:
        return "norm"
    return None


def _fields(module: nn.Module, family: str) -> dict[str, Any]:
    if family == "norm":
        return {"width": norm_width(module)}
    return {field: getattr(module, field) for field in _SHAPE_FIELDS[family]}


def _loose_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Qualified name -> parameter, for parameters of modules outside the recorded layer families (a
    parametrized layer's ``parametrizations.<name>.original`` is its layer's, resized with it)."""
    return {
        _qualified(name, attribute): parameter
        for name, module in model.named_modules()
        if _layer_family(module) is None and ".parametrizations." not in f".{name}."
        for attribute, parameter in module.named_parameters(recurse=False)
    }


def structure_record(model: nn.Module) -> StructureRecord:
    """Type and shape of every Conv, Linear, BatchNorm, norm and embedding module and loose parameter of
    ``model``, e.g. ``{"layers.0.conv1": {"type": "Conv2d", "in_channels": 16, "out_channels": 9, "groups": 1},
    "cls_token": {"type": "Parameter", "shape": [1, 1, 96]}}``. It covers all of them (not only the changed
    ones), so the latest record alone restores a model pruned several times."""
    record: StructureRecord = {}
    for name, module in model.named_modules():
        family = _layer_family(module)
        if family is not None:
            record[name] = {"type": type(module).__name__, **_fields(module, family)}
    for name, parameter in _loose_parameters(model).items():
        record[name] = {"type": _PARAMETER, "shape": list(parameter.shape)}
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
    rebuilds it, as AutoPrune's gates do on resume), and so does a module without ``reset_parameters`` (a
    Hugging Face ``Conv1D`` or ``RMSNorm``; the loaded ``state_dict`` fills it)."""
    family = _layer_family(module)
    if family != "norm":
        for field in _SHAPE_FIELDS[family]:
            setattr(module, field, shape[field])
    if family == "norm":
        width, weight_shape = shape["width"], (shape["width"],)
        if hasattr(module, "normalized_shape"):
            module.normalized_shape = weight_shape
    elif family == "embedding":
        width, weight_shape = None, (module.num_embeddings, module.embedding_dim)
    elif family == "batchnorm":
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
    created = [_new_parameter(module, "weight", weight_shape)]
    if width is not None:
        created.append(_new_parameter(module, "bias", (width,)))
    if not any(parametrized for _, parametrized in created) and hasattr(module, "reset_parameters"):
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
    projections (:func:`~lightning_prune.structure.attention.sync_head_counts`; their per-head tables, relative
    position biases, are recorded as embeddings or loose parameters); hidden-width attributes follow the embeddings
    (:func:`~lightning_prune.structure.hidden.sync_hidden_widths`), and weights tied in ``model`` (an embedding and
    its output layer) stay tied."""
    modules = dict(model.named_modules())
    every = dict(model.named_parameters(remove_duplicate=False))
    first = {id(parameter): name for name, parameter in reversed(list(every.items()))}
    tied = {name: first[id(parameter)] for name, parameter in every.items() if first[id(parameter)] != name}
    loose = _loose_parameters(model)
    for name, shape in record.items():
        if shape.get("type") == _PARAMETER:
            _resize_parameter(model, loose, name, shape["shape"])
            continue
        module = modules.get(name)
        if module is None or type(module).__name__ != shape.get("type"):
            found = "no such module" if module is None else type(module).__name__
            raise ValueError(f"`record` expects a {shape.get('type')} at {name!r}, the model has {found}.")
        family = _layer_family(module)
        if _fields(module, family) != {field: shape[field] for field in _SHAPE_FIELDS[family]}:
            _resize(module, shape)
    for alias, name in tied.items():
        owner, _, attribute = alias.rpartition(".")
        setattr(model.get_submodule(owner), attribute, model.get_parameter(name))
    sync_head_counts(model)
    sync_hidden_widths(model)


def _resize_parameter(model: nn.Module, loose: Mapping[str, nn.Parameter], name: str, shape: list[int]) -> None:
    """Give the loose parameter ``name`` a zero-filled parameter of ``shape`` (the loaded state fills it)."""
    if name not in loose:
        raise ValueError(f"`record` expects a loose parameter {name!r}; the model has none of that name.")
    if list(loose[name].shape) != list(shape):
        owner, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(owner), attribute, nn.Parameter(loose[name].new_zeros(shape), loose[name].requires_grad))


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
        if shape["type"] == _PARAMETER:
            if prefix + name in state_dict:
                shape.update(shape=list(state_dict[prefix + name].shape))
            continue
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
        elif family == "embedding":
            shape.update(num_embeddings=weight.shape[0], embedding_dim=weight.shape[1])
        elif family == "norm":
            shape.update(width=weight.shape[0])
        else:
            shape.update(num_features=weight.shape[0])
    return record
