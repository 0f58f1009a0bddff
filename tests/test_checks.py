"""The shared argument validators of ``datalora.checks``."""

from __future__ import annotations

import re
from fractions import Fraction

import numpy as np
import pytest

from datalora import layers
from datalora.checks import check_finite, check_fractions, check_int, check_number


@pytest.mark.parametrize("value", [0, 7, -3, 10**20, np.int64(5), np.int32(-1), np.uint8(3)])
def test_check_int_accepts_integers_and_returns_a_plain_int(value):
    out = check_int("n", value)
    assert out == value and type(out) is int


@pytest.mark.parametrize("value", [True, False, np.bool_(True), 1.0, 2.5, "3", None,
                                   np.float64(2.0), [1]])
def test_check_int_rejects_bools_and_non_integers(value):
    with pytest.raises(ValueError, match=rf"^n: expected an int, got {re.escape(repr(value))}$"):
        check_int("n", value)


@pytest.mark.parametrize("low, high, value, expected", [
    (1, None, 0, "an int >= 1"),
    (1, None, True, "an int >= 1"),
    (None, 3, 4, "an int <= 3"),
    (1, 8, 9, r"an int in \[1, 8\]"),
    (1, 8, 0, r"an int in \[1, 8\]"),
    (0, 0, np.int64(1), r"an int in \[0, 0\]"),
])
def test_check_int_bounds_are_inclusive_and_named(low, high, value, expected):
    pattern = rf"^top_k: expected {expected}, got {re.escape(repr(value))}$"
    with pytest.raises(ValueError, match=pattern):
        check_int("top_k", value, low=low, high=high)


def test_check_int_accepts_its_bounds():
    assert check_int("k", 1, low=1, high=8) == 1
    assert check_int("k", np.int64(8), low=1, high=8) == 8
    assert check_int("k", 0, low=0, high=0) == 0
    assert check_int("k", -5, high=-5) == -5


def test_check_int_raises_the_requested_error_type():
    with pytest.raises(TypeError, match=r"^seed: expected an int, got 1\.5$"):
        check_int("seed", 1.5, error=TypeError)
    with pytest.raises(TypeError, match="seed"):
        check_int("seed", True, error=TypeError)


@pytest.mark.parametrize("value", [0, 1, -2.5, 1e300, np.float32(0.5), np.float64(3.0),
                                   np.int64(4), Fraction(1, 3)])
def test_check_number_accepts_finite_reals_and_returns_a_float(value):
    out = check_number("x", value)
    assert out == float(value) and type(out) is float
    assert check_finite("x", value) == out


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), np.float32("nan"),
                                   True, np.bool_(False), "0.5", None, 1j, [0.5]])
def test_check_number_rejects_non_finite_bools_and_non_numbers(value):
    pattern = rf"^lr: expected a finite number, got {re.escape(repr(value))}$"
    with pytest.raises(ValueError, match=pattern):
        check_number("lr", value)
    with pytest.raises(ValueError, match=pattern):
        check_finite("lr", value)


def test_check_number_bounds():
    exclusive = dict(low=0, low_inclusive=False, high=1, high_inclusive=False)
    assert check_number("d", 0.5, **exclusive) == 0.5
    for value in (0, 0.0, 1, 1.0, -0.1, 2):
        with pytest.raises(ValueError, match=rf"^d: expected a finite number in \(0, 1\), "
                                             rf"got {value!r}$"):
            check_number("d", value, **exclusive)
    assert check_number("f", 1, low=0, low_inclusive=False, high=1) == 1.0  # (0, 1]
    with pytest.raises(ValueError, match=r"^f: expected a finite number in \(0, 1\], got 0$"):
        check_number("f", 0, low=0, low_inclusive=False, high=1)
    assert check_number("g", 0, low=0, high=1) == 0.0  # [0, 1]
    with pytest.raises(ValueError, match=r"^tau: expected a finite number > 0, got 0\.0$"):
        check_number("tau", 0.0, low=0, low_inclusive=False)
    with pytest.raises(ValueError, match=r"^tau: expected a finite number > 0, got inf$"):
        check_number("tau", float("inf"), low=0, low_inclusive=False)
    assert check_number("w", 0, low=0) == 0.0
    with pytest.raises(ValueError, match=r"^w: expected a finite number >= 0, got -1$"):
        check_number("w", -1, low=0)
    with pytest.raises(ValueError, match=r"^p: expected a finite number < 1, got 1$"):
        check_number("p", 1, high=1, high_inclusive=False)
    with pytest.raises(ValueError, match=r"^p: expected a finite number <= 1, got 1\.5$"):
        check_number("p", 1.5, high=1)


def test_check_fractions_allows_rounding_only():
    assert check_fractions("split", (0.1, 0.2, 0.7)) == [0.1, 0.2, 0.7]  # sums to 1 - 1e-16
    for off in ([0.3, 0.3, 0.41], [0.25, 0.25, 0.499]):  # sums 1.01, 0.999
        with pytest.raises(ValueError, match="split: expected 3 non-negative fractions"):
            check_fractions("split", off)


def test_layers_reexports_check_finite():
    assert layers.check_finite is check_finite
    with pytest.raises(ValueError, match="alpha: expected a finite number"):
        layers.check_alpha(float("nan"))
