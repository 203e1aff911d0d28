"""The Slack sink's sender: one daemon thread that delivers the outbox, oldest row first.

A row is marked sent only after Slack answered ok; a failure schedules the row's next
try (`retry_delay`, never sooner than a Retry-After, which also holds every other row).
An incident is two calls, the message and its chart: the row remembers the posted
message (`Outbox.progress`), so a retry or a restart only uploads the chart.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from slack_sdk.errors import SlackClientError

from spikewatch.errors import WireFormatError
from spikewatch.forensics.verdict import Verdict
from spikewatch.incidents import Incident
from spikewatch.sinks.outbox import Outbox, OutboxRow, retry_delay
from spikewatch.sinks.slack_delivery import DeliveryError, SlackPoster, retry_after_of
from spikewatch.sinks.slack_messages import SlackMessage, follow_up_message, incident_message
from spikewatch.sinks.slack_verdict import verdict_message

logger = logging.getLogger("spikewatch.sinks.slack")

_WEBHOOK_NOTE = "chart not attached: uploading files needs a bot token, not a webhook"
#: Tries of an incident's chart upload before the message counts as delivered without it.
CHART_TRIES = 3
_IDLE_POLL_S = 0.5  # rows whose retry time comes are picked up at least this often


class SlackSender:
    """Delivers ``outbox`` through ``poster`` on its own thread (see `SlackSink`)."""

    def __init__(
        self,
        *,
        poster: SlackPoster,
        outbox: Outbox,
        threads: Mapping[str, str],
        on_thread: Callable[[str, str], None] | None,
        retry_backoff_s: float,
        max_backoff_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.poster, self.outbox, self.on_thread, self.clock = poster, outbox, on_thread, clock
        self.retry_backoff_s, self.max_backoff_s = retry_backoff_s, max_backoff_s
        self.lock = threading.Lock()
        self.threads: dict[str, str] = dict(threads)
        self.delivered = self.failures = 0
        self._paused_until = 0.0  # a 429's Retry-After holds every row, not just one
        self.wake, self.closing = threading.Event(), threading.Event()
        self._worker = threading.Thread(target=self._run, name="spikewatch-slack", daemon=True)
        self._worker.start()

    def join(self, timeout: float) -> None:
        """Let the sender finish the rows due now, then stop (up to ``timeout`` s)."""
        self.closing.set()
        self.wake.set()
        self._worker.join(timeout)

    # -- sender --------------------------------------------------------------------------

    def _run(self) -> None:
        # One row per query: the oldest due row goes next, so rows keep their order
        # even when one of them just unblocked its incident's thread.
        while True:
            rows = self._due()
            if rows:
                self._deliver(rows[0])
            elif self.closing.is_set():
                return
            else:
                self.wake.wait(_IDLE_POLL_S)
                self.wake.clear()

    def _due(self) -> list[OutboxRow]:
        now = self.clock()
        if now < self._paused_until:
            return []
        try:
            return self.outbox.due(now, limit=1)
        except Exception:  # the store is down: try again at the next poll
            logger.exception("slack sink: cannot read the outbox")
            return []

    def _deliver(self, row: OutboxRow) -> None:
        what = f"{row.message.kind} {row.message.key}".rstrip()
        try:
            self._send(row)
            self.outbox.sent(row.id, self.clock())
        except Exception as exc:  # the sender must outlive any one bad call
            self._failed(row, what, exc)
        else:
            with self.lock:
                self.delivered += 1

    def _failed(self, row: OutboxRow, what: str, exc: Exception) -> None:
        with self.lock:
            self.failures += 1
        wait = retry_after_of(exc)
        now = self.clock()
        if wait:
            self._paused_until = now + wait
        delay = retry_delay(
            row.attempts + 1,
            first_s=self.retry_backoff_s,
            max_s=self.max_backoff_s,
            retry_after_s=wait,
        )
        if isinstance(exc, (SlackClientError, DeliveryError, OSError)):
            logger.warning(
                "slack sink: %s failed (try %d, next in %.1f s): %s: %s",
                what, row.attempts + 1, delay, type(exc).__name__, exc,
            )  # fmt: skip
        else:
            logger.exception("slack sink: %s failed unexpectedly", what)
        try:
            self.outbox.failed(row.id, now + delay, f"{type(exc).__name__}: {exc}")
        except Exception:
            logger.exception("slack sink: cannot record the failure of %s", what)

    def _send(self, row: OutboxRow) -> None:
        body = row.message.body
        if row.message.kind == "incident":
            self._send_incident(row)
        elif row.message.kind == "follow_up":
            run, incident_id, text = body["run"], body["incident"], body["text"]
            with self.lock:
                ts = self.threads.get(row.message.key) if incident_id else None
            threaded = ts is not None and self.poster.client is not None
            message = follow_up_message(run, incident_id, text, threaded=threaded)
            if "verdict" in body:  # a forensics verdict: its own Block Kit message
                message = _verdict_or(message, body["verdict"], run, incident_id, threaded)
            self.poster.post(message, ts)
        else:
            self.poster.post(SlackMessage(str(body["text"]), list(body["blocks"])), None)

    def _send_incident(self, row: OutboxRow) -> None:
        """Post the message (once: the row remembers it), then upload the chart."""
        body: dict[str, Any] = dict(row.message.body)
        incident = Incident(**body["incident"])
        window = [(int(s), float(v)) for s, v in body["window"]]
        if "posted" not in body:
            note = None if self.poster.client is not None else _WEBHOOK_NOTE
            message = incident_message(incident, window, decision_reason=body["reason"], note=note)
            posted = self.poster.post(message, None)
            if posted is None:
                return  # a webhook: no thread, no chart
            body["posted"] = list(posted)
            self._thread_started(row, body, posted[1])
        channel_id, ts = body["posted"]
        try:
            self.poster.upload_chart(channel_id, ts, incident, window)
        except Exception:
            body["chart_failures"] = int(body.get("chart_failures", 0)) + 1
            if body["chart_failures"] < CHART_TRIES:
                self.outbox.progress(row.id, body, (row.message.key, ts))
                raise
            logger.exception("slack sink: chart of %s given up", row.message.key)
            with self.lock:
                self.failures += 1

    def _thread_started(self, row: OutboxRow, body: dict[str, Any], ts: str) -> None:
        key = row.message.key
        self.outbox.progress(row.id, body, (key, ts))
        with self.lock:
            self.threads[key] = ts
        if self.on_thread is not None:
            try:
                self.on_thread(key, ts)
            except Exception:
                logger.exception("slack sink: on_thread callback failed for %s", key)


def _verdict_or(
    plain: SlackMessage, verdict: object, run: str, incident_id: str, threaded: bool
) -> SlackMessage:
    """The verdict's message; ``plain`` (its text) if the stored verdict does not parse,
    so a bad row never holds up the rows behind it in its thread."""
    try:
        parsed = Verdict.from_json(verdict)
    except WireFormatError:
        logger.exception("slack sink: a stored verdict of %s/%s does not parse", run, incident_id)
        return plain
    return verdict_message(run, incident_id, parsed, threaded=threaded)
