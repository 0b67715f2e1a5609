"""Argument checks shared by the library's modules."""

from __future__ import annotations


def is_whole_number(value: object, minimum: int) -> bool:
    """True for an ``int`` >= ``minimum``. ``bool`` is refused although it is an ``int``:
    ``total_steps=True`` is a mistake, not one step."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum
