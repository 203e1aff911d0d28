"""The trainer's client at its edges (issue 14, item 7): close() within its timeout, run
ids the service refuses caught at construction, refusals that no retry can fix."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from service_process import TOKEN, ServiceProcess
from spikewatch.errors import ConfigError
from spikewatch.http_transport import HttpTransport
from spikewatch.records import StepRecord


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    with ServiceProcess(tmp_path_factory.mktemp("edges")) as svc:
        yield svc


@pytest.fixture
def black_hole() -> Iterator[str]:
    """A port that accepts connections and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


def records(start: int, end: int, run: str = "r") -> list[StepRecord]:
    return [StepRecord(run=run, step=s, loss=2.0) for s in range(start, end)]


@pytest.mark.parametrize("where", ["refused", "black-hole"])
def test_close_returns_within_its_timeout_when_the_service_is_dead(
    where: str, black_hole: str
) -> None:
    url = "http://127.0.0.1:9" if where == "refused" else black_hole
    t = HttpTransport(url, run="r", token=TOKEN, flush_interval_s=0.05)  # 10 s socket timeout
    t.submit(records(0, 10))
    time.sleep(0.3)  # the sender is retrying (or stuck in a request)
    started = time.monotonic()
    t.close(timeout=2.0)
    assert time.monotonic() - started < 2.5  # the landed code took 10.3-18.7 s at 10 s


@pytest.mark.parametrize("run", ["gpt 1b", "runé", "x" * 129, "exp/1", "nl\n", ""])
def test_a_run_id_the_service_refuses_fails_at_construction(run: str) -> None:
    with pytest.raises(ConfigError, match=r"run=.* is invalid: use 1-128 of"):
        HttpTransport("http://127.0.0.1:9", run=run, token=TOKEN)


def test_a_wrong_token_stops_the_client_once_with_the_fix(
    service: ServiceProcess, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="spikewatch.http_transport")
    t = HttpTransport(service.url, run="r", token="not-the-token-0123", flush_interval_s=0.02)
    t.submit(records(0, 5))
    deadline = time.monotonic() + 10
    while t.refused is None and time.monotonic() < deadline:
        time.sleep(0.01)
    t.submit(records(5, 10))
    time.sleep(0.3)  # a retrying client would have logged again by now
    t.close(timeout=1.0)
    assert (t.refused, t.failures, t.sent, t.dropped) == (403, 1, 0, 10)
    lines = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1
    assert "403" in lines[0].getMessage() and "token" in lines[0].getMessage()


def test_rejected_batches_are_counted_and_logged_once(
    service: ServiceProcess, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="spikewatch.http_transport")
    t = HttpTransport(service.url, run="rejects", token=TOKEN, flush_interval_s=0.02)
    for step in range(5):
        bad = StepRecord(run="rejects", step=step, loss="high")  # type: ignore[arg-type]
        t.submit([bad])
        assert t.flush(timeout=10)
    t.close(timeout=2.0)
    assert (t.rejected, t.failures, t.sent) == (5, 5, 0)
    lines = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert "records[0].loss" in lines[0].getMessage()


def test_a_good_client_after_a_refused_one_is_delivered(service: ServiceProcess) -> None:
    t = HttpTransport(service.url, run="good", token=TOKEN, flush_interval_s=0.02)
    t.submit(records(0, 50, run="good"))
    assert t.flush(timeout=10)
    t.close(timeout=2.0)
    assert (t.sent, t.failures, t.refused) == (50, 0, None)
    assert service.get("/v1/runs/good")[1]["records"] == 50


def test_close_on_a_live_service_still_finishes_the_run(tmp_path: Path) -> None:
    with ServiceProcess(tmp_path) as svc:
        t = HttpTransport(svc.url, run="done", token=TOKEN, flush_interval_s=0.02)
        t.submit(records(0, 20, run="done"))
        t.close(timeout=5.0)
        assert svc.get("/v1/runs/done")[1]["state"] == "finished"


def test_a_guard_with_a_run_id_the_service_refuses_fails_at_construction() -> None:
    options = pytest.importorskip("spikewatch_hooks.core.options")
    with pytest.raises(ConfigError, match=r"run_id='gpt 1b' is invalid"):
        options.GuardOptions.build(run_id="gpt 1b", monitor_url="http://127.0.0.1:9", token=TOKEN)
    embedded = options.GuardOptions.build(run_id="gpt 1b")  # no service: any name will do
    assert embedded.run_id == "gpt 1b"
