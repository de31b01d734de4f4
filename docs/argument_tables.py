"""The argument tables of the callback guides (``docs/callbacks/*.md``), from the callbacks' signatures and docstrings.

    python docs/argument_tables.py IterativeMagnitude   # print one table; paste it over the table in its page

``tests/test_docs.py`` fails when a page's table differs from this output, so the tables stay current.
"""

from __future__ import annotations

import inspect
import sys

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


if __name__ == "__main__":
    names = {callback.__name__: callback for callback in PAGES}
    for name in sys.argv[1:] or names:
        print(argument_table(names[name]), end="\n\n")
