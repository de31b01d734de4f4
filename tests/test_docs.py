"""The documentation: the site builds with warnings as errors and documents every public name; the callback
guides' argument tables are the callbacks' signatures; the README stays a short landing page that holds the two
set-up commands verbatim."""

from __future__ import annotations

import inspect
import json
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

import lightning_prune

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
COMMANDS = (
    "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -c constraints.txt -e . "
    "&& lightning-prune fit --config examples/configs/digits_magnitude.yaml",
    "python3 -m venv .venv-test && . .venv-test/bin/activate && pip install torch==2.13.0 && pip install -c constraints.txt "
    '-e ".[test]" && python -m pytest -q -n auto --dist loadfile',
)
TABLES = runpy.run_path(str(ROOT / "docs" / "argument_tables.py"))


def test_site_builds_with_warnings_as_errors(tmp_path) -> None:
    """``mkdocs build --strict``: a broken link or anchor, a page outside the nav, or a docstring mkdocstrings
    cannot render fails; every public name is rendered and every benchmark figure is served."""
    site = tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"), "--site-dir", str(site)],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert build.returncode == 0, build.stdout + build.stderr
    api = (site / "api" / "index.html").read_text()
    for name in lightning_prune.__all__:
        assert f'id="lightning_prune.{name}"' in api, f"{name} is not rendered on the API page"
    results = json.loads((ROOT / "benchmarks" / "results" / "results.json").read_text())
    for figure in (name for section in results["sections"] for name in section["figures"]):
        assert (site / "benchmarks" / "results" / figure).is_file(), figure


def test_api_page_documents_exactly_the_public_names() -> None:
    documented = re.findall(r"^::: lightning_prune\.(\w+)$", (ROOT / "docs" / "api.md").read_text(), flags=re.M)
    assert sorted(documented) == sorted(lightning_prune.__all__)


@pytest.mark.parametrize("callback", list(TABLES["PAGES"]), ids=lambda callback: callback.__name__)
def test_callback_guide_argument_table_matches_the_code(callback: type) -> None:
    page = (ROOT / "docs" / TABLES["PAGES"][callback]).read_text()
    assert TABLES["argument_table"](callback) in page, (
        f"{TABLES['PAGES'][callback]}'s argument table is stale: run python docs/argument_tables.py --write"
    )


def test_readme_is_a_short_landing_page_with_the_two_commands_verbatim() -> None:
    assert len(README.encode()) <= 15_000, f"README.md is {len(README.encode()):,} bytes; the limit is 15,000"
    for command in COMMANDS:
        assert f"```bash\n{command}\n```" in README, f"README lacks the command block: {command}"


def test_readme_callback_table_names_real_arguments() -> None:
    """Every argument the README's callback table names exists in that callback's signature."""
    rows = {callback.__name__: callback for callback in TABLES["PAGES"]}
    seen = set()
    for line in README.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        name = re.fullmatch(r"\[?`(\w+)`\]?(\(.*\))?", cells[0]) if len(cells) >= 3 else None
        if name and name.group(1) in rows:
            callback = rows[name.group(1)]
            arguments = set(re.findall(r"`(\w+)=", cells[2]))
            assert arguments and arguments <= set(inspect.signature(callback).parameters), (callback.__name__, arguments)
            seen.add(callback.__name__)
    assert seen == set(rows), f"the README's callback table lacks {set(rows) - seen}"


def _docstring_example(callback: type) -> str:
    """The code under ``Example::`` in ``callback``'s class docstring."""
    doc = inspect.cleandoc(callback.__doc__ or "") + "\n"
    found = re.search(r"^Example::\n\n((?:    .*\n|\n)+?)\n(?=\S)", doc, flags=re.M)
    assert found, f"{callback.__name__}'s docstring has no Example:: block"
    return inspect.cleandoc(found.group(1))


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("callback", list(TABLES["PAGES"]), ids=lambda callback: callback.__name__)
def test_callback_docstring_example_runs_and_prunes(callback: type, tmp_path, monkeypatch) -> None:
    """Each callback's ``Example::`` runs as written and does what its comment says; the docstring has ``Raises:``."""
    import torch
    from torch.nn.utils import parametrize

    from lightning_prune import ImageClassifier, count_flops, sparsity_report

    assert "\nRaises:\n" in inspect.cleandoc(callback.__doc__ or "")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(_docstring_example(callback), namespace)
    model = namespace["trainer"].lightning_module
    if callback is lightning_prune.IterativeMagnitude:
        assert sparsity_report(model).sparsity == pytest.approx(0.9, abs=1e-4)
    elif callback is lightning_prune.GatePruningFromScratch:
        x = torch.zeros(1, 1, 8, 8)
        assert count_flops(model, x).total <= 0.5 * count_flops(ImageClassifier("vgg_small"), x).total
    else:
        assert not any(parametrize.is_parametrized(module) for module in model.modules())  # masks made permanent
        assert 0 < sparsity_report(model).sparsity < 1
