"""The trainer's client's queue: what waits to be sent, and how batches are cut from it.

The training thread appends (`_enqueue`, under a lock held for microseconds); the sender
thread cuts a `Batch` from the front (`_next_batch`) and, once the service answered,
drops it (`_commit`: delivered; `_drop`: never acceptable). Kept apart from
`spikewatch.http_transport` (the sender and the public API) so each stays small.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import deque
from collections.abc import Sequence
from typing import Any

from spikewatch.http_wire import Batch, Rewind
from spikewatch.records import StepRecord


class SendQueue:
    """Records, decisions and events waiting for the service (see the module docstring).

    Args:
        max_queue: records held at most; beyond it new ones are dropped and counted.
        batch_size: most records per request.
    """

    def __init__(self, *, max_queue: int, batch_size: int) -> None:
        self.max_queue, self.batch_size = max_queue, batch_size
        self._queue: deque[StepRecord | Rewind] = deque()
        self._queued = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._acks: list[str] = []
        self._reports: list[dict[str, Any]] | None = None  # None: the service decides
        self._events: list[dict[str, Any]] = []
        #: Ask the service at every flush interval even with nothing to send (a rollback
        #: waits for an operator's answer, which only comes back in an ingest answer).
        self.polling = False
        self._config: dict[str, Any] | None = None  # sent until a batch carrying it lands
        self._restorable: list[int] | None = None
        self._seq = 0
        self.sent = self.dropped = self.rejected = 0
        self.rejected_reports = 0  # decisions and events the service named as invalid
        self.rejected_field = ""  # the field the service's last 4xx named
        #: The status the service refused this client with (401/403: a wrong token);
        #: nothing is sent after it, and records are dropped and counted.
        self.refused: int | None = None
        self._finishing = self._finish_sent = False

    def _enqueue(self, records: Sequence[StepRecord]) -> None:
        with self._lock:
            room = 0 if self.refused else max(0, self.max_queue - self._queued)
            if room < len(records):
                self.dropped += len(records) - room
                records = records[:room]
            self._queue.extend(records)
            self._queued += len(records)
            if records:  # records after a finish: the run goes on
                self._finishing = self._finish_sent = False
            full = self._queued >= self.batch_size
        if full:
            self._wake.set()

    def _next_batch(self) -> Batch | None:
        with self._lock:
            acks, self._acks = self._acks, []
            rewind = len(self._queue) > 1 and isinstance(self._queue[0], Rewind)
            if rewind:  # only with a record behind it: rewind_to names that record's step
                self._queue.popleft()
            records: list[StepRecord] = []
            for item in self._queue:
                if isinstance(item, Rewind) or len(records) == self.batch_size:
                    break
                records.append(item)
            if not records and self._queue:
                rewind = False  # a lone marker waits for the records that follow it
            finished = self._finishing and not self._finish_sent and len(records) == self._queued
            reports, events = self._reports, self._events
            if reports is not None:
                self._reports = []
            self._events = []
            config, restorable = self._config, self._restorable
        idle = not (records or acks or finished or reports or events)
        if idle and not (self.polling and reports is not None):
            self._put_back(reports, events)
            return None
        self._seq += 1
        return Batch(
            self._seq, records, rewind, acks, finished, reports, events, config, restorable
        )

    def _put_back(self, reports: list[dict[str, Any]] | None, events: list[dict[str, Any]]) -> None:
        with self._lock:
            if reports is not None:
                self._reports = reports + (self._reports or [])
            self._events[:0] = events

    def _commit(self, batch: Batch) -> None:
        """Drop a delivered batch's records from the queue (new ones were appended behind)."""
        with self._lock:
            n = len(batch.records)
            for _ in range(n):
                item = self._queue.popleft()
                while isinstance(item, Rewind):  # cannot happen ahead of the batch's records
                    item = self._queue.popleft()
            self._queued -= n
            self.sent += n
            if batch.finished and self._finishing:
                self._finish_sent = True
            if batch.config is not None and self._config is batch.config:
                self._config = None  # the service has it

    def _drop(self, batch: Batch) -> None:
        """A batch the service can never take: drop its records, keep its acks, rewind
        and finish for the next batch (they are not what was wrong with it). Its
        decisions and events go with the next batch too, unless the service named one of
        them as what was wrong: sent again, they would get every later batch refused."""
        field = self.rejected_field
        if field.startswith(("decisions", "events")):
            self.rejected_reports += len(batch.decisions or []) + len(batch.events)
            batch = dataclasses.replace(batch, decisions=[], events=[])
        with self._lock:
            for _ in range(len(batch.records)):
                self._queue.popleft()
            self._queued -= len(batch.records)
            self.rejected += len(batch.records)
            if batch.rewind:
                self._queue.appendleft(Rewind())
            self._acks[:0] = batch.acks
        self._put_back(batch.decisions, batch.events)

    def _refuse_all(self) -> None:
        """The service refuses this client for good: drop (and count) what is queued."""
        with self._lock:
            self.dropped += self._queued
            self._queue.clear()
            self._queued = 0
