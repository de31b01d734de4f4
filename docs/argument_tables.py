"""The argument tables of the callback guides (``docs/callbacks/*.md``), from the callbacks' signatures and docstrings.

    python docs/argument_tables.py IterativeMagnitude   # print one table
    python docs/argument_tables.py --write              # rewrite the table in every callback's page

``tests/test_docs.py`` fails when a page's table differs from this output, so the tables stay current.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

from docstring_parser import parse

from lightning_prune import AutoPruneCallback, GatePruningFromScratch, IterativeMagnitude

PAGES = {
    IterativeMagnitude: "callbacks/iterative_magnitude.md",
    GatePruningFromScratch: "callbacks/gate_pruning.md",
    AutoPruneCallback: "callbacks/autoprune.md",
}


def _cell(text: str) -> str:
    """One table cell: one line, reStructuredText ``code`` as markdown `code`, pipes escaped."""
    return " ".join(text.split()).replace("``", "`").replace("|", "\\|")


def argument_table(callback: type) -> str:
    """The markdown table of ``callback``'s constructor arguments: name, type hint, default, meaning."""
    meanings = {param.arg_name: param.description or "" for param in parse(callback.__doc__ or "").params}
    rows = ["| argument | type | default | meaning |", "| --- | --- | --- | --- |"]
    for name, parameter in inspect.signature(callback.__init__).parameters.items():
        if name == "self":
            continue
        annotation = parameter.annotation if isinstance(parameter.annotation, str) else inspect.formatannotation(parameter.annotation)
        rows.append(f"| `{name}` | `{_cell(annotation)}` | `{parameter.default!r}` | {_cell(meanings.get(name, ''))} |")
    return "\n".join(rows)


def write_tables() -> None:
    """Replace the argument table (the first table headed ``| argument |``) of every callback's page."""
    docs = Path(__file__).resolve().parent
    for callback, page in PAGES.items():
        lines = (docs / page).read_text().split("\n")
        start = next(i for i, line in enumerate(lines) if line.startswith("| argument | type | default | meaning |"))
        end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
        lines[start:end] = argument_table(callback).split("\n")
        (docs / page).write_text("\n".join(lines))


if __name__ == "__main__":
    names = {callback.__name__: callback for callback in PAGES}
    if sys.argv[1:] == ["--write"]:
        write_tables()
    for name in [] if sys.argv[1:] == ["--write"] else sys.argv[1:] or names:
        print(argument_table(names[name]), end="\n\n")
