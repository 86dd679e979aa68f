"""The checks of numeric and string options, shared by the losses, heads and miners.

Keras-free, so that any stage (the miners, which the loss base imports, included) can use
them. `deepmetric.losses.base` re-exports every name here.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["NON_NEGATIVE", "POSITIVE", "Bounds", "check_choice", "check_number"]


class Bounds(NamedTuple):
    """The documented range of a numeric option: `minimum` / `maximum` (None: unbounded),
    each inclusive unless `exclusive_minimum` / `exclusive_maximum`; `text`, when given,
    replaces the generated description (for example "in [0, pi/2)")."""

    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    exclusive_maximum: bool = False
    text: str | None = None

    def __contains__(self, value) -> bool:
        low, high = self.minimum, self.maximum
        if low is not None and (value <= low if self.exclusive_minimum else value < low):
            return False
        return high is None or (value < high if self.exclusive_maximum else value <= high)

    def __str__(self) -> str:
        if self.text is not None:
            return self.text
        low, high = self.minimum, self.maximum
        if low is not None and high is not None:
            left = "(" if self.exclusive_minimum else "["
            right = ")" if self.exclusive_maximum else "]"
            return f"in {left}{low:g}, {high:g}{right}"
        if low is not None:
            return f"{'>' if self.exclusive_minimum else '>='} {low:g}"
        if high is not None:
            return f"{'<' if self.exclusive_maximum else '<='} {high:g}"
        return ""


# The ranges most options have.
POSITIVE = Bounds(0.0, exclusive_minimum=True)
NON_NEGATIVE = Bounds(0.0)


def check_number(name, value, bounds=None, *, positive=False):
    """`value` as a float, or a TypeError / ValueError naming the argument and its range.

    The value must be finite and inside `bounds` (a `Bounds`; `positive=True` is
    `bounds=POSITIVE`). The error states the range:

    >>> check_number("margin", -1.0, NON_NEGATIVE)
    Traceback (most recent call last):
    ...
    ValueError: `margin` must be a finite number >= 0. Received: margin=-1.0
    """
    if positive:
        bounds = POSITIVE
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a number. Received: {name}={value!r}")
    number = float(value)
    finite = number == number and number not in (float("inf"), float("-inf"))
    if not finite or (bounds is not None and number not in bounds):
        allowed = f" {bounds}" if bounds is not None and str(bounds) else ""
        raise ValueError(f"`{name}` must be a finite number{allowed}. Received: {name}={value!r}")
    return number


def check_choice(name, value, allowed):
    """`value` if it is one of the strings `allowed`, else a ValueError listing them."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(
            f"`{name}` must be one of {', '.join(repr(a) for a in allowed)}. "
            f"Received: {name}={value!r}"
        )
    return value
