"""Argument checks shared by the library's modules."""

from __future__ import annotations

import math
import numbers


def is_whole_number(value: object, minimum: int) -> bool:
    """True for an integer (``int``, a NumPy integer) >= ``minimum``. ``bool`` is refused although
    it is an ``int``: ``total_steps=True`` is a mistake, not one step."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and bool(value >= minimum)


def is_whole_value(value: object, minimum: int) -> bool:
    """:func:`is_whole_number`, or a float with a whole value (``interval=2.0``, ``num_classes=10.0``)."""
    if isinstance(value, float):
        return value.is_integer() and value >= minimum
    return is_whole_number(value, minimum)


def is_positive_number(value: object) -> bool:
    """True for a finite ``int`` or ``float`` > 0, not a bool (a rate, a norm, a scale)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and value > 0)
