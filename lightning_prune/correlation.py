"""Structure similarity (Pruning from Scratch, Sec. 4): correlation between channel-ratio vectors.

A structure is its channel-ratio vector (kept / original channels per prunable layer, in model
order; ``structure.channel_ratio_vector``). The paper compares the structures network slimming
finds across seeds and training epochs with a matrix of Pearson correlation coefficients: pruning
trained weights makes structures converge (off-diagonal entries near 1), pruning random weights
gives diverse ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence, Union

import numpy as np
import torch

Vector = Union[Sequence[float], Mapping[str, float], torch.Tensor, np.ndarray]


def _as_rows(vectors: Sequence[Vector]) -> np.ndarray:
    if len(vectors) < 2:
        raise ValueError(f"`vectors` needs at least two channel-ratio vectors, got {len(vectors)}.")
    if all(isinstance(v, Mapping) for v in vectors):
        layers = list(vectors[0])
        for index, vector in enumerate(vectors):
            if list(vector) != layers:
                raise ValueError(f"`vectors[{index}]` names other layers than `vectors[0]`: {list(vector)} vs {layers}.")
        vectors = [list(v.values()) for v in vectors]
    rows = [np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v, dtype=float).ravel() for v in vectors]
    if len({row.size for row in rows}) != 1 or rows[0].size < 2:
        raise ValueError(f"`vectors` must have one common length of at least 2, got lengths {[row.size for row in rows]}.")
    return np.stack(rows)


def structure_correlation(vectors: Sequence[Vector]) -> np.ndarray:
    r"""Pearson correlation-coefficient matrix between channel-ratio vectors.

    .. math:: R_{ij} = \frac{\sum_l (v_{il} - \bar v_i)(v_{jl} - \bar v_j)}
                            {\sqrt{\sum_l (v_{il} - \bar v_i)^2}\,\sqrt{\sum_l (v_{jl} - \bar v_j)^2}}

    Args:
        vectors: two or more structures of one network: sequences/tensors of equal length, or
            mappings layer -> ratio with the same layers in the same order.

    Returns:
        A symmetric ``(n, n)`` float array with ones on the diagonal. A constant vector (every layer
        kept in the same proportion) has no defined correlation: its off-diagonal entries are NaN.
    """
    rows = _as_rows(vectors)
    centred = rows - rows.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(centred, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        matrix = (centred @ centred.T) / np.outer(norms, norms)
    matrix = np.clip(matrix, -1.0, 1.0)
    np.fill_diagonal(matrix, 1.0)
    return matrix


def mean_off_diagonal(matrix: np.ndarray) -> float:
    """Mean of the off-diagonal entries of a correlation matrix (NaN entries ignored)."""
    values = np.asarray(matrix, dtype=float)
    off = values[~np.eye(len(values), dtype=bool)]
    return float(np.nanmean(off)) if np.isfinite(off).any() else float("nan")


def plot_correlation(
    vectors: Sequence[Vector],
    labels: Sequence[str],
    path: Union[str, Path],
    title: str = "Correlation of channel-ratio vectors",
) -> np.ndarray:
    """Compute :func:`structure_correlation`, write its heat map (``plots.plot_structure_correlation``)
    to ``path`` and return the matrix."""
    from lightning_prune.plots import plot_structure_correlation

    matrix = structure_correlation(vectors)
    plot_structure_correlation(matrix, labels, path, title)
    return matrix
