"""The Slack calls of the sink: post a message, upload a chart, read a Retry-After.

Only the sink's sender thread calls these; they block (with the client's timeout and
bounded retries, see `slack_retry`), which is why nothing else does.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from slack_sdk.webhook import WebhookClient

from spikewatch.incidents import Incident
from spikewatch.sinks.slack_messages import SlackMessage


class DeliveryError(Exception):
    """Slack answered, but not with success.

    Attributes:
        retry_after_s: what a 429 asked to wait (0 when it did not say).
    """

    def __init__(self, message: str, *, retry_after_s: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def _retry_after(status: int, headers: Mapping[str, Any]) -> float:
    if status != 429:
        return 0.0
    for name, value in headers.items():
        if name.lower() == "retry-after":
            text = value[0] if isinstance(value, (list, tuple)) else value
            try:
                return max(0.0, float(text))
            except (TypeError, ValueError):
                return 0.0
    return 0.0


def retry_after_of(exc: BaseException) -> float:
    """Seconds a rate-limited Slack asked the sender to wait (0 for other failures).

    Example:
        >>> retry_after_of(DeliveryError("webhook answered 429", retry_after_s=30))
        30
        >>> retry_after_of(OSError("connection refused"))
        0.0
    """
    if isinstance(exc, DeliveryError):
        return exc.retry_after_s
    if isinstance(exc, SlackApiError):
        response = exc.response
        return _retry_after(int(response.status_code), dict(response.headers or {}))
    return 0.0


class SlackPoster:
    """Posts through a bot token's `WebClient` (threads, charts) or an incoming webhook."""

    def __init__(
        self, *, client: WebClient | None, webhook: WebhookClient | None, channel: str | None
    ) -> None:
        self.client, self.webhook, self.channel = client, webhook, channel

    def post(self, message: SlackMessage, thread_ts: str | None) -> tuple[str, str] | None:
        """Post ``message``; return (channel id, ts) when posted with the bot token."""
        if self.client is None:
            if self.webhook is None:
                raise DeliveryError("no Slack client: give the sink client= or webhook=")
            response = self.webhook.send(text=message.text, blocks=message.blocks)
            if response.status_code != 200:
                raise DeliveryError(
                    f"webhook answered {response.status_code}: {response.body}",
                    retry_after_s=_retry_after(response.status_code, response.headers or {}),
                )
            return None
        answer = self.client.chat_postMessage(
            channel=str(self.channel), text=message.text, blocks=message.blocks, thread_ts=thread_ts
        )
        return str(answer["channel"]), str(answer["ts"])

    def upload_chart(
        self, channel_id: str, ts: str, incident: Incident, window: list[tuple[int, float]]
    ) -> None:
        """Draw the incident's chart and upload it into its thread (bot token only)."""
        from spikewatch.sinks.chart import render_incident_chart  # noqa: PLC0415 (slow matplotlib)

        if self.client is None:
            return
        title = f"{incident.run}: {incident.kind} on {incident.metric} (incident {incident.id})"
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
