"""The one summary renderer and the choices read from the Literal types."""

from __future__ import annotations

from typing import Literal

import pytest

from lightning_prune.choices import check_choice, choices
from lightning_prune.report import LayerSparsity, SparsityReport, pruning_summary


def test_every_section_of_the_summary_in_one_table_format() -> None:
    report = SparsityReport([LayerSparsity("a", 100, 25), LayerSparsity("conv.long", 1000, 500)])
    text = pruning_summary(
        "Title", report, channels=[("conv.long", 16, 4)], parameters=(2000, 600), flops=(10_000, 2_500),
        monitor="val/acc", scores=(0.9, None), facts=["budget training: max_epochs -> 4"], notes=["schedule incomplete"],
    )
    assert text.splitlines() == [
        "Title",
        "layer      weights  non-zero  sparsity",
        "a              100        25    75.00%",
        "conv.long    1,000       500    50.00%",
        "total        1,100       525    52.27%",
        "compression (total / non-zero): 2.10x",
        "layer      channels  kept  ratio",
        "conv.long        16     4   0.25",
        "parameters: 2,000 -> 600 non-zero (30.00%)",
        "MACs per sample (fvcore): 10,000 -> 2,500 (25.00%)",
        "val/acc: dense 0.9000 -> pruned n/a",
        "budget training: max_epochs -> 4",
        "WARNING: schedule incomplete",
    ]
    assert pruning_summary("Only the title") == "Only the title"
    assert pruning_summary("Element", flops=(10_000, 10_000), sparse_flops=2_500).splitlines()[1:] == [
        "MACs per sample (fvcore): 10,000 -> 10,000 (100.00%)",
        "MACs per sample a sparse kernel would run (zero weights skipped): 10,000 -> 2,500 (25.00%)",
    ]
    assert pruning_summary("Masked", flops=(10_000, 2_500), flops_of="once removed").splitlines()[1] == (
        "MACs per sample (fvcore, once removed): 10,000 -> 2,500 (25.00%)")


def test_choices_come_from_the_literal_and_the_check_names_argument_value_and_choices() -> None:
    Kind = Literal["one", "two"]
    assert choices(Kind) == ("one", "two")
    check_choice("kind", "two", Kind)
    with pytest.raises(ValueError, match=r"`kind` must be one of \('one', 'two'\), got 'three'"):
        check_choice("kind", "three", Kind)
    with pytest.raises(TypeError):
        choices(str)
