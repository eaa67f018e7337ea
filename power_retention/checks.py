"""The argument check every module shares."""

from __future__ import annotations

import numbers


def is_integer(value) -> bool:
    """True for Python and NumPy integers; False for bools, which are ints to Python but never
    a count or a size here."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
