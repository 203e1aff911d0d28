"""The durable Slack outbox of the service: messages survive outages, long Retry-Afters and
persistent errors, each delivered once, in thread order; the backlog shows in /metrics.

Real components: the service as `spikewatch serve` builds it (event store on disk, the
Slack sink on a real slack_sdk WebClient) and the local Slack emulator.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from prometheus_server import free_port
from service_client import HEALTHY, SLACK_TOKEN, TOKEN, Trainer, metric, wait_for
from slack_emulator import SlackEmulator, running_emulator
from spikewatch.service.config import ServiceConfig
from spikewatch.service.core import Service
from spikewatch.sinks.outbox import MemoryOutbox, OutboxMessage, retry_delay

FAST = {"timeout_s": 2, "max_retries": 0, "retry_backoff_s": 0.05, "max_backoff_s": 0.3}


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def emulator() -> Iterator[SlackEmulator]:
    with running_emulator() as emu:
        yield emu


def build(tmp_path: Path, base_url: str, **slack: Any) -> Service:
    settings = {"channel": "#alerts", "base_url": base_url, **FAST, **slack}
    config = ServiceConfig(db=str(tmp_path / "events.db"), slack=settings)
    return Service.from_config(config, token=TOKEN, environ={"SLACK_BOT_TOKEN": SLACK_TOKEN})


@pytest.fixture
def service(tmp_path: Path, emulator: SlackEmulator) -> Iterator[Service]:
    svc = build(tmp_path, emulator.url + "/api/")
    yield svc
    svc.stop()


def announced_runs(emulator: SlackEmulator) -> list[str]:
    """The run of every incident message Slack took (the header ends "in RUN")."""
    return sorted(
        str(c.payload["blocks"][0]["text"]["text"]).rsplit(" in ", 1)[-1]
        for c in emulator.posted()
        if "thread_ts" not in c.payload
    )


def spike_runs(service: Service, n: int) -> list[Trainer]:
    trainers = [Trainer(service, run=f"run-{i}") for i in range(n)]
    for trainer in trainers:
        trainer.spike()  # one rollback incident each
    return trainers


def test_an_outage_longer_than_the_retry_after_cap_delivers_every_message_once_after_it(
    service: Service, emulator: SlackEmulator
) -> None:
    # Slack asks for 2 s twice; the sink sleeps at most 1 s inside a call (the old sink
    # failed these for good: 0 of 12 arrived). Now the rows wait it out in the outbox.
    emulator.fail_next(2, status=429, retry_after=2, method="chat.postMessage")
    start = time.monotonic()
    spike_runs(service, 3)
    assert service.slack is not None
    wait_for(lambda: service.store.outbox.backlog().messages == 0, timeout=30, what="outbox empty")
    assert time.monotonic() - start >= 4.0  # both Retry-Afters were honoured
    assert announced_runs(emulator) == ["run-0", "run-1", "run-2"]
    assert len(emulator.calls_to("files.completeUploadExternal")) == 3  # and every chart
    assert service.slack.failures == 2


def test_persistent_server_errors_then_recovery_deliver_all_once_and_in_thread(
    service: Service, emulator: SlackEmulator
) -> None:
    emulator.fail_next(12, status=500, method="chat.postMessage")
    trainers = spike_runs(service, 3)
    first = trainers[0]
    cmd = first.answers[-1]["commands"][0]
    restart = cmd["rollback_before_step"] + 1
    first.send(HEALTHY, restart, restart + 100, acks=[cmd["id"]], rewind_to=restart)
    assert service.slack is not None
    wait_for(lambda: service.store.outbox.backlog().messages == 0, timeout=30, what="outbox empty")
    assert announced_runs(emulator) == ["run-0", "run-1", "run-2"]
    (applied,) = emulator.posted("rollback applied")
    # Queued while its incident could not be posted, it waited and landed in the thread.
    assert applied.payload["thread_ts"] == service.slack.threads[f"run-0/{cmd['incident']}"]
    assert len(emulator.calls_to("chat.postMessage", status=500)) == 12
    assert (service.slack.failures, service.slack.delivered) == (12, 4)


def test_the_outbox_depth_and_age_are_in_metrics_and_healthz(tmp_path: Path) -> None:
    down = f"http://127.0.0.1:{free_port()}/api/"  # nothing listens there
    service = build(tmp_path, down, retry_backoff_s=5.0)
    try:
        (trainer,) = spike_runs(service, 1)
        time.sleep(1.2)
        exposition = trainer.client.get("/metrics").text
        assert metric(exposition, "spikewatch_outbox_messages", sink="slack") == 1
        age = metric(exposition, "spikewatch_outbox_oldest_age_seconds", sink="slack")
        assert 1.0 <= age < 30.0
        health = trainer.client.get("/healthz").json()["slack"]
        assert health["outbox_messages"] == 1
    finally:
        service.stop()


def test_a_restarted_service_resumes_the_outbox(tmp_path: Path, emulator: SlackEmulator) -> None:
    down = f"http://127.0.0.1:{free_port()}/api/"
    service = build(tmp_path, down, retry_backoff_s=60.0)
    spike_runs(service, 2)
    wait_for(lambda: service.slack is not None and service.slack.failures >= 1, what="a failure")
    service.stop()
    assert emulator.posted() == []
    service = build(tmp_path, emulator.url + "/api/")  # same event store, Slack back
    try:
        wait_for(lambda: service.store.outbox.backlog().messages == 0, what="outbox resumed")
        assert announced_runs(emulator) == ["run-0", "run-1"]
    finally:
        service.stop()


def test_without_slack_nothing_waits_in_the_outbox(tmp_path: Path) -> None:
    config = ServiceConfig(db=str(tmp_path / "events.db"))
    service = Service.from_config(config, token=TOKEN, environ={})
    try:
        spike_runs(service, 1)
        assert service.store.outbox.backlog().messages == 0  # no stuck-outbox alert, ever
    finally:
        service.stop()


def test_memory_outbox_keeps_thread_order_and_retry_delays_grow_to_the_cap() -> None:
    box = MemoryOutbox(clock=lambda: 0.0)
    box.add([
        OutboxMessage(kind="incident", key="r/i1", body={}),
        OutboxMessage(kind="follow_up", key="r/i1", body={}),
        OutboxMessage(kind="digest", key="", body={}),
    ])  # fmt: skip
    assert [r.id for r in box.due(0.0, limit=10)] == [1, 3]  # 2 waits for 1
    box.failed(1, next_try=5.0, error="500")
    assert [r.id for r in box.due(1.0, limit=10)] == [3]  # still behind 1
    box.sent(1, now=5.0)
    assert [r.id for r in box.due(5.0, limit=10)] == [2, 3]
    delays = [retry_delay(n, first_s=1.0, max_s=8.0) for n in range(1, 7)]
    assert [int(d) for d in delays] == [1, 2, 4, 8, 8, 8]


def test_a_store_that_is_down_leaves_healthz_and_metrics_answering(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*args: Any) -> Any:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(service.store.outbox, "backlog", fail)
    monkeypatch.setattr(service.store, "ping", fail)
    trainer = Trainer(service)
    health = trainer.client.get("/healthz")
    assert health.status_code == 503 and health.json()["status"] == "down"
    assert health.json()["slack"]["outbox_messages"] is None  # unknown, not 0
    exposition = trainer.client.get("/metrics").text
    assert metric(exposition, "spikewatch_sink_failures_total", sink="slack") == 0
    assert "spikewatch_outbox_messages{" not in exposition
