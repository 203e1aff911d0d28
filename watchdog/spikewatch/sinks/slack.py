"""Slack sink: one message per incident with its chart in the thread, follow-ups, digests.

Every public method only enqueues onto a bounded queue and returns; one daemon worker
thread talks to Slack, so a slow, rate-limited or absent Slack never blocks the caller
(a full queue drops the event and counts it). With a bot token the sink posts through
`slack_sdk.WebClient` and can thread replies and upload charts; with only an incoming
webhook it posts plain messages. Secrets come from the environment, never the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence

from slack_sdk import WebClient
from slack_sdk.errors import SlackClientError
from slack_sdk.webhook import WebhookClient

from spikewatch.errors import ConfigError, bad_value
from spikewatch.incidents import Incident
from spikewatch.service.status import RunStatus
from spikewatch.sinks.slack_messages import (
    SlackMessage,
    digest_message,
    follow_up_message,
    incident_message,
)
from spikewatch.sinks.slack_retry import install_retry_handlers
from spikewatch.sinks.slack_settings import SlackSettings, read_secrets
from spikewatch.validation import check_float, check_int

__all__ = ["SlackSettings", "SlackSink"]

logger = logging.getLogger(__name__)

_Job = tuple[str, Callable[[], object]]
_WEBHOOK_NOTE = "chart not attached: uploading files needs a bot token, not a webhook"


class _DeliveryError(Exception):
    """Slack answered, but not with success (raised and caught inside the worker)."""


class SlackSink:
    """Posts incidents, follow-ups and digests to Slack off the caller's thread.

    Args:
        client: a `WebClient` with a bot token (threads and chart uploads need it).
        webhook: a `WebhookClient`, used when there is no ``client``.
        channel: where the bot posts (a name such as ``#alerts`` or a channel ID).
        max_queue: events waiting for the worker; more are dropped and counted.
        threads: incident key (``run/incident-id``) to thread ts, saved from an earlier
            process, so follow-ups after a restart still land in the right thread.
        on_thread: called on the worker with (incident key, ts) when a thread starts,
            so the service can persist it.
        max_retries: retries per Slack call on rate limits, 5xx and connection errors.
        max_retry_after_s: a 429 asking to wait longer than this is a failure, not a sleep.
        backoff_s: first retry delay for 5xx and connection errors (doubles each time).
    """

    def __init__(
        self,
        *,
        client: WebClient | None = None,
        webhook: WebhookClient | None = None,
        channel: str | None = None,
        max_queue: int = 1000,
        threads: Mapping[str, str] | None = None,
        on_thread: Callable[[str, str], None] | None = None,
        max_retries: int = 3,
        max_retry_after_s: float = 60.0,
        backoff_s: float = 0.5,
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
        self.on_thread = on_thread
        for target in (client, webhook):
            if target is not None:
                install_retry_handlers(
                    target, retries=max_retries, max_wait_s=max_retry_after_s, backoff_s=backoff_s
                )
        self._lock = threading.Lock()
        self._threads: dict[str, str] = dict(threads or {})
        self._posted: set[str] = set(self._threads)  # incidents sent or on their way
        self._delivered = self._failures = self._dropped = 0
        self._closed = False
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=max_queue)
        self._worker = threading.Thread(target=self._run, name="spikewatch-slack", daemon=True)
        self._worker.start()

    @classmethod
    def from_settings(
        cls,
        settings: SlackSettings,
        environ: Mapping[str, str] = os.environ,
        *,
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
            client=client,
            webhook=webhook,
            channel=settings.channel,
            max_queue=settings.max_queue,
            threads=threads,
            on_thread=on_thread,
            max_retries=settings.max_retries,
            max_retry_after_s=settings.max_retry_after_s,
        )

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
        # Copies: the monitor keeps folding into the incident while the worker formats it.
        send = functools.partial(
            self._send_incident, key, dataclasses.replace(incident), list(window), decision_reason
        )
        if not self._enqueue(f"incident {key}", send):
            with self._lock:
                self._posted.discard(key)

    def follow_up(self, run: str, incident_id: str, text: str) -> None:
        """Queue a follow-up, posted in the incident's thread when there is one."""
        send = functools.partial(self._send_follow_up, run, incident_id, text)
        self._enqueue(f"follow-up {run}/{incident_id}", send)

    def digest(self, runs: Sequence[RunStatus], *, period_s: float) -> None:
        """Queue one summary message of ``runs`` over the last ``period_s`` seconds."""
        message = digest_message(list(runs), period_s=period_s)
        self._enqueue("digest", functools.partial(self._send, message, None))

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what is queued (up to ``timeout`` seconds), then stop the worker."""
        deadline = time.monotonic() + timeout
        with self._lock:
            if self._closed:
                return
            self._closed = True
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout)
        self._worker.join(max(0.0, deadline - time.monotonic()))
        if self._worker.is_alive():
            logger.warning(
                "slack sink: worker still busy after %.1f s; %d events left undelivered",
                timeout,
                self._queue.qsize(),
            )

    # -- counters ------------------------------------------------------------------------

    @property
    def delivered(self) -> int:
        """Messages Slack accepted (incidents, follow-ups, digests).

        An incident counts once its message is posted and its chart upload has been
        tried, so a caller that sees the count rise sees the chart too (or a failure).
        """
        with self._lock:
            return self._delivered

    @property
    def failures(self) -> int:
        """Slack calls that failed after their retries (a message or a chart upload)."""
        with self._lock:
            return self._failures

    @property
    def dropped(self) -> int:
        """Events dropped because the queue was full or the sink was closed."""
        with self._lock:
            return self._dropped

    @property
    def pending(self) -> int:
        """Events waiting for the worker."""
        return self._queue.qsize()

    @property
    def threads(self) -> dict[str, str]:
        """A copy of incident key (``run/incident-id``) to thread ts."""
        with self._lock:
            return dict(self._threads)

    # -- worker --------------------------------------------------------------------------

    def _enqueue(self, what: str, send: Callable[[], object]) -> bool:
        with self._lock:
            if not self._closed:
                try:
                    self._queue.put_nowait((what, send))
                    return True
                except queue.Full:
                    pass
            self._dropped += 1
            dropped = self._dropped
        if dropped == 1 or dropped % 100 == 0:
            logger.warning("slack sink: dropped %s (%d dropped so far)", what, dropped)
        return False

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            what, send = job
            try:
                send()
            except Exception as exc:  # the worker must outlive any one bad call
                self._failed(what, exc)
            else:
                with self._lock:
                    self._delivered += 1

    def _failed(self, what: str, exc: Exception) -> None:
        with self._lock:
            self._failures += 1
        if isinstance(exc, (SlackClientError, _DeliveryError, OSError)):
            logger.warning("slack sink: %s failed: %s: %s", what, type(exc).__name__, exc)
        else:
            logger.exception("slack sink: %s failed unexpectedly", what)

    def _send(self, message: SlackMessage, thread_ts: str | None) -> tuple[str, str] | None:
        """Post ``message``; return (channel id, ts) when posted with the bot token."""
        if self.client is None:
            assert self.webhook is not None  # the constructor requires one of the two
            response = self.webhook.send(text=message.text, blocks=message.blocks)
            if response.status_code != 200:
                raise _DeliveryError(f"webhook answered {response.status_code}: {response.body}")
            return None
        answer = self.client.chat_postMessage(
            channel=str(self.channel), text=message.text, blocks=message.blocks, thread_ts=thread_ts
        )
        return str(answer["channel"]), str(answer["ts"])

    def _send_incident(
        self, key: str, incident: Incident, window: list[tuple[int, float]], reason: str | None
    ) -> None:
        note = None if self.client is not None else _WEBHOOK_NOTE
        message = incident_message(incident, window, decision_reason=reason, note=note)
        try:
            posted = self._send(message, None)
        except Exception:
            with self._lock:
                self._posted.discard(key)  # let a later call for this incident try again
            raise
        if posted is None:
            return
        channel_id, ts = posted
        with self._lock:
            self._threads[key] = ts
        if self.on_thread is not None:
            try:
                self.on_thread(key, ts)
            except Exception:
                logger.exception("slack sink: on_thread callback failed for %s", key)
        self._upload_chart(channel_id, ts, incident, window)

    def _upload_chart(
        self, channel_id: str, ts: str, incident: Incident, window: list[tuple[int, float]]
    ) -> None:
        from spikewatch.sinks.chart import render_incident_chart  # noqa: PLC0415 (slow matplotlib)

        assert self.client is not None
        title = f"{incident.run}: {incident.kind} on {incident.metric} (incident {incident.id})"
        try:
            png = render_incident_chart(
                window,
                onset_step=incident.onset_step,
                detected_step=incident.detected_step,
                title=title,
                metric=incident.metric,
            )
            self.client.files_upload_v2(
                channel=channel_id,
                thread_ts=ts,
                content=png,
                filename=re.sub(r"[^A-Za-z0-9._-]+", "-", f"{incident.run}-{incident.id}") + ".png",
                title=title,
                alt_txt=f"{incident.metric} around step {incident.detected_step}",
            )
        except Exception as exc:
            self._failed(f"chart of incident {incident.run}/{incident.id}", exc)

    def _send_follow_up(self, run: str, incident_id: str, text: str) -> None:
        with self._lock:
            ts = self._threads.get(f"{run}/{incident_id}")
        threaded = ts is not None and self.client is not None
        self._send(follow_up_message(run, incident_id, text, threaded=threaded), ts)
