"""The built-in demo lives in ``lightning_prune.demo``: ``import lightning_prune`` does not load it (nor
scikit-learn or matplotlib through it), and the top-level names still resolve, also as YAML ``class_path``."""

from __future__ import annotations

import subprocess
import sys

import pytest
from jsonargparse._util import import_object

import lightning_prune
from lightning_prune import demo


@pytest.mark.slow
def test_import_lightning_prune_loads_neither_the_demo_nor_sklearn_nor_plots() -> None:
    code = (
        "import sys, lightning_prune; "
        "print(sorted(m for m in ('lightning_prune.demo', 'lightning_prune.plots', 'sklearn') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("name", ["ImageClassifier", "DigitsDataModule", "build_network"])
def test_top_level_demo_names_resolve_lazily_and_as_class_paths(name) -> None:
    assert name in lightning_prune.__all__ and name in dir(lightning_prune)
    assert getattr(lightning_prune, name) is getattr(demo, name)
    assert import_object(f"lightning_prune.{name}") is getattr(demo, name)  # how LightningCLI reads class_path


def test_unknown_top_level_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'ImageClassifer'"):
        lightning_prune.ImageClassifer  # noqa: B018
