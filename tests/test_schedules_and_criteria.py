"""Unit behaviour of the schedule and the magnitude criteria (no Lightning involved)."""

import pytest
import torch

from lightning_prune import PruningSchedule
from lightning_prune.criteria import global_magnitude_masks, layer_magnitude_masks, lowest_k_mask, sensitivity_masks


def test_agp_follows_the_cubic_formula_and_ends_at_the_target():
    schedule = PruningSchedule("agp", start_epoch=2, end_epoch=8, frequency=2)
    assert schedule.events == [2, 4, 6, 8]
    n = 4
    for k, epoch in enumerate(schedule.events, start=1):
        assert schedule.fraction(epoch) == pytest.approx(1 - (1 - k / n) ** 3)
    assert schedule.fraction(8) == 1.0
    assert schedule.fraction(3) is None


def test_iterative_steps_are_equal_and_one_shot_is_a_single_event():
    iterative = PruningSchedule("iterative", 0, 3)
    assert [iterative.fraction(e) for e in iterative.events] == [0.25, 0.5, 0.75, 1.0]
    one_shot = PruningSchedule("one_shot", 5, 5)
    assert one_shot.events == [5] and one_shot.fraction(5) == 1.0


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(kind="linear", start_epoch=0, end_epoch=1), "schedule"),
        (dict(kind="agp", start_epoch=3, end_epoch=1), "start_epoch"),
        (dict(kind="agp", start_epoch=0, end_epoch=3, frequency=2), "frequency"),
        (dict(kind="agp", start_epoch=0, end_epoch=3, frequency=0), "frequency"),
        (dict(kind="agp", start_epoch=0, end_epoch=3, initial_sparsity=1.0), "initial_sparsity"),
        (dict(kind="agp", start_epoch=0, end_epoch=3, initial_sparsity=None), "initial_sparsity"),
        (dict(kind="one_shot", start_epoch=0, end_epoch=0, initial_sparsity=0.2), "initial_sparsity"),
    ],
)
def test_bad_schedules_name_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        PruningSchedule(**kwargs)


def test_lowest_k_mask_drops_exactly_k_with_ties_broken_by_position():
    scores = torch.tensor([0.0, 0.0, 0.0, 1.0, 2.0])
    assert lowest_k_mask(scores, 2).tolist() == [False, False, True, True, True]
    assert lowest_k_mask(scores, 0).all()


def test_global_masks_reach_the_exact_count_across_layers():
    torch.manual_seed(0)
    weights = {"a": torch.randn(30, 7), "b": torch.randn(11, 3, 3) * 5}
    masks = global_magnitude_masks(weights, 0.6)
    zeros = sum(int((~m).sum()) for m in masks.values())
    assert zeros == round(0.6 * (30 * 7 + 11 * 9))
    # one threshold: every dropped weight is smaller than every kept one
    dropped = torch.cat([weights[n][~masks[n]].abs() for n in weights])
    kept = torch.cat([weights[n][masks[n]].abs() for n in weights])
    assert dropped.max() <= kept.min()


def test_layer_masks_give_each_layer_its_own_sparsity():
    weights = {"a": torch.randn(100), "b": torch.randn(50)}
    masks = layer_magnitude_masks(weights, {"a": 0.3, "b": 0.9})
    assert int((~masks["a"]).sum()) == 30 and int((~masks["b"]).sum()) == 45


def test_sensitivity_masks_threshold_at_s_sigma():
    w = torch.tensor([-3.0, -0.5, 0.2, 1.0, 2.5])
    masks = sensitivity_masks({"w": w}, {"w": 2.0}, {"w": 0.5})  # λ = 1.0
    assert masks["w"].tolist() == [True, False, False, True, True]


def test_a_schedule_rebuilds_from_its_state_and_answers_per_step_in_constant_time():
    schedule = PruningSchedule("agp", start_epoch=100, end_epoch=100_000, frequency=100)
    assert PruningSchedule(**schedule.state_dict()) == schedule
    assert schedule.fraction(150) is None and schedule.fraction(100_000) == 1.0 and schedule.last_event == 100_000
    assert schedule.fraction(200) == pytest.approx(1 - (1 - 2 / 1000) ** 3)


class _Halve(torch.nn.Module):
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * 0.5


def test_sparsity_report_counts_every_parametrized_layer_and_a_tied_weight_once() -> None:
    """A parametrized weight is computed afresh at each access (its id can be reused once freed), so
    layers are told apart by their stored parameter; a tied weight still counts once."""
    from torch.nn.utils import parametrize

    from lightning_prune import sparsity_report
    from lightning_prune.magnitude import unique_weights

    layers = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(6)])
    for layer in layers:
        parametrize.register_parametrization(layer, "weight", _Halve())
    report = sparsity_report(layers)
    assert [row.layer for row in report.layers] == [str(i) for i in range(6)]
    assert report.total.total == 6 * 64
    assert len(unique_weights(layers, [str(i) for i in range(6)])) == 6
    tied = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    tied[1].weight = tied[0].weight
    assert [row.layer for row in sparsity_report(tied).layers] == ["0"]
