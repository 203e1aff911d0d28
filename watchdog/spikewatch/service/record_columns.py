"""The records of an ingest body, checked as columns (the service's hot path).

Whole columns are type-checked with a few C-level passes (about a microsecond per
record); on any doubt the record-by-record check finds the first bad field and names it.
NaN and Infinity are valid losses; a string, a bool or a missing ``step`` is not.
"""

from __future__ import annotations

import operator
from typing import Any

from spikewatch.records import StepRecord
from spikewatch.service.payload_error import PayloadError, bad

# SQLite stores 64-bit integers; a float holds ints below ~1.8e308.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_FLOAT_MAX = 2**1023 * (2 - 2**-52)  # the largest finite float, as an exact int

RECORD_FIELDS = frozenset(("run", "step", "loss", "grad_norm", "lr", "data_position", "wall_time"))

Columns = tuple[list[int], list[float], list[float | None], list[float | None]]


def columns(items: list[Any], run: str) -> Columns:
    """Type-check whole columns at once (a few list passes); on any doubt, fall back to
    the record-by-record check, which finds the first bad field and says what it is."""
    # map() with C callables keeps each pass out of the interpreter loop.
    if set(map(type, items)) <= _DICT and all(map(RECORD_FIELDS.issuperset, items)):
        steps = [d.get("step") for d in items]
        loss = [d.get("loss") for d in items]
        grad = [d.get("grad_norm") for d in items]
        lr = [d.get("lr") for d in items]
        if (
            set(map(type, steps)) <= _INT
            and (not steps or (steps[0] >= INT64_MIN and steps[-1] <= INT64_MAX))
            and all(map(operator.lt, steps, steps[1:]))
            and set(map(type, loss)) <= _FLOAT
            and set(map(type, grad)) <= _FLOAT_OR_NONE
            and set(map(type, lr)) <= _FLOAT_OR_NONE
            and (all(map(_FAST_FIELDS.issuperset, items)) or all(_extras_ok(d, run) for d in items))
        ):
            return steps, loss, grad, lr
    records = _records(items, run)
    return (
        [r.step for r in records],
        [r.loss for r in records],
        [r.grad_norm for r in records],
        [r.lr for r in records],
    )


_FAST_FIELDS = frozenset(("step", "loss", "grad_norm", "lr"))
_DICT, _INT, _FLOAT = frozenset((dict,)), frozenset((int,)), frozenset((float,))
_FLOAT_OR_NONE = frozenset((float, type(None)))


def _extras_ok(d: dict[str, Any], run: str) -> bool:
    dp, wt = d.get("data_position"), d.get("wall_time")
    return (
        d.get("run", run) == run
        and (dp is None or (type(dp) is int and INT64_MIN <= dp <= INT64_MAX))
        and (wt is None or type(wt) is float)
    )


def _records(items: list[Any], run: str) -> list[StepRecord]:
    out: list[StepRecord] = []
    last = None
    for i, d in enumerate(items):
        if type(d) is not dict:
            raise bad(f"records[{i}]", d, "a JSON object")
        if d.keys() - RECORD_FIELDS:
            name = sorted(d.keys() - RECORD_FIELDS)[0]
            raise PayloadError(
                f"records[{i}].{name}",
                f"records[{i}].{name} is not a record field: use "
                + ", ".join(sorted(RECORD_FIELDS)),
            )
        step = d.get("step")
        if type(step) is not int or not INT64_MIN <= step <= INT64_MAX:
            raise bad(f"records[{i}].step", step, "a 64-bit integer")
        if last is not None and step <= last:
            raise bad(
                f"records[{i}].step", step, f"a step after {last} (steps in a batch must increase)"
            )
        if d.get("run", run) != run:
            raise bad(
                f"records[{i}].run", d["run"], f"{run!r} (the run in the URL) or no run field"
            )
        loss = d.get("loss")
        if type(loss) is not float:
            loss = _number(loss, f"records[{i}].loss", optional=False)
        out.append(
            StepRecord(
                run,
                step,
                loss,
                _number(d.get("grad_norm"), f"records[{i}].grad_norm"),
                _number(d.get("lr"), f"records[{i}].lr"),
                integer(d.get("data_position"), f"records[{i}].data_position"),
                _number(d.get("wall_time"), f"records[{i}].wall_time"),
            )
        )
        last = step
    return out


def _number(value: Any, path: str, *, optional: bool = True) -> Any:
    t = type(value)
    if t is float or (value is None and optional):
        return value
    if t is int and -_FLOAT_MAX <= value <= _FLOAT_MAX:
        return float(value)
    raise bad(
        path, value, "a number or null" if optional else "a number (NaN and Infinity allowed)"
    )


def integer(value: Any, path: str) -> int | None:
    if value is None or (type(value) is int and INT64_MIN <= value <= INT64_MAX):
        return value
    raise bad(path, value, "an integer or null")
