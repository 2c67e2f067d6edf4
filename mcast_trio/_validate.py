"""Argument validation: the one owner of "is this argument acceptable?".

Every public function checks its arguments before it opens anything, with
these helpers, so that every mistake of the same kind raises the same
exception type with the same shape of message, naming the argument, the
value and what is allowed:

* the wrong *type* (a string where an integer belongs): :class:`TypeError`,
  ``"batch_size='x' must be an integer (a str is not an integer); allowed:
  1..1024"``;
* the right type but an unacceptable *value*: :class:`ValueError`,
  ``"batch_size=0 is out of range; allowed: 1..1024"`` or ``"framing='x'
  is not one of 'raw', 'native', 'mcl'"``;
* an unknown keyword: :class:`TypeError` naming the public function, as
  Python itself does, plus the keywords it takes.

``bool`` is never accepted as a number: ``True`` is an ``int`` to Python,
but ``batch_size=True`` is a mistake, of type to the user and of value to
Python, so it raises :class:`BoolArgumentError`, which is both a
:class:`TypeError` and a :class:`ValueError` (as numpy's ``AxisError`` is
both a ``ValueError`` and an ``IndexError``): ``except`` either catches it.
numpy integers are integers.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable
from typing import Any

__all__ = [
    "BoolArgumentError",
    "check_int",
    "check_number",
    "check_bool",
    "check_choice",
    "check_keywords",
]


class BoolArgumentError(TypeError, ValueError):
    """A bool where a number belongs (see the module docstring)."""


def _range_text(low: float | None, high: float | None, unit: str = "") -> str:
    if low is not None and high is not None:
        return f"{low}..{high}{unit}"
    if low is not None:
        return f">= {low}{unit}"
    if high is not None:
        return f"<= {high}{unit}"
    return "any"


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None, *,
              allowed: str | None = None) -> int:
    """Return ``value`` as an ``int`` if it is an integer in ``low..high``
    (either bound may be None: unbounded).

    Raises:
        TypeError: not an integer.
        BoolArgumentError: a bool.
        ValueError: out of range.
    """
    if type(value) is int and (low is None or value >= low) and (high is None or value <= high):
        return value  # the common case, without building a message
    text = allowed or _range_text(low, high)
    if isinstance(value, bool):
        raise BoolArgumentError(f"{name}={value!r} must be an integer (a bool is not an integer here);"
                                f" allowed: {text}")
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name}={value!r} must be an integer (a {type(value).__name__} is not an integer);"
                        f" allowed: {text}") from None
    if (low is not None and number < low) or (high is not None and number > high):
        raise ValueError(f"{name}={value!r} is out of range; allowed: {text}")
    return number


def check_number(name: str, value: Any, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False, allowed: str | None = None) -> float:
    """Return ``value`` as a finite ``float`` in ``low..high`` (``low_open``:
    strictly greater than ``low``).

    Raises:
        TypeError: not a real number.
        BoolArgumentError: a bool.
        ValueError: NaN, infinite or out of range.
    """
    number = None
    if not isinstance(value, (bool, str, bytes)) and hasattr(value, "__float__"):
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = None
    if (number is not None and math.isfinite(number)
            and (low is None or (number > low if low_open else number >= low))
            and (high is None or number <= high)):
        return number  # the common case, without building a message
    if allowed is None:
        if low_open and low is not None:
            allowed = f"finite and > {low}" + (f" and <= {high}" if high is not None else "")
        else:
            allowed = _range_text(low, high)
    if isinstance(value, bool):
        raise BoolArgumentError(f"{name}={value!r} must be a number (a bool is not a number here);"
                                f" allowed: {allowed}")
    if number is None:
        raise TypeError(f"{name}={value!r} must be a number (a {type(value).__name__} is not a number);"
                        f" allowed: {allowed}")
    raise ValueError(f"{name}={value!r} is out of range; allowed: {allowed}")


def check_bool(name: str, value: Any) -> bool:
    """Return ``value`` if it is ``True`` or ``False``.

    Raises:
        TypeError: anything else (``1`` included).
    """
    if not isinstance(value, bool):
        raise TypeError(f"{name}={value!r} must be a bool; allowed: True or False")
    return value


def check_choice(name: str, value: Any, choices: Iterable[Any], *, what: str | None = None) -> Any:
    """Return ``value`` if it is one of ``choices``.

    Raises:
        ValueError: it is not (the message lists the choices).
    """
    choices = tuple(choices)
    try:
        ok = value in choices
    except TypeError:  # unhashable, for a mapping of choices
        ok = False
    if not ok:
        kind = f" is not {what};" if what else " is not one of the allowed values;"
        raise ValueError(f"{name}={value!r}{kind} allowed: {', '.join(map(repr, choices))}")
    return value


def check_keywords(function: str, given: Iterable[str], accepted: Iterable[str]) -> None:
    """Refuse keywords ``function`` does not take, as Python does, naming the
    public function (not the private helper the keywords were passed on to).

    Raises:
        TypeError: ``given`` holds a name not in ``accepted``.
    """
    accepted = set(accepted)
    unknown = [name for name in given if name not in accepted]
    if unknown:
        names = ", ".join(repr(n) for n in unknown)
        plural = "s" if len(unknown) > 1 else ""
        raise TypeError(f"{function}() got unexpected keyword argument{plural} {names}; "
                        f"allowed: {', '.join(sorted(accepted))}")
