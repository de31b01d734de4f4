"""Allowed values of a string option, read from its ``Literal`` type: the type is the single source, so a
signature that LightningCLI reads and the check that raises can never disagree."""

from __future__ import annotations

from typing import Any, get_args


def choices(literal: Any) -> tuple[str, ...]:
    """The values of a ``Literal[...]`` type, in order: ``choices(Literal["a", "b"]) == ("a", "b")``."""
    values = get_args(literal)
    if not values:
        raise TypeError(f"{literal!r} is not a Literal type with values.")
    return values


def check_choice(name: str, value: Any, literal: Any) -> None:
    """``value`` must be one of the ``Literal``'s values; the ``ValueError`` names the argument, the value and
    what is allowed."""
    allowed = choices(literal)
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {allowed}, got {value!r}.")
