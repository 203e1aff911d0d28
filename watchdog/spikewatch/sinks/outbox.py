"""The Slack outbox: every message waits as a row until Slack has accepted it.

A message (an incident, a thread follow-up, a digest) is written to an `Outbox` by
whatever caused it, and the sink's sender delivers rows oldest first, marking each one
sent only when Slack answered ok. A failed row is tried again later (`retry_delay`), so
an outage, a long Retry-After or a restart of the service delays messages and loses none.
The service keeps its outbox in the event store (`spikewatch.service.store_outbox`), in
the same transaction as the ingest that caused the message; `MemoryOutbox` is for a sink
used on its own (its rows die with the process).

Rows of one incident go out in order: a row waits while an older row with the same
``key`` is unsent, so a follow-up never overtakes the message that starts its thread.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

MessageKind = Literal["incident", "follow_up", "digest"]


@dataclass(frozen=True, slots=True, kw_only=True)
class OutboxMessage:
    """One message for Slack, in plain JSON types (it is stored as a row).

    Attributes:
        kind: ``incident`` (a message, then its chart in the thread), ``follow_up`` (in
            the incident's thread) or ``digest``.
        key: the incident key (``run/incident-id``) that orders a thread's rows; ``""``
            for rows that order nothing (digests).
        body: what the sender needs to build the Slack calls (see `SlackSink`).
    """

    kind: MessageKind
    key: str
    body: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """A stored message: its row id, when it was written and how often it failed."""

    id: int
    message: OutboxMessage
    created: float
    attempts: int = 0


@dataclass(frozen=True, slots=True)
class Backlog:
    """Unsent rows: how many, and when the oldest was written (None when there are none)."""

    messages: int
    oldest_created: float | None


class Outbox(Protocol):
    """Where messages wait for Slack. Every method is short and thread-safe: the caller
    (ingest, a job) adds, the sink's sender reads and marks."""

    def add(self, messages: Sequence[OutboxMessage]) -> int:
        """Store ``messages``; return how many were stored (a bounded outbox drops)."""
        ...

    def due(self, now: float, limit: int) -> list[OutboxRow]:
        """Unsent rows whose retry time has come, oldest first, none behind an unsent
        older row of the same key."""
        ...

    def progress(self, row_id: int, body: dict[str, Any], thread: tuple[str, str]) -> None:
        """The row's first part was accepted (a thread started): keep ``body`` and the
        thread ts (``(key, ts)``) together, so a restart resumes after that part."""
        ...

    def sent(self, row_id: int, now: float) -> None:
        """Slack accepted the row: never send it again."""
        ...

    def failed(self, row_id: int, next_try: float, error: str) -> None:
        """The row failed; try it again at ``next_try``."""
        ...

    def threads(self) -> dict[str, str]:
        """Thread ts by incident key."""
        ...

    def backlog(self) -> Backlog:
        """How many rows are unsent and how old the oldest is."""
        ...


def retry_delay(attempts: int, *, first_s: float, max_s: float, retry_after_s: float = 0) -> float:
    """Seconds before the next try of a row that failed ``attempts`` times: doubling from
    ``first_s`` up to ``max_s`` (with up to +25 % jitter, so rows spread out), never
    sooner than a Retry-After Slack asked for.

    Example:
        >>> [int(retry_delay(n, first_s=1, max_s=60)) for n in (1, 3, 10)]
        [1, 4, 60]
        >>> retry_delay(1, first_s=1, max_s=60, retry_after_s=600)
        600
    """
    delay = min(max_s, first_s * 2.0 ** max(0, attempts - 1))
    return max(retry_after_s, delay * (1.0 + 0.25 * random.random()) if delay < max_s else delay)


@dataclass(slots=True)
class _Entry:
    row: OutboxRow
    next_try: float = 0.0
    sent: bool = False


class MemoryOutbox:
    """An `Outbox` in memory, for a sink used without the service (lost on exit).

    Args:
        max_messages: unsent rows kept; more are dropped (counted in ``dropped``).
        threads: thread ts by incident key from an earlier process.
        clock: when a row was written.

    Example:
        >>> box = MemoryOutbox(max_messages=10, clock=lambda: 5.0)
        >>> box.add([OutboxMessage(kind="digest", key="", body={"text": "hi"})])
        1
        >>> [(r.id, r.message.kind) for r in box.due(now=5.0, limit=10)]
        [(1, 'digest')]
        >>> box.sent(1, now=6.0); box.backlog()
        Backlog(messages=0, oldest_created=None)
    """

    def __init__(
        self,
        *,
        max_messages: int = 1000,
        threads: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.max_messages, self.clock = max_messages, clock
        self.dropped = 0
        self._lock = threading.Lock()
        self._entries: dict[int, _Entry] = {}
        self._threads: dict[str, str] = dict(threads or {})
        self._next_id = 1

    def add(self, messages: Sequence[OutboxMessage]) -> int:
        """Store ``messages`` while fewer than ``max_messages`` are unsent."""
        stored = 0
        with self._lock:
            for message in messages:
                if len(self._entries) >= self.max_messages:
                    self.dropped += 1
                    continue
                row = OutboxRow(self._next_id, message, self.clock())
                self._entries[row.id] = _Entry(row)
                self._next_id += 1
                stored += 1
        return stored

    def due(self, now: float, limit: int) -> list[OutboxRow]:
        """Unsent rows due at ``now``, oldest first, in key order."""
        out: list[OutboxRow] = []
        waiting: set[str] = set()
        with self._lock:
            for entry in self._entries.values():  # insertion order is id order
                key = entry.row.message.key
                if key and key in waiting:
                    continue
                if key:
                    waiting.add(key)
                if entry.next_try <= now and len(out) < limit:
                    out.append(entry.row)
        return out

    def progress(self, row_id: int, body: dict[str, Any], thread: tuple[str, str]) -> None:
        """Keep the new body and the thread."""
        with self._lock:
            entry = self._entries.get(row_id)
            if entry is not None:
                message = replace(entry.row.message, body=body)
                entry.row = replace(entry.row, message=message)
            self._threads[thread[0]] = thread[1]

    def sent(self, row_id: int, now: float) -> None:
        """Forget the row: it is delivered."""
        with self._lock:
            self._entries.pop(row_id, None)

    def failed(self, row_id: int, next_try: float, error: str) -> None:
        """Count the attempt and wait until ``next_try``."""
        with self._lock:
            entry = self._entries.get(row_id)
            if entry is not None:
                entry.row = replace(entry.row, attempts=entry.row.attempts + 1)
                entry.next_try = next_try

    def threads(self) -> dict[str, str]:
        """A copy of the thread ts by incident key."""
        with self._lock:
            return dict(self._threads)

    def backlog(self) -> Backlog:
        """Unsent rows and the oldest one's creation time."""
        with self._lock:
            created = [e.row.created for e in self._entries.values()]
        return Backlog(len(created), min(created) if created else None)
