"""`kill -9` of a real `spikewatch serve` while Slack hangs loses no Slack message.

Before the outbox, an incident was marked announced (committed with the ingest) while its
message waited in memory: 4 of 5 rollback incidents never reached Slack after a kill.
Here 5 runs spike, Slack holds the first post, the service is killed, the held request
is dropped unanswered (Slack never had it), and a restarted service delivers all 5,
each once, each with its chart.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from service_client import SLACK_TOKEN, SPIKING, wait_for
from service_process import ServiceProcess
from slack_emulator import SlackEmulator, running_emulator

RUNS = [f"run-{i}" for i in range(5)]


@pytest.fixture
def emulator() -> Iterator[SlackEmulator]:
    with running_emulator() as emu:
        yield emu


def spike(svc: ServiceProcess, run: str) -> None:
    """Healthy steps, then the jump at step 500 (a rollback incident), as one client."""
    for b in range(6):
        records = [{"step": s, "loss": SPIKING[s]} for s in range(100 * b, 100 * b + 100)]
        body = {"records": records, "client": "trainer-1", "seq": b}
        status, answer = svc.post(f"/v1/runs/{run}/records", body)
        assert status == 200, answer


def test_kill_9_while_slack_hangs_then_restart_delivers_every_incident_once(
    tmp_path: Path, emulator: SlackEmulator
) -> None:
    config = (
        f'[slack]\nchannel = "#alerts"\nbase_url = "{emulator.url}/api/"\n'
        "timeout_s = 30\nmax_retries = 0\nretry_backoff_s = 0.1\nmax_backoff_s = 0.5\n"
    )
    svc = ServiceProcess(tmp_path, config=config, env={"SLACK_BOT_TOKEN": SLACK_TOKEN})
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        svc.env.pop(name, None)  # slack_sdk would send even loopback requests through one
    emulator.hang(60.0)
    svc.start()
    try:
        for run in RUNS:
            spike(svc, run)
        wait_for(lambda: len(emulator.calls) >= 1, what="the first post, held by Slack")
        svc.kill()
        emulator.hang(None, answer_held=False)  # the held post dies with the connection
        assert emulator.posted() == []
        svc.start()
        wait_for(
            lambda: len(emulator.calls_to("files.completeUploadExternal")) >= len(RUNS),
            timeout=60,
            what=f"5 incidents and charts delivered\n{svc.log()}",
        )
        # A row is marked sent when the service has Slack's answer, a moment after the
        # emulator saw the call: wait for the outbox to drain rather than race it.
        wait_for(
            lambda: svc.get("/healthz")[1]["slack"]["outbox_messages"] == 0,
            timeout=30,
            what=f"the outbox drained\n{svc.log()}",
        )
    finally:
        svc.stop()
    headers = [str(c.payload["blocks"][0]["text"]["text"]) for c in emulator.posted()]
    assert sorted(h.rsplit(" in ", 1)[-1] for h in headers) == RUNS  # each once
    assert len(emulator.calls_to("files.completeUploadExternal")) == len(RUNS)
