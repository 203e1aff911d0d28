"""What a trainer that decides for itself reports with its records (service mode).

A batch with a ``decisions`` array comes from a trainer whose own monitor decided every
automatic action; the service then stores and announces those decisions instead of
deciding itself. ``events`` say what the trainer did about proposals and operators'
commands; ``config`` is its effective settings; ``restorable`` the steps it can restore.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from spikewatch.errors import WireFormatError
from spikewatch.records import Decision

#: The batch fields a deciding trainer adds.
REPORT_FIELDS = frozenset(("decisions", "events", "config", "restorable"))
#: What the trainer did: a rollback proposed (manual approval), folded into an open
#: proposal, refused (a command it cannot carry out), or a proposal that timed out.
EVENTS = frozenset(("proposed", "folded", "refused", "expired"))
_MAX_ITEMS = 10_000


@dataclass(frozen=True, slots=True)
class TrainerReport:
    """The trainer's decisions and events for one batch.

    Example:
        >>> r = parse_report({"decisions": [], "restorable": [0, 100]})
        >>> r.decisions, r.restorable
        ([], [0, 100])
        >>> parse_report({"records": []}) is None
        True
    """

    decisions: list[Decision]
    events: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] | None = None
    restorable: list[int] | None = None


def parse_report(data: dict[str, Any]) -> TrainerReport | None:
    """The report in an ingest body; None for a client that leaves deciding to the service.

    Raises `ReportError` (the caller's 422) naming the bad field.
    """
    if "decisions" not in data:
        if REPORT_FIELDS & data.keys():
            raise _error("decisions", "events, config and restorable need a decisions array")
        return None
    return TrainerReport(
        decisions=[
            _decision(d, f"decisions[{i}]")
            for i, d in enumerate(_array(data["decisions"], "decisions"))
        ],
        events=[_event(e, i) for i, e in enumerate(_array(data.get("events", []), "events"))],
        config=_config(data.get("config")),
        restorable=_steps(data.get("restorable")),
    )


def _array(value: object, name: str) -> list[Any]:
    if type(value) is not list or len(value) > _MAX_ITEMS:
        raise _error(name, f"{name} must be a JSON array of at most {_MAX_ITEMS} items")
    return value


def _decision(value: object, path: str) -> Decision:
    try:
        return Decision.from_json(value)
    except (WireFormatError, TypeError) as exc:
        raise _error(path, f"{path} is invalid: {exc}") from exc


def _event(value: object, i: int) -> dict[str, Any]:
    event = value.get("event") if isinstance(value, dict) else None
    if not isinstance(value, dict) or type(event) is not str or event not in EVENTS:
        # (str first: a dict is unhashable, `in EVENTS` would raise)
        raise _error(
            f"events[{i}]", f"events[{i}] must be an object whose event is one of {sorted(EVENTS)}"
        )
    if value["event"] in ("proposed", "folded", "expired"):
        proposal = value.get("proposal")
        if type(proposal) is not str or not 0 < len(proposal) <= 64:
            raise _error(f"events[{i}].proposal", f"events[{i}].proposal must be an id string")
    if value["event"] == "proposed":
        decision = _decision(value.get("decision"), f"events[{i}].decision")
        return {**value, "decision": decision.to_json()}
    return value


def _config(value: object) -> dict[str, Any] | None:
    if value is None or type(value) is dict:
        return value
    raise _error("config", "config must be a JSON object (the trainer's settings) or absent")


def _steps(value: object) -> list[int] | None:
    if value is None:
        return None
    if type(value) is not list or len(value) > _MAX_ITEMS or any(type(v) is not int for v in value):
        raise _error("restorable", "restorable must be a JSON array of step numbers")
    return value


class ReportError(WireFormatError):
    """A bad report field; ``field`` is its JSON path (the ingest's 422 names it)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _error(name: str, message: str) -> ReportError:
    return ReportError(name, message)
