"""An incident's whole story in Slack, through the HTTP API and the run registry, into a
real SlackSink (slack_sdk WebClient) on the local Slack emulator; and a Slack that fails."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from prometheus_server import free_port
from service_client import (
    HEALTHY,
    RUN,
    SLACK_TOKEN,
    TOKEN,
    Trainer,
    delivered,
    metric,
    slack_sink,
    wait_for,
)
from slack_emulator import Call, SlackEmulator, channel_id, running_emulator
from spikewatch.service.config import ServiceConfig
from spikewatch.service.core import Service
from spikewatch.sinks.slack import SlackSink

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # slack_sdk sends every request through $HTTPS_PROXY when set, loopback included.
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def emulator() -> Iterator[SlackEmulator]:
    with running_emulator() as emu:
        yield emu


def start(tmp_path: Path, sink: SlackSink) -> tuple[Service, Trainer]:
    service = Service(ServiceConfig(db=str(tmp_path / "events.db")), token=TOKEN, slack=sink)
    return service, Trainer(service)


@pytest.fixture
def story(tmp_path: Path, emulator: SlackEmulator) -> Iterator[tuple[Service, Trainer]]:
    """The service as `spikewatch serve` builds it: Slack from [slack] and the environment."""
    slack = {"channel": "#alerts", "base_url": emulator.url + "/api/", "timeout_s": 2}
    config = ServiceConfig(db=str(tmp_path / "events.db"), slack=slack)
    service = Service.from_config(config, token=TOKEN, environ={"SLACK_BOT_TOKEN": SLACK_TOKEN})
    yield service, Trainer(service)
    service.stop()


def texts(calls: list[Call]) -> list[str]:
    return [str(c.payload["text"]) for c in calls]


def test_a_rollback_incident_is_one_message_with_its_chart_in_the_thread(
    story: tuple[Service, Trainer], emulator: SlackEmulator
) -> None:
    service, trainer = story
    trainer.spike(batches=8)  # the rollback is re-sent twice: still one announcement
    (cmd,) = trainer.answers[-1]["commands"]
    delivered(service.slack, 1)
    (post,) = emulator.calls_to("chat.postMessage")
    assert "thread_ts" not in post.payload
    assert post.payload["blocks"][0]["text"]["text"].endswith(f"in {RUN}")
    fields = json.dumps(post.payload["blocks"])
    assert "*Onset step*\\n500" in fields
    assert "`rollback`" in fields
    (upload,) = emulator.calls_to("upload")
    assert upload.body.startswith(PNG)
    (complete,) = emulator.calls_to("files.completeUploadExternal")
    assert complete.payload["channel_id"] == channel_id("#alerts")
    assert service.slack is not None
    ts = service.slack.threads[f"{RUN}/{cmd['incident']}"]
    assert complete.payload["thread_ts"] == ts
    assert service.store.threads() == {f"{RUN}/{cmd['incident']}": ts}  # survives a restart


def test_ack_and_recovery_follow_up_in_the_thread(
    story: tuple[Service, Trainer], emulator: SlackEmulator
) -> None:
    service, trainer = story
    trainer.spike()
    cmd = trainer.answers[-1]["commands"][0]
    delivered(service.slack, 1)
    restart = cmd["rollback_before_step"] + 1
    trainer.send(HEALTHY, restart, restart + 100, acks=[cmd["id"]], rewind_to=restart)
    delivered(service.slack, 2)
    _, applied = emulator.calls_to("chat.postMessage")
    assert service.slack is not None
    ts = service.slack.threads[f"{RUN}/{cmd['incident']}"]
    assert applied.payload["thread_ts"] == ts
    assert applied.payload["text"].startswith("rollback applied")
    assert f"step {cmd['rollback_before_step']}" in applied.payload["text"]

    # Healthy again: "recovered" once the run is RECOVERY_STEPS past the detection step.
    step = restart + 100
    while step <= cmd["issued_step"] + 100:
        trainer.send(HEALTHY, step, step + 50)
        step += 50
    delivered(service.slack, 3)
    recovered = emulator.calls_to("chat.postMessage")[2]
    assert recovered.payload["thread_ts"] == ts
    assert recovered.payload["text"].startswith("recovered: step ")
    trainer.send(HEALTHY, step, step + 100)
    assert len(texts(emulator.calls_to("chat.postMessage"))) == 3  # said once
    assert service.slack.failures == 0


def fail_500(emulator: SlackEmulator) -> str:
    emulator.fail_next(1000, status=500)
    return emulator.url + "/api/"


def fail_429(emulator: SlackEmulator) -> str:
    emulator.fail_next(1000, status=429, retry_after=30)  # longer than the sink will wait
    return emulator.url + "/api/"


def slack_down(emulator: SlackEmulator) -> str:
    return f"http://127.0.0.1:{free_port()}/api/"  # nothing listens there


@pytest.mark.parametrize("fault", [fail_500, fail_429, slack_down])
def test_a_failing_slack_never_fails_ingest_and_is_counted(
    tmp_path: Path, emulator: SlackEmulator, fault: Callable[[SlackEmulator], str]
) -> None:
    service, trainer = start(tmp_path, slack_sink(fault(emulator)))
    try:
        trainer.spike(batches=7)  # every answer was 200 (Trainer.send checks)
        cmd = trainer.answers[-1]["commands"][0]
        trainer.send(HEALTHY, 401, 501, acks=[cmd["id"]], rewind_to=401)
        assert trainer.view()["rollbacks"] == 1
        assert service.slack is not None
        sink = service.slack
        # The incident and its "rollback applied" follow-up wait in the outbox (a 429 asking
        # for 30 s holds them that long) instead of being lost.
        wait_for(lambda: sink.failures >= 1, what="failures counted")
        exposition = trainer.client.get("/metrics").text
        failed = metric(exposition, "spikewatch_sink_failures_total", sink="slack")
        assert failed == sink.failures >= 1
        assert metric(exposition, "spikewatch_sink_deliveries_total", sink="slack") == 0
        assert metric(exposition, "spikewatch_outbox_messages", sink="slack") == 2
        assert trainer.client.get("/healthz").json()["slack"]["failures"] == failed
    finally:
        service.stop()


def test_from_config_reads_slack_secrets_from_the_environ_it_is_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The process environment has a bot token but the config names no channel; the
    # environ passed in (the one the service is told to use) has no Slack secret at all.
    monkeypatch.setenv("SLACK_BOT_TOKEN", "xoxb-from-the-process")
    config = ServiceConfig(db=str(tmp_path / "events.db"))
    service = Service.from_config(config, token=TOKEN, environ={})
    assert service.slack is None
    service.stop()
