"""Print the README's "Callback arguments" tables from the callbacks' signatures and docstrings.

    python docs/argument_tables.py > /tmp/tables.md   # then paste over the README's tables

``tests/test_readme.py`` fails when the README's tables differ from this output, so they stay current.
"""

from __future__ import annotations

import inspect

from docstring_parser import parse

from lightning_prune import AutoPruneCallback, GatePruningFromScratch, IterativeMagnitude

CALLBACKS = (IterativeMagnitude, GatePruningFromScratch, AutoPruneCallback)


def _cell(text: str) -> str:
    """One table cell: one line, reStructuredText ``code`` as markdown `code`, pipes escaped."""
    return " ".join(text.split()).replace("``", "`").replace("|", "\\|")


def argument_table(callback: type) -> str:
    """The markdown table of ``callback``'s constructor arguments: name, type hint, default, meaning."""
    meanings = {param.arg_name: param.description or "" for param in parse(callback.__doc__ or "").params}
    rows = [f"#### `{callback.__name__}`", "", "| argument | type | default | meaning |", "| --- | --- | --- | --- |"]
    for name, parameter in inspect.signature(callback.__init__).parameters.items():
        if name == "self":
            continue
        annotation = parameter.annotation if isinstance(parameter.annotation, str) else inspect.formatannotation(parameter.annotation)
        rows.append(f"| `{name}` | `{_cell(annotation)}` | `{parameter.default!r}` | {_cell(meanings.get(name, ''))} |")
    return "\n".join(rows)


def argument_tables() -> str:
    return "\n\n".join(argument_table(callback) for callback in CALLBACKS)


if __name__ == "__main__":
    print(argument_tables())
