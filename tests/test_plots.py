"""Each figure draws the numbers it is given and is written as a PNG."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from lightning_prune import plots, sparsity_report


def bar_heights(figure) -> list[float]:
    return [patch.get_height() for patch in figure.axes[0].patches]


def test_sparsity_bars_and_png(tmp_path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight[:3] = 0.0
    report = sparsity_report(model)
    assert bar_heights(plots.sparsity_figure(report)) == pytest.approx([0.75, 0.0])
    path = plots.plot_sparsity(report, tmp_path / "a" / "sparsity.png")
    assert path == tmp_path / "a" / "sparsity.png" and imread(path).ndim == 3


def test_channel_ratios_bars_for_one_structure_lines_for_several(tmp_path) -> None:
    one = {"conv1": 0.5, "conv2": 0.25}
    assert bar_heights(plots.channel_ratio_figure(one)) == pytest.approx([0.5, 0.25])
    several = plots.channel_ratio_figure({"epoch 1": one, "epoch 2": {"conv1": 0.75, "conv2": 1.0}})
    lines = several.axes[0].get_lines()
    assert [line.get_label() for line in lines] == ["epoch 1", "epoch 2"]
    assert list(lines[1].get_ydata()) == [0.75, 1.0]
    assert plots.plot_channel_ratios(one, tmp_path / "c.png").stat().st_size > 0


def test_sensitivity_curves(tmp_path) -> None:
    figure = plots.sensitivity_figure({"fc1": {0.5: 0.9, 0.9: 0.7}}, baseline=0.95)
    (curve, baseline) = figure.axes[0].get_lines()
    assert list(curve.get_xdata()) == [0.5, 0.9] and list(curve.get_ydata()) == [0.9, 0.7]
    assert list(baseline.get_ydata()) == [0.95, 0.95]
    assert imread(plots.plot_sensitivity({"fc1": {0.5: 0.9}}, tmp_path / "s.png")).shape[2] in (3, 4)


def test_structure_correlation_heat_map(tmp_path) -> None:
    matrix = np.array([[1.0, 0.3], [0.3, 1.0]])
    figure = plots.structure_correlation_figure(torch.tensor(matrix), ["seed 0", "seed 1"])
    assert np.array_equal(figure.axes[0].get_images()[0].get_array(), matrix)
    assert [t.get_text() for t in figure.axes[0].texts] == ["1.00", "0.30", "0.30", "1.00"]
    assert plots.plot_structure_correlation(matrix, ["a", "b"], tmp_path / "h.png").exists()
    with pytest.raises(ValueError, match="`matrix`"):
        plots.structure_correlation_figure(np.ones((2, 3)), ["a", "b"])
