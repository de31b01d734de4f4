"""structure_correlation: the Pearson matrix between channel-ratio vectors, and its heat map."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_prune.correlation import structure_correlation
from lightning_prune.correlation import mean_off_diagonal, plot_correlation


def test_matches_numpy_corrcoef_and_is_symmetric() -> None:
    rng = np.random.default_rng(0)
    vectors = [rng.uniform(0.1, 1.0, 9) for _ in range(4)]
    matrix = structure_correlation(vectors)
    np.testing.assert_allclose(matrix, np.corrcoef(np.stack(vectors)), atol=1e-12)
    np.testing.assert_allclose(matrix, matrix.T)
    assert np.all(np.diag(matrix) == 1.0)


def test_identical_opposite_and_shifted_structures() -> None:
    base = [0.2, 0.5, 0.9, 0.4]
    matrix = structure_correlation([base, [2 * v + 0.1 for v in base], [1 - v for v in base]])
    assert matrix[0, 1] == pytest.approx(1.0)
    assert matrix[0, 2] == pytest.approx(-1.0)
    assert mean_off_diagonal(matrix) == pytest.approx((1 - 1 - 1) / 3)


def test_mappings_tensors_and_constant_vectors() -> None:
    a = {"conv1": 0.5, "conv2": 0.25, "fc": 1.0}
    b = {"conv1": 0.75, "conv2": 0.25, "fc": 0.5}
    from_maps = structure_correlation([a, b])
    from_tensors = structure_correlation([torch.tensor(list(a.values())), torch.tensor(list(b.values()))])
    np.testing.assert_allclose(from_maps, from_tensors)
    constant = structure_correlation([[0.5, 0.5, 0.5], [0.1, 0.2, 0.3]])
    assert np.isnan(constant[0, 1]) and constant[0, 0] == 1.0


@pytest.mark.parametrize(
    "vectors, match",
    [([[0.1, 0.2]], "at least two"), ([[0.1, 0.2], [0.1, 0.2, 0.3]], "common length"), ([{"a": 1.0, "b": 0.5}, {"a": 1.0, "c": 0.5}], "other layers")],
)
def test_bad_input(vectors, match) -> None:
    with pytest.raises(ValueError, match=match):
        structure_correlation(vectors)


def test_heat_map_written(tmp_path) -> None:
    path = tmp_path / "corr.png"
    matrix = plot_correlation([[0.1, 0.5, 0.9], [0.2, 0.4, 0.8], [0.9, 0.5, 0.1]], ["seed 0", "seed 1", "seed 2"], path)
    assert path.stat().st_size > 1000
    assert matrix.shape == (3, 3)
