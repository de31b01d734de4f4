"""Counting what a piece of code asks of the device: aten operations and host synchronisations.

:func:`count_ops` runs a function under a ``TorchDispatchMode`` (every aten operation, forward and
backward) and a ``TorchFunctionMode`` (Python-level tensor methods), so the counts are the same on a
CPU as on a GPU and can be taken in a test or a CPU benchmark. What counts as a host synchronisation
(the host waits for the device; on a GPU each one drains the launch queue):

- reading a value on the host: ``aten._local_scalar_dense`` (``t.item()``, ``float(t)``, ``int(t)``,
  ``bool(t)``, ``if t:``), ``aten.is_nonzero`` and ``aten.equal`` (``torch.equal`` returns a bool);
- an output whose shape depends on the data: ``aten.nonzero``, ``aten.masked_select``, the
  ``aten.unique`` family, ``aten.bincount``, ``aten.repeat_interleave`` with tensor repeats, and
  indexing with a boolean mask (``t[mask]``, ``t[mask] = v``: ``aten.index``/``aten.index_put_``
  with a ``bool``/``uint8`` index);
- copying tensor data to the host: ``t.tolist()``, ``t.numpy()`` and ``t.cpu()``, counted for
  *every* tensor, including one that is on the CPU in this run (device-independently, the counter
  assumes the data would live on the accelerator); a blocking ``t.to("cpu")`` of a tensor on another
  device, and ``aten.copy_`` into a CPU tensor from another device.

Not counted as synchronisations, but reported as ``transfers``: tensors made from host data
(``torch.tensor(...)``/``torch.as_tensor(...)`` of Python values, ``aten.lift_fresh``) and every
``t.to(<device>)`` call that names a device, even one the tensor is already on (a no-op here; on an
accelerator, a host-to-device copy whenever the source lives on the host, e.g. an index tensor kept on
the CPU, and such a copy from pageable memory blocks the host too). Kernels, views and in-place ops
are only counted as ops.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

SCALAR_READS = frozenset({"aten::_local_scalar_dense", "aten::is_nonzero", "aten::equal"})
DATA_DEPENDENT_SHAPES = frozenset(
    {
        "aten::nonzero",
        "aten::argwhere",
        "aten::masked_select",
        "aten::_unique",
        "aten::_unique2",
        "aten::unique_dim",
        "aten::unique_consecutive",
        "aten::unique_dim_consecutive",
        "aten::bincount",
    }
)
MASK_INDEXING = frozenset({"aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"})
HOST_READS = frozenset({"tolist", "numpy", "cpu"})


@dataclass
class OpCount:
    """What :func:`count_ops` saw. ``syncs`` by reason is in ``sync_ops`` (e.g. ``"aten::_local_scalar_dense"``,
    ``"Tensor.tolist"``); ``by_op`` counts every aten op by name."""

    ops: int = 0
    syncs: int = 0
    transfers: int = 0
    by_op: Counter = field(default_factory=Counter)
    sync_ops: Counter = field(default_factory=Counter)

    def _sync(self, reason: str) -> None:
        self.syncs += 1
        self.sync_ops[reason] += 1


def _is_mask(index: Any) -> bool:
    return isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)


def _target_device(args: tuple, kwargs: dict) -> Any:
    """The device of ``Tensor.to(...)``'s target, or ``None`` when only the dtype changes."""
    candidates = list(args[1:]) + [kwargs.get("device"), kwargs.get("other")]
    for candidate in candidates:
        if isinstance(candidate, torch.Tensor):
            return candidate.device
        if isinstance(candidate, (str, torch.device)) or (isinstance(candidate, int) and not isinstance(candidate, bool)):
            return torch.device(candidate)
    return None


class _Dispatch(TorchDispatchMode):
    def __init__(self, count: OpCount) -> None:
        super().__init__()
        self.count = count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's protocol
        kwargs = kwargs or {}
        name = func.name()
        packet = name.split(".")[0]
        self.count.ops += 1
        self.count.by_op[packet] += 1
        if packet in SCALAR_READS or packet in DATA_DEPENDENT_SHAPES:
            self.count._sync(packet)
        elif packet == "aten::repeat_interleave" and isinstance(args[0], torch.Tensor) and kwargs.get("output_size") is None:
            if name == "aten::repeat_interleave.Tensor" or isinstance(args[1] if len(args) > 1 else None, torch.Tensor):
                self.count._sync(packet)
        elif packet in MASK_INDEXING and len(args) > 1 and any(_is_mask(index) for index in (args[1] or ())):
            self.count._sync(f"{packet} (boolean mask)")
        elif packet == "aten::copy_" and args[0].device.type == "cpu" and args[1].device.type != "cpu":
            self.count._sync("aten::copy_ (to host)")
        elif packet == "aten::lift_fresh":
            self.count.transfers += 1
        return func(*args, **kwargs)


class _Function(TorchFunctionMode):
    def __init__(self, count: OpCount) -> None:
        super().__init__()
        self.count = count

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's protocol
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if isinstance(args[0] if args else None, torch.Tensor):
            if name in HOST_READS and func is getattr(torch.Tensor, name, None):
                self.count._sync(f"Tensor.{name}")
            elif func is torch.Tensor.to:
                target = _target_device(args, kwargs)
                if target is None:
                    pass  # a dtype change only
                elif target.type == "cpu" and args[0].device.type != "cpu" and not kwargs.get("non_blocking", False):
                    self.count._sync("Tensor.to (host)")
                else:
                    self.count.transfers += 1
        return func(*args, **kwargs)


def count_ops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, OpCount]:
    """Run ``fn(*args, **kwargs)`` and count its aten operations and host synchronisations (see the
    module docstring for exactly what counts). Returns ``(fn's result, OpCount)``::

        _, count = count_ops(lambda: torch.ones(3).sum().item())
        assert count.syncs == 1
    """
    if not callable(fn):
        raise ValueError(f"`fn` must be a callable to run, got {type(fn).__name__} {fn!r:.80}.")
    count = OpCount()
    with _Function(count), _Dispatch(count):
        result = fn(*args, **kwargs)
    return result, count
