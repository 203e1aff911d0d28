"""Validate request bodies of the HTTP API into wire types, naming the bad field.

The ingest body is checked with plain type tests (`record_columns`) rather than a schema
library: it is the service's hot path. NaN and Infinity are valid losses (Python's JSON
literals); a number literal beyond the float range (``1e309``) is not, whichever parser
reads the body.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import orjson

from spikewatch.records import StepRecord
from spikewatch.service.payload_error import PayloadError, bad
from spikewatch.service.record_columns import INT64_MIN, columns, integer
from spikewatch.service.reports import REPORT_FIELDS, ReportError, TrainerReport, parse_report
from spikewatch.validation import RUN_ID_RULE, is_run_id

__all__ = ["IngestBatch", "PayloadError", "check_run_id", "parse_ingest", "parse_json"]

_BATCH_FIELDS = (
    frozenset(("records", "seq", "client", "acks", "rewind_to", "dropped", "finished"))
    | REPORT_FIELDS
)


@dataclass(frozen=True, slots=True)
class IngestBatch:
    """A validated ``POST /v1/runs/{run}/records`` body, records as columns.

    Attributes:
        steps, loss, grad_norm, lr: the records' fields, steps strictly increasing.
        seq: the client's batch sequence number (retries of a delivered batch are
            recognised by it and not ingested twice; without it, a body identical to
            the run's previous one is the retry: see `attempts`).
        client: the client's session id (a restarted trainer starts a new sequence; one
            that starts the run over from an earlier step is a new attempt).
        acks: ids of commands the trainer has applied.
        rewind_to: the trainer rolled back and continues from this step.
        dropped: records the client dropped so far (its queue was full).
        finished: the trainer ended the run (after these records): not a stall.
        report: the trainer's own decisions (None: the service decides for this client).
    """

    steps: list[int]
    loss: list[float]
    grad_norm: list[float | None]
    lr: list[float | None]
    seq: int | None = None
    client: str | None = None
    acks: list[str] = field(default_factory=list)
    rewind_to: int | None = None
    dropped: int = 0
    finished: bool = False
    report: TrainerReport | None = None

    @classmethod
    def of(cls, records: list[StepRecord], **extra: Any) -> IngestBatch:
        """A batch of ``records`` (for callers that hold `StepRecord` objects)."""
        return cls(
            steps=[r.step for r in records],
            loss=[r.loss for r in records],
            grad_norm=[r.grad_norm for r in records],
            lr=[r.lr for r in records],
            **extra,
        )

    def __len__(self) -> int:
        return len(self.steps)


def check_run_id(run: str) -> str:
    """Return ``run`` if it is a valid run id, else raise `PayloadError`.

    Example:
        >>> check_run_id("gpt-1b")
        'gpt-1b'
        >>> check_run_id("a b")
        Traceback (most recent call last):
        ...
        spikewatch.service.payload_error.PayloadError: run='a b' is invalid: expected 1-128 of ...
    """
    if not is_run_id(run):
        raise bad("run", run, RUN_ID_RULE)
    return run


def parse_json(body: bytes) -> Any:
    """Parse a request body, or raise `PayloadError` saying where it breaks.

    orjson parses about four times faster than `json`, but refuses the ``NaN`` and
    ``Infinity`` literals that non-finite losses travel as; a body holding either (rare:
    a diverged run) takes the standard library's parser.

    Example:
        >>> parse_json(b'{"loss": NaN, "step": 3}')
        {'loss': nan, 'step': 3}
        >>> parse_json(b'{"loss": 1.5')  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        spikewatch.service.payload_error.PayloadError: body is not valid JSON (...): send ...
    """
    try:
        if b"NaN" in body or b"Infinity" in body:
            return json.loads(body, parse_float=_finite)
        return orjson.loads(body)
    except (ValueError, RecursionError) as exc:  # bad JSON, >4300-digit ints, deep nesting
        why = _TOO_BIG if "infinity when parsed" in str(exc) else str(exc)
        raise PayloadError(
            "body", f"body is not valid JSON ({why}): send a JSON object", status=400
        ) from exc


_TOO_BIG = "a number beyond the float range: send Infinity or a finite number"


def _finite(text: str) -> float:
    """The standard parser's floats as orjson reads them: ``1e309`` is an error, not inf."""
    value = float(text)
    if math.isinf(value):
        raise ValueError(_TOO_BIG)
    return value


def parse_ingest(data: object, run: str, *, max_records: int) -> IngestBatch:
    """Validate an ingest body for ``run``.

    Example:
        >>> b = parse_ingest({"records": [{"step": 1, "loss": float("nan")}]}, "r", max_records=10)
        >>> b.steps, b.loss
        ([1], [nan])
        >>> parse_ingest({"records": [{"step": 1, "loss": "1.0"}]}, "r", max_records=10)
        Traceback (most recent call last):
        ...
        spikewatch.service.payload_error.PayloadError: records[0].loss='1.0' is invalid: ...
    """
    if type(data) is not dict:
        raise bad("body", data, 'a JSON object like {"records": [...]}')
    unknown = data.keys() - _BATCH_FIELDS
    if unknown:
        name = sorted(unknown)[0]
        raise PayloadError(
            name, f"{name} is not a known field: use {', '.join(sorted(_BATCH_FIELDS))}"
        )
    items = data.get("records")
    if type(items) is not list:
        raise bad("records", items, "a JSON array of records")
    if len(items) > max_records:
        raise PayloadError(
            "records", f"records has {len(items)} items: send at most {max_records} per request"
        )
    steps, loss, grad, lr = columns(items, run)
    return IngestBatch(
        steps=steps,
        loss=loss,
        grad_norm=grad,
        lr=lr,
        seq=_optional_int(data, "seq"),
        client=_optional_str(data, "client"),
        acks=_acks(data.get("acks", [])),
        rewind_to=_rewind_step(data),
        dropped=_optional_int(data, "dropped") or 0,
        finished=_flag(data, "finished"),
        report=_report(data),
    )


def _report(data: dict[str, Any]) -> TrainerReport | None:
    try:
        return parse_report(data)
    except ReportError as exc:
        raise PayloadError(exc.field, str(exc)) from exc


def _rewind_step(data: dict[str, Any]) -> int | None:
    value = _optional_int(data, "rewind_to")
    if value is not None and value <= INT64_MIN:  # the step before it must fit too
        raise bad("rewind_to", value, f"an integer above {INT64_MIN}")
    return value


def _flag(data: dict[str, Any], name: str) -> bool:
    value = data.get(name, False)
    if type(value) is not bool:
        raise bad(name, value, "true or false")
    return value


def _optional_int(data: dict[str, Any], name: str) -> int | None:
    return integer(data.get(name), name)


def _optional_str(data: dict[str, Any], name: str) -> str | None:
    value = data.get(name)
    if value is None or (type(value) is str and len(value) <= 128):
        return value
    raise bad(name, value, "a string of at most 128 characters or null")


def _acks(value: Any) -> list[str]:
    if type(value) is not list or not all(type(v) is str for v in value):
        raise bad("acks", value, "a JSON array of command ids (strings)")
    return value
