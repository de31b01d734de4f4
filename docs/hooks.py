"""MkDocs hook: serve the benchmark figures (``benchmarks/results/*.png``) at ``benchmarks/results/`` in the site,
where the generated ``docs/benchmarks.md`` links them, without a copy under ``docs/``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def on_files(files: Files, config: Any) -> Files:
    for figure in sorted(RESULTS.glob("*.png")):
        files.append(File.generated(config, f"benchmarks/results/{figure.name}", abs_src_path=str(figure)))
    return files
