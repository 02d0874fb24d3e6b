"""The checks every boundary shares: integers that fit the int32/uint32 arrays they become, floats that stay
finite in float32, and text that is valid Unicode (JSON can carry a lone surrogate; no tokenizer takes one).

Each raises the given `QoQError` subclass with a message that starts with the field's name and states the range."""

from __future__ import annotations

import numbers
from collections.abc import Iterable

import numpy as np

from qoq_jax.errors import InvalidRequestError

INT32_MAX = 2**31 - 1
UINT32_MAX = 2**32 - 1
FLOAT32_MAX = float(np.finfo(np.float32).max)


def describe_range(low: int, high: int) -> str:
    """[low, high] as a reader expects it; int32/uint32 limits as the half-open [low, 2**k)."""
    if high + 1 >= 2**16 and (high + 1) & high == 0:
        return f"[{low}, 2**{(high + 1).bit_length() - 1})"
    return f"[{low}, {high}]"


def is_integer(value) -> bool:
    """An int or numpy integer; bools are not token ids or counts."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def check_integer(name: str, value, low: int, high: int, error: type[Exception] = InvalidRequestError) -> int:
    if not is_integer(value) or not low <= value <= high:
        raise error(f"{name} must be an integer in {describe_range(low, high)}, got {value!r}")
    return int(value)


def check_integers(
    name: str, values: Iterable, low: int, high: int, error: type[Exception] = InvalidRequestError
) -> tuple[int, ...]:
    values = tuple(values)
    bad = [v for v in values if not is_integer(v) or not low <= v <= high]
    if bad:
        raise error(f"{name} must be integers in {describe_range(low, high)}, got {bad[0]!r}")
    return tuple(int(v) for v in values)


def check_float32(name: str, value, low: float, error: type[Exception] = InvalidRequestError) -> float:
    """A real number ≥ `low` that stays finite as float32 (1e39 would become infinity)."""
    if not is_real(value):
        raise error(f"{name} must be a finite float32 >= {low}, got {value!r}")
    if not (low <= value <= FLOAT32_MAX):  # NaN fails both comparisons
        raise error(f"{name} must be a finite float32 >= {low} (at most {FLOAT32_MAX:.4g}), got {value!r}")
    return float(value)


def unicode_problem(text: str) -> str | None:
    """Why `text` is not valid Unicode, or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return f"not valid Unicode (a lone surrogate at {err.start})"
    return None


def check_text(name: str, text, error: type[Exception] = InvalidRequestError) -> str:
    if not isinstance(text, str):
        raise error(f"{name} must be a string, got {type(text).__name__}")
    problem = unicode_problem(text)
    if problem:
        raise error(f"{name}: {problem}")
    return text
