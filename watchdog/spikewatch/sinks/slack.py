"""Slack sink: one message per incident with its chart in the thread, follow-ups, digests.

Every public method only writes to the sink's outbox (`spikewatch.sinks.outbox`) and
returns; one daemon sender thread delivers the rows oldest first, so a slow,
rate-limited or absent Slack never blocks the caller. A row is marked sent only when
Slack answered ok; a failed one is tried again with backoff (for as long as the outage
lasts, and after a restart when the outbox is the event store's), so a message is
delivered at least once and, short of a crash between Slack's answer and the mark,
exactly once. With a bot token the sink posts through `slack_sdk.WebClient` and threads
replies and uploads charts (drawn on the sender thread, never on ingest); with only an
incoming webhook it posts plain messages. Secrets come from the environment.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence

from slack_sdk import WebClient
from slack_sdk.webhook import WebhookClient

from spikewatch.errors import ConfigError, bad_value
from spikewatch.incidents import Incident
from spikewatch.service.notify import digest_notice, follow_up_notice, incident_notice
from spikewatch.service.status import RunStatus
from spikewatch.sinks.outbox import MemoryOutbox, Outbox, OutboxMessage
from spikewatch.sinks.slack_delivery import SlackPoster
from spikewatch.sinks.slack_retry import install_retry_handlers
from spikewatch.sinks.slack_sender import SlackSender
from spikewatch.sinks.slack_settings import SlackSettings, read_secrets
from spikewatch.validation import check_float, check_int

__all__ = ["SlackSettings", "SlackSink"]

logger = logging.getLogger(__name__)


class SlackSink:
    """Delivers incidents, follow-ups and digests from an outbox, off the caller's thread.

    Args:
        client: a `WebClient` with a bot token (threads and chart uploads need it).
        webhook: a `WebhookClient`, used when there is no ``client``.
        channel: where the bot posts (a name such as ``#alerts`` or a channel ID).
        outbox: where messages wait until Slack accepted them; the service passes the
            event store's, so they survive a restart. Default: a `MemoryOutbox`.
        max_queue: unsent messages the default in-memory outbox holds (more are dropped).
        threads: incident key (``run/incident-id``) to thread ts from an earlier process,
            for the default outbox (the event store's outbox keeps its own).
        on_thread: called on the sender with (incident key, ts) when a thread starts.
        max_retries: retries per Slack call on rate limits, 5xx and connection errors.
        max_retry_after_s: a 429 asking to wait longer is not slept on inside the call:
            the row waits in the outbox for that long instead.
        backoff_s: first retry delay inside a call for 5xx and connection errors.
        retry_backoff_s: first delay before a failed row is tried again (doubling).
        max_backoff_s: the longest delay between tries of a row (outages last longer:
            the row is tried at this period until Slack takes it).
        clock: time for retry schedules.
    """

    def __init__(
        self,
        *,
        client: WebClient | None = None,
        webhook: WebhookClient | None = None,
        channel: str | None = None,
        outbox: Outbox | None = None,
        max_queue: int = 1000,
        threads: Mapping[str, str] | None = None,
        on_thread: Callable[[str, str], None] | None = None,
        max_retries: int = 3,
        max_retry_after_s: float = 60.0,
        backoff_s: float = 0.5,
        retry_backoff_s: float = 1.0,
        max_backoff_s: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if client is None and webhook is None:
            raise ConfigError("SlackSink needs client= (a bot token) or webhook=: pass one")
        if client is not None and not channel:
            raise bad_value("channel", channel, "name the channel the bot posts to, e.g. '#alerts'")
        self.client, self.webhook, self.channel = client, webhook, channel
        self.max_queue = check_int("max_queue", max_queue, minimum=1)
        self.max_retries = check_int("max_retries", max_retries, minimum=0)
        self.max_retry_after_s = check_float("max_retry_after_s", max_retry_after_s, minimum=0.0)
        self.backoff_s = check_float("backoff_s", backoff_s, minimum=0.0)
        self.retry_backoff_s = check_float("retry_backoff_s", retry_backoff_s, minimum=0.0)
        self.max_backoff_s = check_float("max_backoff_s", max_backoff_s, minimum=0.0)
        for target in (client, webhook):
            if target is not None:
                install_retry_handlers(
                    target, retries=max_retries, max_wait_s=max_retry_after_s, backoff_s=backoff_s
                )
        self.outbox: Outbox = outbox or MemoryOutbox(max_messages=max_queue, threads=threads)
        known = {**(threads or {}), **self.outbox.threads()}
        self._lock = threading.Lock()
        self._posted: set[str] = set(known)  # incidents handed to the outbox
        self._dropped = 0
        self.sender = SlackSender(
            poster=SlackPoster(client=client, webhook=webhook, channel=channel),
            outbox=self.outbox, threads=known, on_thread=on_thread,
            retry_backoff_s=retry_backoff_s, max_backoff_s=max_backoff_s, clock=clock,
        )  # fmt: skip

    @classmethod
    def from_settings(
        cls,
        settings: SlackSettings,
        environ: Mapping[str, str] = os.environ,
        *,
        outbox: Outbox | None = None,
        threads: Mapping[str, str] | None = None,
        on_thread: Callable[[str, str], None] | None = None,
    ) -> SlackSink | None:
        """Build from ``[slack]`` settings and the secrets in ``environ``.

        Returns None when neither a bot token nor a webhook URL is set. Raises
        `ConfigError` for a bot token without a channel or a malformed webhook URL.
        """
        token, webhook_url = read_secrets(settings, environ)
        client = webhook = None
        if token is not None:
            base_url = settings.base_url or WebClient.BASE_URL
            client = WebClient(token=token, base_url=base_url, timeout=settings.timeout_s)
        elif webhook_url is not None:
            webhook = WebhookClient(webhook_url, timeout=settings.timeout_s)
        else:
            return None
        return cls(
            client=client, webhook=webhook, channel=settings.channel, outbox=outbox,
            max_queue=settings.max_queue, threads=threads, on_thread=on_thread,
            max_retries=settings.max_retries, max_retry_after_s=settings.max_retry_after_s,
            retry_backoff_s=settings.retry_backoff_s, max_backoff_s=settings.max_backoff_s,
        )  # fmt: skip

    # -- public, non-blocking ------------------------------------------------------------

    def incident(
        self,
        incident: Incident,
        window: Sequence[tuple[int, float]],
        *,
        decision_reason: str | None = None,
    ) -> None:
        """Queue the incident message (once per incident; later calls are ignored).

        ``window`` holds (step, value) pairs around the incident, drawn in the chart.
        """
        key = f"{incident.run}/{incident.id}"
        with self._lock:
            if key in self._posted:
                return
            self._posted.add(key)
        self.post([incident_notice(incident, window, decision_reason)])

    def follow_up(self, run: str, incident_id: str, text: str) -> None:
        """Queue a follow-up, posted in the incident's thread when there is one."""
        self.post([follow_up_notice(run, incident_id, text)])

    def digest(self, runs: Sequence[RunStatus], *, period_s: float) -> None:
        """Queue one summary message of ``runs`` over the last ``period_s`` seconds."""
        self.post([digest_notice(runs, period_s)])

    def post(self, messages: Sequence[OutboxMessage]) -> None:
        """Write ``messages`` to the outbox and wake the sender; a message the outbox
        cannot take (full, closed, its store down) is dropped and counted, never raised."""
        stored = 0
        if not self.sender.closing.is_set():
            try:
                stored = self.outbox.add(messages)
            except Exception:  # the caller (ingest, a job) must never fail on Slack's account
                logger.exception("slack sink: the outbox did not take %d messages", len(messages))
        if stored < len(messages):
            with self._lock:
                self._dropped += len(messages) - stored
                dropped = self._dropped
            logger.warning("slack sink: %d messages dropped so far", dropped)
        self.wake()

    def use_outbox(self, outbox: Outbox) -> None:
        """Deliver from ``outbox`` from now on (the service hands over the event
        store's); messages waiting in the old one move over."""
        old, self.outbox = self.outbox, outbox
        moved = old.due(float("inf"), limit=1_000_000)
        outbox.add([row.message for row in moved])
        with self.sender.lock:
            self.sender.threads.update(outbox.threads())
            self._posted.update(self.sender.threads)
        self.sender.outbox = outbox
        self.wake()

    def wake(self) -> None:
        """Rows were added to the outbox: deliver them now rather than at the next poll."""
        self.sender.wake.set()

    def close(self, timeout: float = 5.0) -> None:
        """Deliver the rows due now (up to ``timeout`` seconds), then stop the sender.

        Rows still unsent stay in the outbox: the event store's is resumed by the next
        process; an in-memory one is lost (logged).
        """
        self.sender.join(timeout)
        left = self.pending
        if left:
            logger.warning("slack sink: closed with %d messages still in the outbox", left)

    # -- counters ------------------------------------------------------------------------

    @property
    def delivered(self) -> int:
        """Messages Slack accepted (incidents, follow-ups, digests).

        An incident counts once its message is posted and its chart uploaded (or given
        up after `slack_sender.CHART_TRIES`): a caller that sees the count rise sees both.
        """
        with self.sender.lock:
            return self.sender.delivered

    @property
    def failures(self) -> int:
        """Slack calls that failed after their retries (each is tried again later)."""
        with self.sender.lock:
            return self.sender.failures

    @property
    def dropped(self) -> int:
        """Messages the outbox could not take (full, closed or its store down)."""
        with self._lock:
            return self._dropped

    @property
    def pending(self) -> int:
        """Messages in the outbox not yet accepted by Slack (0 if the outbox cannot say)."""
        try:
            return self.outbox.backlog().messages
        except Exception:  # a store that is down: /healthz says so on its own
            return 0

    @property
    def threads(self) -> dict[str, str]:
        """A copy of incident key (``run/incident-id``) to thread ts."""
        with self.sender.lock:
            return dict(self.sender.threads)
