"""Keyword-argument checks shared by detectors, policy, monitor, service and its client."""

from __future__ import annotations

import math
import re

from spikewatch.errors import bad_value

#: Run ids appear in URLs, metric labels and Slack: keep them plain. This is the
#: pattern as JSON Schema (OpenAPI) reads it: ``$`` is the end of the text.
RUN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}$"
RUN_ID_RULE = "1-128 of A-Z a-z 0-9 . _ : @ + - (starting with a letter or digit)"
# Python's "$" also matches before a final newline: match the whole text instead.
_RUN_ID = re.compile(RUN_ID_PATTERN[1:-1])


def is_run_id(run: object) -> bool:
    """Whether ``run`` is a run id the service takes (no trailing newline either).

    Example:
        >>> is_run_id("gpt-1b"), is_run_id("gpt 1b"), is_run_id("nl\\n"), is_run_id("exp/1")
        (True, False, False, False)
    """
    return isinstance(run, str) and _RUN_ID.fullmatch(run) is not None


def check_run_id(field: str, run: object) -> str:
    """Return ``run`` if it is a valid run id, else raise `ConfigError` saying the rule.

    Example:
        >>> check_run_id("run_id", "runé")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        spikewatch.errors.ConfigError: run_id='runé' is invalid: use 1-128 of A-Z a-z 0-9 ...
    """
    if not is_run_id(run):
        raise bad_value(field, run, f"use {RUN_ID_RULE}")
    return run  # type: ignore[return-value]


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
