"""The port through which the service tells people about incidents (Slack, or nothing).

A notice is data, not a call: an `OutboxMessage` the registry stores in the event
store's outbox in the same transaction as the ingest that caused it (so an incident is
never marked announced without its message), and the notifier's sender delivers it
later from there. Building a notice is cheap (no chart, no Slack formatting): charts are
drawn by the sender, off the ingest path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from spikewatch.incidents import Incident
from spikewatch.service.status import RunStatus
from spikewatch.sinks.outbox import OutboxMessage
from spikewatch.sinks.slack_messages import digest_message

#: A message for the notifier, stored in the outbox until delivered.
Notice = OutboxMessage


class Notifier(Protocol):
    """Non-blocking: the sender (the Slack sink's own thread) does the I/O, so ingest
    never waits on Slack."""

    def post(self, notices: Sequence[Notice]) -> None:
        """Store ``notices`` in the notifier's outbox and deliver them soon."""
        ...

    def wake(self) -> None:
        """Notices were just stored in the outbox by someone else (ingest): deliver them."""
        ...


def incident_key(run: str, incident_id: str) -> str:
    """The key of an incident's thread: its rows go out in order.

    Example:
        >>> incident_key("gpt-1b", "loss-500"), incident_key("gpt-1b", "")
        ('gpt-1b/loss-500', '')
    """
    return f"{run}/{incident_id}" if incident_id else ""


def incident_notice(
    incident: Incident, window: Sequence[tuple[int, float]], reason: str | None = None
) -> Notice:
    """Announce ``incident`` with a chart of ``window`` ((step, value) pairs).

    Example:
        >>> from spikewatch.incidents import Incident
        >>> inc = Incident(id="i1", run="r", kind="spike", metric="loss", onset_step=5,
        ...                peak_step=5, end_step=None, transient=False, score=9.0,
        ...                action="rollback", detected_step=5, reason="9 sigma")
        >>> notice = incident_notice(inc, [(4, 1.0), (5, 9.0)], "rollback: 9 sigma")
        >>> notice.kind, notice.key, notice.body["window"]
        ('incident', 'r/i1', [[4, 1.0], [5, 9.0]])
    """
    return Notice(
        kind="incident",
        key=incident_key(incident.run, incident.id),
        body={
            "incident": incident.to_json(),
            "window": [[int(s), float(v)] for s, v in window],
            "reason": reason,
        },
    )


def follow_up_notice(run: str, incident_id: str, text: str) -> Notice:
    """Add ``text`` to the incident's thread (a plain message when it has none)."""
    body = {"run": run, "incident": incident_id, "text": text}
    return Notice(kind="follow_up", key=incident_key(run, incident_id), body=body)


def verdict_notice(run: str, incident_id: str, verdict: dict[str, Any]) -> Notice:
    """Add a forensics verdict (`Verdict.to_json`) to the incident's thread.

    A follow-up whose Block Kit the sender draws from ``verdict``; ``text`` says it in
    one line, for a sender that only knows plain follow-ups.

    Example:
        >>> n = verdict_notice("r", "i1", {"cause": "state", "why": "batches look ordinary"})
        >>> n.kind, n.key, n.body["text"]
        ('follow_up', 'r/i1', 'forensics: state (batches look ordinary)')
    """
    text = f"forensics: {verdict['cause']} ({verdict.get('why', '')})"
    body = {"run": run, "incident": incident_id, "text": text, "verdict": verdict}
    return Notice(kind="follow_up", key=incident_key(run, incident_id), body=body)


def digest_notice(runs: Sequence[RunStatus], period_s: float) -> Notice:
    """Summarise ``runs`` (formatted now: the statuses are of this moment)."""
    message = digest_message(list(runs), period_s=period_s)
    return Notice(kind="digest", key="", body={"text": message.text, "blocks": message.blocks})
