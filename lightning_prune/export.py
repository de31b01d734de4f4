"""Store pruned weights in a sparse format (CSR, CSC, COO) and restore them bit-exactly."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Union

import torch
from torch import nn

from lightning_prune.checks import check_module, check_path
from lightning_prune.targets import prunable_types

SparseFormat = Literal["csr", "csc", "coo"]
FORMATS = ("csr", "csc", "coo")
_FORMAT_VERSION = 1


@dataclass(frozen=True)
class ExportReport:
    """Where the file went and what it saves: bytes of the dense tensors vs of their sparse encoding."""

    path: Path
    format: str
    dense_bytes: int
    sparse_bytes: int

    @property
    def ratio(self) -> float:
        return self.dense_bytes / self.sparse_bytes if self.sparse_bytes else float("inf")


def _nbytes(tensor: torch.Tensor) -> int:
    if tensor.layout == torch.sparse_coo:
        return _nbytes(tensor._indices()) + _nbytes(tensor._values())
    if tensor.layout == torch.sparse_csr:
        return sum(_nbytes(t) for t in (tensor.crow_indices(), tensor.col_indices(), tensor.values()))
    if tensor.layout == torch.sparse_csc:
        return sum(_nbytes(t) for t in (tensor.ccol_indices(), tensor.row_indices(), tensor.values()))
    return tensor.numel() * tensor.element_size()


def _encode(weight: torch.Tensor, fmt: str) -> torch.Tensor:
    """The weight as an (out × rest) sparse matrix whose index and value storages hold exactly their contents
    (``to_sparse_csr`` may keep larger index storages, and ``torch.save`` writes whole storages)."""
    matrix = weight.detach().cpu().reshape(weight.shape[0], -1)
    if fmt == "csr":
        csr = matrix.to_sparse_csr()
        return torch.sparse_csr_tensor(csr.crow_indices().clone(), csr.col_indices().clone(), csr.values().clone(), csr.shape, check_invariants=True)
    if fmt == "csc":
        csc = matrix.to_sparse_csc()
        return torch.sparse_csc_tensor(csc.ccol_indices().clone(), csc.row_indices().clone(), csc.values().clone(), csc.shape, check_invariants=True)
    coo = matrix.to_sparse_coo().coalesce()
    return torch.sparse_coo_tensor(coo.indices().clone(), coo.values().clone(), coo.shape, is_coalesced=True, check_invariants=True)


def export_sparse(
    module: nn.Module, path: Union[str, Path], format: SparseFormat = "csr"
) -> ExportReport:
    """Write ``module``'s state dict with every Conv/Linear weight as a sparse matrix (out × rest).

    Other tensors (biases, BatchNorm) are stored dense. ``load_sparse`` restores a state dict that
    is bit-equal to ``module.state_dict()`` (masked weights are +0.0 after pruning).
    """
    check_module("module", module)
    check_path("path", path)
    if format not in FORMATS:
        raise ValueError(f"`format` must be one of {FORMATS}, got {format!r}.")
    sparse_names = {f"{name}.weight" for name, m in module.named_modules() if isinstance(m, prunable_types())}
    tensors, shapes = {}, {}
    dense_bytes = sparse_bytes = 0
    for name, tensor in module.state_dict().items():
        dense_bytes += _nbytes(tensor)
        if name in sparse_names:
            shapes[name] = tuple(tensor.shape)
            tensor = _encode(tensor, format)
        else:
            tensor = tensor.detach().cpu().clone()  # its own storage: a view would save the whole of its base
        sparse_bytes += _nbytes(tensor)
        tensors[name] = tensor
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"version": _FORMAT_VERSION, "format": format, "tensors": tensors, "shapes": shapes}, path)
    return ExportReport(path, format, dense_bytes, sparse_bytes)


def load_sparse(path: Union[str, Path], module: Optional[nn.Module] = None) -> dict[str, torch.Tensor]:
    """Read a file written by ``export_sparse`` back into a dense state dict (and load it into ``module``)."""
    check_path("path", path)
    if module is not None:
        check_module("module", module)
    payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    state = {}
    for name, tensor in payload["tensors"].items():
        if name in payload["shapes"]:
            tensor = tensor.to_dense().reshape(payload["shapes"][name])
        state[name] = tensor
    if module is not None:
        module.load_state_dict(state)
    return state
