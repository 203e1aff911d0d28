"""What the trainer's HTTP client sends and receives, and its one connection.

Kept apart from `spikewatch.http_transport` (the queue and the sender thread) so each
stays small; nothing here is public API.
"""

from __future__ import annotations

import http.client
import json
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Literal

from spikewatch.records import Decision, StepRecord


@dataclass(frozen=True, slots=True)
class Rewind:
    """Queue marker: the records after it continue a rolled-back run."""


@dataclass(slots=True)
class Batch:
    """One request's worth: records, the acks and flags that travel with them."""

    seq: int
    records: list[StepRecord]
    rewind: bool
    acks: list[str] = field(default_factory=list)
    finished: bool = False
    #: The trainer's own decisions (None: a client that leaves deciding to the service).
    decisions: list[dict[str, Any]] | None = None
    #: What the trainer did about proposals and commands (proposed, refused, expired).
    events: list[dict[str, Any]] = field(default_factory=list)
    #: The trainer's effective monitor settings (sent once per client session).
    config: dict[str, Any] | None = None
    #: Steps the trainer can restore right now (its snapshot ring).
    restorable: list[int] | None = None

    def encode(self, *, client: str, dropped: int) -> bytes:
        """The request body (numpy/torch scalars become plain numbers)."""
        data: dict[str, Any] = {
            "records": [_record_json(r) for r in self.records],
            "seq": self.seq,
            "client": client,
            "acks": self.acks,
            "dropped": dropped,
        }
        if self.rewind and self.records:
            data["rewind_to"] = self.records[0].step
        if self.finished:
            data["finished"] = True
        if self.decisions is not None:
            data["decisions"] = self.decisions
        if self.events:
            data["events"] = self.events
        if self.config is not None:
            data["config"] = self.config
        if self.restorable is not None:
            data["restorable"] = self.restorable
        return json.dumps(data, default=_plain).encode()


class Connection:
    """A keep-alive connection to the service, reopened after a failure."""

    def __init__(
        self, parts: urllib.parse.SplitResult, *, path: str, token: str, timeout_s: float
    ) -> None:
        self._parts, self._path, self._timeout_s = parts, path, timeout_s
        self._headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
        self._conn: http.client.HTTPConnection | None = None

    def post(self, body: bytes) -> tuple[int, Any]:
        """POST ``body``; the status and the parsed answer (text if it is not JSON)."""
        return self.request("POST", self._path, body)

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, Any]:
        """One request on the kept-alive connection; the status and the parsed answer."""
        if self._conn is None:
            https = self._parts.scheme == "https"
            cls = http.client.HTTPSConnection if https else http.client.HTTPConnection
            self._conn = cls(self._parts.hostname or "", self._parts.port, timeout=self._timeout_s)
        self._conn.request(method, path, body=body, headers=self._headers)
        resp = self._conn.getresponse()
        raw = resp.read()
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, raw[:200].decode(errors="replace")

    def reset(self) -> None:
        """Close; the next `post` reconnects."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _plain(value: Any) -> Any:
    """NumPy and torch scalars as plain numbers (``json`` knows neither)."""
    item = getattr(value, "item", None)
    if item is None:
        raise TypeError(f"{type(value).__name__} is not a number")
    return item()


def _record_json(r: StepRecord) -> dict[str, Any]:
    d: dict[str, Any] = {"step": r.step, "loss": r.loss}
    for name in ("grad_norm", "lr", "data_position", "wall_time"):
        value = getattr(r, name)
        if value is not None:
            d[name] = value
    return d


def decision_of(cmd: dict[str, Any]) -> Decision:
    """The guard's view of a command from the service."""
    return Decision(
        run=cmd["run"],
        step=int(cmd["issued_step"]),
        action=cmd["action"] if cmd["action"] in ("rollback", "halt") else "watch",
        reason=f"spikewatch service: {cmd['reason']}",
        rollback_before_step=cmd.get("rollback_before_step"),
        lr_factor=float(cmd.get("lr_factor", 1.0)),
        skip_ahead=int(cmd.get("skip_ahead", 0)),
    )


#: After an answer other than 200: send the batch again later, drop it (it can never be
#: accepted), or stop sending (the service refuses this client, e.g. its token).
Verdict = Literal["retry", "rejected", "refused"]


def verdict(status: int, payload: Any) -> tuple[Verdict, str]:
    """What the sender does after a non-200 answer, and the fix it logs.

    Example:
        >>> verdict(503, {})[0], verdict(422, {"field": "records[0].loss"})[0], verdict(403, {})[0]
        ('retry', 'rejected', 'refused')
    """
    field_ = payload.get("field") if isinstance(payload, dict) else None
    if status in (401, 403) or (status == 422 and field_ == "run"):
        return "refused", (
            "pass the token `spikewatch serve` was started with (token= or "
            "$SPIKEWATCH_TOKEN) and a valid run id; nothing more is sent for this run"
        )
    if status == 413:
        return "rejected", "the batch is over the service's max_body_bytes: lower batch_size="
    if 400 <= status < 500 and status not in (408, 429):
        return "rejected", (
            "this batch can never be accepted: its records are dropped (counted in "
            "`rejected`); the message names the field to fix"
        )
    return "retry", ""
