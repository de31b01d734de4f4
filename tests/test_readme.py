"""The README's argument tables are the callbacks' own signatures and docstrings."""

import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_argument_tables_match_the_code() -> None:
    tables = runpy.run_path(str(ROOT / "docs" / "argument_tables.py"))["argument_tables"]()
    assert tables in (ROOT / "README.md").read_text(), "README's argument tables are stale: run python docs/argument_tables.py"
