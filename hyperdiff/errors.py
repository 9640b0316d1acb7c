"""User-facing errors.

Contract: every problem caused by user input (a path, a file, a number, a model id) raises
`HyperdiffError` with a one-line message that names the input, says what was wrong and what was
expected, in the style of peft (`"`rank` must be a positive integer, got 0"`). The CLI turns a
`HyperdiffError` into that line on stderr and exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class HyperdiffError(ValueError):
    """Bad input: the message is one line meant for the user."""


def check(condition: bool, message: str) -> None:
    """Raise `HyperdiffError(message)` unless `condition` holds."""
    if not condition:
        raise HyperdiffError(message)


def check_positive_int(name: str, value: object) -> None:
    """`name` must be an int > 0 (bools are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise HyperdiffError(f"`{name}` must be a positive integer, got {value!r}")


def check_int_in(name: str, value: object, lo: int, hi: int) -> int:
    """`name` must be an int in [lo, hi] (bools are not numbers here); returns it."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise HyperdiffError(f"`{name}` must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def check_number_in(name: str, value: object, lo: float, hi: float) -> float:
    """`name` must be an int or float in [lo, hi]; returns it as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise HyperdiffError(f"`{name}` must be a number in [{lo}, {hi}], got {value!r}")
    return float(value)


def check_positive_number(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise HyperdiffError(f"`{name}` must be a positive number, got {value!r}")
