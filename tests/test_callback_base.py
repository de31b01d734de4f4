"""What the three callbacks share through ``PruningCallback``: one ``state_key`` policy, ``state_dict`` = {the
validated arguments, the core's state}, one changed-argument warning on resume."""

from __future__ import annotations

import warnings

import pytest

from lightning_prune import AutoPruneCallback, GatePruningFromScratch, IterativeMagnitude
from lightning_prune.callbacks.base import PruningCallback


@pytest.mark.parametrize("cls", [IterativeMagnitude, GatePruningFromScratch, AutoPruneCallback])
def test_each_callback_saves_its_arguments_as_plain_values(cls) -> None:
    callback = cls(example_input_fn=lambda batch: batch, verbose=False)
    saved = callback.state_dict()["arguments"]
    assert isinstance(callback, PruningCallback) and callback.state_key == cls.__qualname__
    assert not {"example_input_fn", "verbose", "name"} & set(saved)  # functions, display flags and the key are not state
    assert saved and all(value is None or type(value) in (bool, int, float, str, list, dict) for value in saved.values())


def test_only_a_named_magnitude_callback_gets_its_own_key() -> None:
    assert IterativeMagnitude(name="encoder").state_key == "IterativeMagnitude{'name': 'encoder'}"


def test_a_resume_with_changed_arguments_names_the_saved_and_the_new_values() -> None:
    saved = AutoPruneCallback(reg=1.0, ste_slope=0.5).state_dict()
    with pytest.warns(UserWarning, match=r"changed arguments: the checkpoint's reg=1\.0, now reg=2\.0; the checkpoint's auxiliary"):
        AutoPruneCallback(reg=2.0, ste_slope=0.5).load_state_dict(saved)


def test_a_gate_phase_not_yet_finished_takes_changed_arguments_without_a_warning() -> None:
    saved = GatePruningFromScratch(flops_ratio=0.5).state_dict()
    resumed = GatePruningFromScratch(flops_ratio=0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed.load_state_dict(saved)  # no structure chosen yet: the new arguments decide it
    assert not resumed.pruned
