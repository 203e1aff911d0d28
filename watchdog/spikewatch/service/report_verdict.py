"""A trainer's forensics verdict, checked field by field before the service keeps it.

`Verdict.from_json` builds a verdict but does not check the types of its fields; the
service stores, counts and posts what it is sent, so every field is checked here first
and a bad one is named (the ingest's 422). The limits keep one verdict small: the
trainer's probe looks at a few dozen batches, not thousands.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from spikewatch.forensics.verdict import CAUSES

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
#: Positions and samples one verdict may name (the probe's ``max_suspect`` is 32).
MAX_ITEMS = 10_000
#: Characters of ``why`` and ``action`` (generous: a too-long one costs the trainer its
#: batch), and of the incident id (a run id and more).
MAX_TEXT, MAX_INCIDENT = 10_000, 256
_REQUIRED = ("cause", "incident", "step", "onset_step")


def _integer(value: object) -> bool:
    return type(value) is int and _INT64_MIN <= value <= _INT64_MAX


def _number(value: object) -> bool:
    # NaN and Infinity are losses too (a non-finite loss from the healthy state is data).
    return type(value) is float or (type(value) is int and abs(value) < 2**1023)


def _text(limit: int) -> Callable[[object], bool]:
    return lambda value: type(value) is str and len(value) <= limit


def _positions(value: object) -> bool:
    return type(value) is list and len(value) <= MAX_ITEMS and all(map(_integer, value))


def _sample(value: object) -> bool:
    if type(value) is not dict or "position" not in value or "loss" not in value:
        return False
    index = value.get("index")
    return (
        _integer(value["position"])
        and _number(value["loss"])
        and (index is None or _integer(index))
    )


def _samples(value: object) -> bool:
    return type(value) is list and len(value) <= MAX_ITEMS and all(map(_sample, value))


def _count(value: object) -> bool:
    return type(value) is int and 0 <= value <= _INT64_MAX


def _seconds(value: object) -> bool:
    return _number(value) and not (type(value) is float and math.isnan(value))


def _loss_or_none(value: object) -> bool:
    return value is None or _number(value)


def _cause(value: object) -> bool:
    return type(value) is str and value in CAUSES


CHECKS: dict[str, tuple[Callable[[object], bool], str]] = {
    "cause": (_cause, "one of " + ", ".join(CAUSES)),
    "incident": (_text(MAX_INCIDENT), f"the incident id, a string of at most {MAX_INCIDENT}"),
    "step": (_integer, "a step (an integer)"),
    "onset_step": (_integer, "a step (an integer)"),
    "suspect_positions": (_positions, "a JSON array of data positions (integers)"),
    "outlier_positions": (_positions, "a JSON array of data positions (integers)"),
    "suspect_loss": (_loss_or_none, "a number or null"),
    "reference_loss": (_loss_or_none, "a number or null"),
    "samples": (
        _samples,
        'a JSON array of {"position": integer, "index": integer or null, "loss": number}',
    ),
    "forward_passes": (_count, "an integer >= 0"),
    "seconds": (_seconds, "a number of seconds"),
    "why": (_text(MAX_TEXT), f"a string of at most {MAX_TEXT} characters"),
    "action": (_text(MAX_TEXT), f"a string of at most {MAX_TEXT} characters"),
}
"""Every `Verdict` field and its check (a test keeps the two in step)."""


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def verdict_problem(value: object) -> tuple[str, str] | None:
    """The first bad field of a verdict as ``(".field", message after the path)``, or
    None when every field is as `Verdict.to_json` writes it.

    Example:
        >>> from spikewatch.forensics.verdict import Verdict
        >>> v = Verdict(cause="data", incident="r:1", step=30, onset_step=10).to_json()
        >>> verdict_problem(v) is None
        True
        >>> verdict_problem({**v, "step": "30"})
        ('.step', ".step='30' is invalid: expected a step (an integer)")
        >>> verdict_problem({**v, "colour": "red"})
        ('.colour', '.colour is not a verdict field: remove it')
        >>> verdict_problem([1])
        ('', ' must be a JSON object (Verdict.to_json), got list')
    """
    if type(value) is not dict:
        return "", f" must be a JSON object (Verdict.to_json), got {type(value).__name__}"
    for name in _REQUIRED:
        if name not in value:
            return f".{name}", f".{name} is missing: add the field"
    unknown = sorted(str(k) for k in value if k not in CHECKS)
    if unknown:
        return f".{unknown[0]}", f".{unknown[0]} is not a verdict field: remove it"
    for name, (ok, want) in CHECKS.items():
        if name in value and not ok(value[name]):
            return f".{name}", f".{name}={_shown(value[name])} is invalid: expected {want}"
    return None
