"""The port through which the service tells people about incidents (Slack, or nothing)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from spikewatch.incidents import Incident
from spikewatch.service.status import RunStatus


class Notifier(Protocol):
    """Non-blocking: every method enqueues and returns (the Slack sink does the I/O on its
    own thread), so ingest never waits on Slack."""

    def incident(
        self,
        incident: Incident,
        window: Sequence[tuple[int, float]],
        *,
        decision_reason: str | None = None,
    ) -> None:
        """Announce an incident once, with a chart of ``window`` (step, loss)."""
        ...

    def follow_up(self, run: str, incident_id: str, text: str) -> None:
        """Add to an incident's thread (rollback applied, recovered, halted)."""
        ...

    def digest(self, runs: Sequence[RunStatus], *, period_s: float) -> None:
        """Summarise every run."""
        ...


#: A deferred call on the notifier, made after the store commit and outside the lock.
Notice = Callable[[Notifier], None]


def incident_notice(
    incident: Incident, window: Sequence[tuple[int, float]], reason: str | None = None
) -> Notice:
    """Announce ``incident`` (once) with a chart of ``window``."""

    def send(n: Notifier) -> None:
        n.incident(incident, window, decision_reason=reason)

    return send


def follow_up_notice(run: str, incident_id: str, text: str) -> Notice:
    """Add ``text`` to the incident's thread."""

    def send(n: Notifier) -> None:
        n.follow_up(run, incident_id, text)

    return send


def digest_notice(runs: Sequence[RunStatus], period_s: float) -> Notice:
    """Summarise ``runs``."""

    def send(n: Notifier) -> None:
        n.digest(runs, period_s=period_s)

    return send
