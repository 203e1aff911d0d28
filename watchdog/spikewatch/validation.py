"""Keyword-argument checks shared by detectors, policy and monitor."""

from __future__ import annotations

import math

from spikewatch.errors import bad_value


def check_int(field: str, value: object, minimum: int) -> int:
    """Return ``value`` if it is an ``int`` >= ``minimum``, else raise `ConfigError`.

    Example:
        >>> check_int("window", 50, minimum=3)
        50
        >>> check_int("window", 2, minimum=3)
        Traceback (most recent call last):
        ...
        spikewatch.errors.ConfigError: window=2 is invalid: use an integer >= 3
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise bad_value(field, value, f"use an integer >= {minimum}")
    return value


def check_float(field: str, value: object, minimum: float, *, inclusive: bool = True) -> float:
    """Return ``value`` as a finite float >= (or >) ``minimum``, else raise `ConfigError`.

    Example:
        >>> check_float("threshold", 8, minimum=0, inclusive=False)
        8.0
    """
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    number = float(value) if ok else math.nan  # type: ignore[arg-type]
    above = number >= minimum if inclusive else number > minimum
    if not (ok and math.isfinite(number) and above):
        relation = ">=" if inclusive else ">"
        raise bad_value(field, value, f"use a finite number {relation} {minimum}")
    return number
