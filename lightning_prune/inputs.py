"""Inputs as the model takes them: the positional *and* keyword arguments of one forward call.

An example input is what FLOPs counting, channel-group tracing, gates and AutoPrune call the model with. Read
as Lightning reads ``example_input_array``: a tensor is the one positional argument, a tuple (or list) holds the
positional arguments, a dict holds keyword arguments (``model(**batch)``, the Hugging Face convention), and a
:class:`ModelInput` holds both. Every caller converts once with :func:`model_input` and calls
:meth:`ModelInput.call`, so a model is always called the way its ``forward`` is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Union

import torch
from torch import nn


@dataclass(frozen=True, eq=False)
class ModelInput:
    """One forward call's arguments: ``model(*args, **kwargs)``.

    Attributes:
        args: positional arguments (tensors, or nested tuples/lists/dicts holding them, or other values).
        kwargs: keyword arguments, e.g. ``{"input_ids": ..., "attention_mask": ...}``.
    """

    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def call(self, model: nn.Module) -> Any:
        """``model(*args, **kwargs)``."""
        return model(*self.args, **self.kwargs)

    def map_tensors(self, function: Callable[[torch.Tensor], Any]) -> "ModelInput":
        """A copy with ``function`` applied to every tensor, nested containers rebuilt, other values kept."""
        return ModelInput(map_tensors(function, self.args), dict(map_tensors(function, dict(self.kwargs))))

    def first_sample(self) -> "ModelInput":
        """The arguments cut to their first sample: every tensor whose leading dimension is the batch size (that
        of the first tensor, positional arguments first) keeps ``[:1]``; other values and tensors stay."""
        leading = first_tensor((self.args, self.kwargs))
        if leading is None or leading.dim() == 0:
            return self
        size = leading.shape[0]
        return self.map_tensors(lambda tensor: tensor[:1] if tensor.dim() > 0 and tensor.shape[0] == size else tensor)

    def to(self, device: Union[str, torch.device]) -> "ModelInput":
        """A copy with every tensor on ``device``."""
        return self.map_tensors(lambda tensor: tensor.to(device))

    def like(self, parameter: torch.Tensor) -> "ModelInput":
        """A copy on ``parameter``'s device, floating-point tensors in its dtype (a module converted to ``bf16`` since)."""
        return self.map_tensors(lambda t: t.to(parameter.device, parameter.dtype if t.is_floating_point() else t.dtype))

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor of the arguments, positional first, in the order :meth:`map_tensors` visits them."""
        found: list[torch.Tensor] = []

        def collect(tensor: torch.Tensor) -> torch.Tensor:
            found.append(tensor)
            return tensor

        self.map_tensors(collect)
        return found


ExampleInput = Union[torch.Tensor, tuple[Any, ...], Mapping[str, Any], ModelInput]
"""A tensor (one positional argument), a tuple of positional arguments, a dict of keyword arguments, or a
:class:`ModelInput` (both)."""


def model_input(value: Any) -> ModelInput:
    """``value`` as Lightning reads ``example_input_array``: a :class:`ModelInput` as it is, a mapping as keyword
    arguments, a tuple or list as positional arguments, anything else as the one positional argument."""
    if isinstance(value, ModelInput):
        return value
    if isinstance(value, Mapping):
        return ModelInput(kwargs=dict(value))
    return ModelInput(tuple(value) if isinstance(value, (tuple, list)) else (value,))


def map_tensors(function: Callable[[torch.Tensor], Any], value: Any) -> Any:
    """``value`` with ``function`` applied to each tensor inside tuples, lists and mappings (rebuilt with their
    own type); other values are returned as they are."""
    if isinstance(value, torch.Tensor):
        return function(value)
    if isinstance(value, Mapping):
        return type(value)({key: map_tensors(function, item) for key, item in value.items()})
    if isinstance(value, (tuple, list)):
        items = [map_tensors(function, item) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)  # a namedtuple takes fields
    return value


def first_tensor(batch: Any) -> Optional[torch.Tensor]:
    """The first tensor in a (nested) batch: tuples, lists and dicts in order, dataclass-like objects skipped."""
    if isinstance(batch, torch.Tensor):
        return batch
    items = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else ()
    for item in items:
        found = first_tensor(item)
        if found is not None:
            return found
    return None


def output_tensors(output: Any) -> list[torch.Tensor]:
    """Every tensor in a model's output, depth first: a tensor, the items of lists and tuples, the values of
    mappings (a Hugging Face ``ModelOutput``) and the attributes of other objects (a key/value cache)."""
    found: list[torch.Tensor] = []
    seen: set[int] = set()
    stack = [output]
    while stack:
        value = stack.pop()
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, nn.Module) or id(value) in seen:
            continue
        elif isinstance(value, (list, tuple)):
            stack.extend(reversed(value))
        elif isinstance(value, Mapping):
            stack.extend(reversed(list(value.values())))
        elif hasattr(value, "__dict__") and not isinstance(value, type):
            stack.extend(reversed(list(vars(value).values())))
        seen.add(id(value))
    return found
