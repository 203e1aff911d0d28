"""Test helpers for the monitor service: a scripted trainer, curves, metrics, Slack sinks.

Not a pytest plugin: the ``test_service_*`` modules import what they need.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from slack_sdk import WebClient

from conftest import falling_curve
from spikewatch.service.app import create_app
from spikewatch.service.core import Service
from spikewatch.sinks.slack import SlackSink

TOKEN = "service-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
RUN = "gpt-1b"
SLACK_TOKEN = "xoxb-emulator-token"
ONSET = 500
"""The step where `SPIKING` jumps by 3 and stays up."""
HEALTHY = falling_curve(1200, seed=1)
SPIKING = HEALTHY[:ONSET] + [x + 3.0 for x in HEALTHY[ONSET:]]


class Trainer:
    """Sends batches as the trainer-side client does (client id, sequence number, acks);
    keeps every answer."""

    def __init__(self, service: Service, run: str = RUN) -> None:
        self.service, self.run, self.seq = service, run, 0
        self.client = TestClient(create_app(service))
        self.answers: list[dict[str, Any]] = []

    def send(self, losses: list[float], start: int, end: int, **extra: Any) -> dict[str, Any]:
        """Records for steps [start, end) with ``losses[step]``; returns the answer."""
        body = {
            "records": [{"step": s, "loss": losses[s]} for s in range(start, end)],
            "client": "trainer-1",
            "seq": self.seq,
            **extra,
        }
        answer = self.client.post(f"/v1/runs/{self.run}/records", json=body, headers=AUTH)
        assert answer.status_code == 200, answer.text
        self.seq += 1
        self.answers.append(answer.json())
        return self.answers[-1]

    def spike(self, batches: int = 6) -> None:
        """Healthy steps, then the jump at `ONSET`: ``batches`` batches of 100."""
        for b in range(batches):
            self.send(SPIKING, 100 * b, 100 * b + 100)

    def command(self, **body: Any) -> Any:
        """POST an operator command; returns the raw response."""
        return self.client.post(f"/v1/runs/{self.run}/commands", json=body, headers=AUTH)

    def view(self) -> dict[str, Any]:
        """GET /v1/runs/{run}."""
        answer = self.client.get(f"/v1/runs/{self.run}")
        assert answer.status_code == 200, answer.text
        return dict(answer.json())


def metric(exposition: str | bytes, name: str, **labels: str) -> float:
    """One sample of a /metrics answer, read with prometheus_client's own parser."""
    text = exposition.decode() if isinstance(exposition, bytes) else exposition
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    raise AssertionError(f"{name}{labels} is not exported")


def wait_for(condition: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Poll ``condition`` until it holds; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what or condition}")
        time.sleep(0.01)


def delivered(sink: SlackSink | None, n: int) -> None:
    """Wait until ``sink`` has delivered ``n`` messages (its worker posts asynchronously)."""
    assert sink is not None
    wait_for(lambda: sink.delivered >= n, what=f"{n} Slack deliveries ({sink.failures} failed)")


def slack_sink(base_url: str, **kwargs: Any) -> SlackSink:
    """A real SlackSink on a real slack_sdk WebClient at ``base_url`` with fast retries."""
    client = WebClient(token=SLACK_TOKEN, base_url=base_url, timeout=2)
    kwargs.setdefault("max_retries", 1)
    kwargs.setdefault("backoff_s", 0.01)
    kwargs.setdefault("max_retry_after_s", 1.0)
    return SlackSink(client=client, channel="#alerts", **kwargs)
