"""Shared argument validators.

Each check raises an error whose message starts with the argument's name and says what
was expected, e.g. ``top_k: expected an int in [1, 8], got 9``, and returns the value as a
plain ``int`` / ``float`` (so numpy scalars that pass can be stored or serialised as is).
``bool`` is never accepted as a number.
"""

from __future__ import annotations

import math
import numbers
import os

import torch


def _bounds(low: float | None, low_inclusive: bool, high: float | None,
            high_inclusive: bool) -> str:
    """`` in [low, high)``, `` >= low``, `` <= high``, ... or ``""`` without bounds."""
    if low is not None and high is not None:
        return (f" in {'[' if low_inclusive else '('}{low}, {high}"
                f"{']' if high_inclusive else ')'}")
    if low is not None:
        return f" {'>=' if low_inclusive else '>'} {low}"
    if high is not None:
        return f" {'<=' if high_inclusive else '<'} {high}"
    return ""


def check_int(name: str, value: object, low: int | None = None, high: int | None = None, *,
              error: type[Exception] = ValueError) -> int:
    """``int(value)`` if ``value`` is an integer (``numbers.Integral``, not a bool) in
    ``[low, high]`` (either bound may be None); otherwise raises ``error`` (ValueError by
    default) with ``"{name}: expected an int ..., got {value!r}"``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) \
            or (low is not None and value < low) or (high is not None and value > high):
        raise error(f"{name}: expected an int{_bounds(low, True, high, True)}, got {value!r}")
    return int(value)


def check_path_like(name: str, value: object, what: str = "a folder path") -> None:
    """TypeError ``"{name}: expected {what} (str or Path), got {type}"`` unless ``value``
    is a ``str`` or an ``os.PathLike`` (``Path(None)`` names no argument)."""
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name}: expected {what} (str or Path), got {type(value).__name__}")


def check_bool(name: str, value: object) -> bool:
    """``value`` if it is a ``bool``; otherwise TypeError ``"{name}: expected a bool, got
    {value!r}"`` (a string such as ``"no"`` would read as True)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {value!r}")
    return value


def check_flag(name: str, value: object) -> bool:
    """``bool(value)`` for a ``bool`` or the integers 0 / 1, also as a one-value tensor or
    numpy value (:func:`as_scalar`: flags callers pass as numbers); otherwise TypeError
    ``"{name}: expected a bool, got {value!r}"`` (a string such as ``"no"`` would read as
    True)."""
    number = as_scalar(value)
    if isinstance(number, bool) or (isinstance(number, numbers.Integral) and number in (0, 1)):
        return bool(number)
    raise TypeError(f"{name}: expected a bool, got {value!r}")


def as_scalar(value: object) -> object:
    """A one-value bool / integer / float tensor or numpy array / number as its Python
    number (else ``value`` unchanged): what a ``datasets`` row in torch / numpy format or a
    Trainer state may hold."""
    if isinstance(value, torch.Tensor):
        numeric = not (value.is_complex() or value.is_meta)
        return value.item() if numeric and value.numel() == 1 else value
    kind = getattr(getattr(value, "dtype", None), "kind", None)  # numpy
    if kind is not None and kind in "biuf" and getattr(value, "size", None) == 1:
        return value.item()
    return value


def as_whole(value: object) -> object:
    """A float holding a whole number as its int (an id or a step read through a float
    array or JSON), else ``value`` unchanged."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def check_number(name: str, value: object, *, low: float | None = None,
                 low_inclusive: bool = True, high: float | None = None,
                 high_inclusive: bool = True) -> float:
    """``float(value)`` if ``value`` is a finite real number (``numbers.Real``, not a bool)
    within the bounds (each optional, inclusive unless told otherwise); otherwise raises
    ValueError with ``"{name}: expected a finite number ..., got {value!r}"``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not math.isfinite(value) \
            or (low is not None and not (value >= low if low_inclusive else value > low)) \
            or (high is not None and not (value <= high if high_inclusive else value < high)):
        raise ValueError(f"{name}: expected a finite number"
                         f"{_bounds(low, low_inclusive, high, high_inclusive)}, got {value!r}")
    return float(value)


def check_finite(name: str, value: object) -> float:
    """``float(value)`` if ``value`` is a finite real number (not a bool); otherwise
    ValueError ``"{name}: expected a finite number, got {value!r}"``."""
    return check_number(name, value)


def check_fractions(name: str, values: object, count: int = 3) -> list[float]:
    """``values`` as a list of ``count`` finite non-negative floats summing to 1 (within
    1e-6); otherwise ValueError ``"{name}: expected {count} non-negative fractions summing
    to 1, got ..."`` (NaN, inf, strings, a bare number and None included)."""
    ok = isinstance(values, (list, tuple)) and len(values) == count and all(
        not isinstance(f, bool) and isinstance(f, numbers.Real) and math.isfinite(f) and f >= 0
        for f in values) and abs(sum(values) - 1.0) <= 1e-6
    if not ok:
        raise ValueError(f"{name}: expected {count} non-negative fractions summing to 1, "
                         f"got {values!r}")
    return [float(f) for f in values]


_ENV_TRUE = ("1", "true", "yes", "on")
_ENV_FALSE = ("0", "false", "no", "off")


def env_flag(name: str, default: bool) -> bool:
    """The boolean environment variable ``name``: ``default`` when unset or empty, else
    1 / true / yes / on or 0 / false / no / off (any case, surrounding spaces ignored);
    anything else raises ValueError ``"{name}: expected ..., got '...'"``."""
    raw = os.environ.get(name, "")
    value = raw.strip().lower()
    if not value:
        return default
    if value in _ENV_TRUE or value in _ENV_FALSE:
        return value in _ENV_TRUE
    raise ValueError(f"{name}: expected one of {'/'.join(_ENV_TRUE)} or "
                     f"{'/'.join(_ENV_FALSE)} (any case), got {raw!r}")
