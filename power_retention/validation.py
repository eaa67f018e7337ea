"""Argument checks shared by the op, the layer, the models and the trainer, so that a bad
argument gets the same message wherever it is passed."""

from __future__ import annotations

import numbers

import mlx.core as mx
import numpy as np

METHODS = ("auto", "attention", "chunked", "recurrent")


def is_integer(value) -> bool:
    """True for Python and NumPy integers; False for bools, which are ints to Python but never
    a count or a size here."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_integer(name: str, value, *, minimum: int = 1, allow_none: bool = False,
                  meaning: str = "") -> int | None:
    """``value`` as an int, or ValueError naming ``name`` unless it is an integer >= ``minimum``
    (or None when allowed); ``meaning`` is added to the message, e.g. "0: off"."""
    if value is None and allow_none:
        return None
    if not is_integer(value) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}{' or None' if allow_none else ''}"
                         f"{f' ({meaning})' if meaning else ''}, got {value!r}")
    return int(value)


def check_degree(deg) -> int:
    """Return ``deg`` as an int, or raise ValueError unless it is an integer >= 1."""
    if not is_integer(deg):
        raise ValueError(f"deg must be an integer >= 1, got {deg!r} ({type(deg).__name__})")
    if deg < 1:
        raise ValueError(f"deg must be an integer >= 1, got {deg}")
    return int(deg)


def check_normalize(deg: int, normalize) -> bool:
    """``normalize`` as a bool: None means the degree's default (normalized for even degrees).
    The normalized form needs an even degree: odd powers give negative weights, and their sum
    can vanish."""
    if normalize is None:
        return deg % 2 == 0
    if not isinstance(normalize, (bool, np.bool_)):
        raise ValueError(f"normalize must be True, False or None (the degree's default), "
                         f"got {normalize!r}")
    if normalize and deg % 2:
        raise ValueError(f"normalize=True needs an even deg (odd powers give negative weights and "
                         f"the denominator can vanish); got deg={deg}: use normalize=False")
    return bool(normalize)


def check_method(method) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}; got {method!r}")
    return method


def check_reset(reset, shape: tuple) -> None:
    """``reset``, the document starts a mixer takes: None, or a bool array of shape (B, T)."""
    if reset is None:
        return
    if not isinstance(reset, mx.array) or reset.dtype != mx.bool_ or tuple(reset.shape) != tuple(shape):
        got = (f"{reset.dtype} of shape {tuple(reset.shape)}" if isinstance(reset, mx.array)
               else type(reset).__name__)
        raise ValueError(f"reset must be a bool mlx array of shape (B, T) = {tuple(shape)} "
                         f"(True where a document starts), got {got}")
