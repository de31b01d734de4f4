"""The documentation site builds with warnings as errors, documents every public name, and the README
stays a short landing page that holds the two set-up commands verbatim."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import lightning_prune

ROOT = Path(__file__).resolve().parents[1]


def test_site_builds_with_warnings_as_errors(tmp_path) -> None:
    """``mkdocs build --strict``: a broken link, a missing page or a docstring mkdocstrings cannot render fails."""
    site = tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"), "--site-dir", str(site)],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert build.returncode == 0, build.stdout + build.stderr
    api = (site / "api" / "index.html").read_text()
    for name in lightning_prune.__all__:
        assert f'id="lightning_prune.{name}"' in api, f"{name} is not rendered on the API page"


def test_api_page_documents_exactly_the_public_names() -> None:
    documented = re.findall(r"^::: lightning_prune\.(\w+)$", (ROOT / "docs" / "api.md").read_text(), flags=re.M)
    assert sorted(documented) == sorted(lightning_prune.__all__)
