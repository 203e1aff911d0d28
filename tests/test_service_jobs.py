"""The scheduled jobs of `spikewatch serve`, called directly on a fake clock, into a real
SlackSink (slack_sdk) talking to the local Slack emulator; then the real APScheduler."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service_client import HEALTHY, TOKEN, delivered, metric, slack_sink, wait_for
from slack_emulator import Call, SlackEmulator, running_emulator
from spikewatch.service import jobs
from spikewatch.service.app import create_app
from spikewatch.service.config import ServiceConfig
from spikewatch.service.core import Service
from spikewatch.service.payloads import parse_ingest
from spikewatch.service.registry import RunRegistry
from spikewatch.service.sweep import find_level_shift

STALL_AFTER = 300.0


class FakeClock:
    """Unix time that moves only when told to."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # slack_sdk sends every request through $HTTPS_PROXY when set, loopback included.
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def emulator() -> Iterator[SlackEmulator]:
    with running_emulator() as emu:
        yield emu


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_service(
    tmp_path: Path, emulator: SlackEmulator, clock: FakeClock
) -> Iterator[Callable[..., Service]]:
    """Build Services on the fake clock with a Slack sink; stop them after the test."""
    services: list[Service] = []

    def make(**config: Any) -> Service:
        config.setdefault("stall_after_s", STALL_AFTER)
        db = str(tmp_path / f"events-{len(services)}.db")
        sink = slack_sink(emulator.url + "/api/")
        services.append(
            Service(ServiceConfig(db=db, **config), token=TOKEN, slack=sink, clock=clock)
        )
        return services[-1]

    yield make
    for service in services:
        service.stop()


@pytest.fixture
def service(make_service: Callable[..., Service]) -> Service:
    return make_service()


def feed(registry: RunRegistry, run: str, losses: list[float], start: int, end: int) -> None:
    """Ingest steps [start, end) in batches of 100, as the HTTP handler does."""
    for first in range(start, end, 100):
        steps = range(first, min(first + 100, end))
        body = json.dumps({"records": [{"step": s, "loss": losses[s]} for s in steps]}).encode()
        registry.ingest(run, parse_ingest(json.loads(body), run, max_records=1000), body)


def posts(emulator: SlackEmulator) -> list[Call]:
    return emulator.calls_to("chat.postMessage")


# -- stalls ----------------------------------------------------------------------------
def test_a_silent_run_is_stalled_and_announced(
    service: Service, clock: FakeClock, emulator: SlackEmulator
) -> None:
    feed(service.registry, "quiet", HEALTHY, 0, 100)
    feed(service.registry, "busy", HEALTHY, 0, 100)
    clock.advance(STALL_AFTER)
    assert jobs.check_stalls(service.registry) == 0  # not yet: exactly stall_after_s
    clock.advance(1.0)
    feed(service.registry, "busy", HEALTHY, 100, 200)
    assert jobs.check_stalls(service.registry) == 1
    assert jobs.check_stalls(service.registry) == 0  # announced once
    states = {s.run: s.state for s in service.registry.statuses()}
    assert states == {"quiet": "stalled", "busy": "active"}
    (incident,) = service.store.incidents("quiet")
    assert (incident["kind"], incident["status"], incident["onset_step"]) == ("stall", "open", 99)
    assert f"no records for {STALL_AFTER + 1:.0f} s" in incident["reason"]
    exposition = service.render_metrics()[0]
    assert metric(exposition, "spikewatch_run_state", run="quiet", state="stalled") == 1
    delivered(service.slack, 1)
    (post,) = posts(emulator)
    assert "quiet" in post.payload["text"]
    assert "no records for" in json.dumps(post.payload["blocks"])


def test_records_after_a_stall_close_it_with_a_follow_up_in_its_thread(
    service: Service, clock: FakeClock, emulator: SlackEmulator
) -> None:
    feed(service.registry, "quiet", HEALTHY, 0, 100)
    clock.advance(STALL_AFTER + 60)
    assert jobs.check_stalls(service.registry) == 1
    delivered(service.slack, 1)
    feed(service.registry, "quiet", HEALTHY, 100, 200)
    assert service.registry.status("quiet").state == "active"  # type: ignore[union-attr]
    (incident,) = service.store.incidents("quiet")
    assert (incident["status"], incident["end_step"]) == ("closed", 199)
    delivered(service.slack, 2)
    first, follow_up = posts(emulator)
    assert "thread_ts" not in first.payload
    assert service.slack is not None
    assert follow_up.payload["thread_ts"] == service.slack.threads[f"quiet/{incident['id']}"]
    assert "records arrive again" in follow_up.payload["text"]
    assert jobs.check_stalls(service.registry) == 0


# -- change-point sweep ----------------------------------------------------------------
def staircase(rise: float, *, start: int = 600, n: int = 1100, seed: int = 1) -> list[float]:
    """Loss 2.0 (noise 0.05), then five steps of ``rise / 5``, one every 5 steps, that stay."""
    rng = random.Random(seed)
    level = [2.0 + rise * min(5, max(0, (i - start) // 5 + 1)) / 5 for i in range(n)]
    return [x + rng.gauss(0.0, 0.05) for x in level]


@pytest.mark.parametrize("rise", [0.3, 0.4, 0.6])
def test_the_sweep_finds_a_stepwise_rise_stage_1_missed(
    service: Service, emulator: SlackEmulator, rise: float
) -> None:
    feed(service.registry, "climb", staircase(rise), 0, 1000)
    assert service.store.incidents("climb") == []  # stage 1 let it by
    assert jobs.sweep(service.registry) == 1
    (incident,) = service.store.incidents("climb")
    assert incident["kind"] == "level_shift"
    assert 580 <= incident["onset_step"] <= 625  # within min_size (20) of step 600
    assert service.registry.status("climb").signals == {"level_shift": 1}  # type: ignore[union-attr]
    delivered(service.slack, 1)
    (post,) = posts(emulator)
    assert post.payload["text"].startswith("Level shift in climb")
    feed(service.registry, "climb", staircase(rise), 1000, 1100)
    assert jobs.sweep(service.registry) == 0  # the same shift again is no new incident
    assert len(service.store.incidents("climb")) == 1


def test_the_sweep_does_not_repeat_what_stage_1_found(
    service: Service, emulator: SlackEmulator
) -> None:
    rng = random.Random(1)
    jump = [2.0 + 0.3 * (i >= 700) + rng.gauss(0.0, 0.05) for i in range(1000)]
    feed(service.registry, "jump", jump, 0, 1000)
    (found,) = service.store.incidents("jump")
    shift = find_level_shift(range(1000), jump)
    assert shift is not None and abs(shift.onset_step - found["onset_step"]) <= 5
    assert jobs.sweep(service.registry) == 0
    assert service.store.incidents("jump") == [found]


def test_the_sweep_skips_runs_with_nothing_new(service: Service) -> None:
    feed(service.registry, "climb", staircase(0.3), 0, 1000)
    assert jobs.sweep(service.registry) == 1
    assert jobs.sweep(service.registry) == 0
    assert service.registry.runs["climb"].swept_step == 999


# -- digest and retention --------------------------------------------------------------
def test_the_digest_is_one_message_covering_every_run(
    service: Service, emulator: SlackEmulator
) -> None:
    for run in ("alpha", "beta", "gamma"):
        feed(service.registry, run, HEALTHY, 0, 100)
    service.operator.apply("beta", action="halt", reason="bad shard")
    assert jobs.digest(service.registry) == 3
    delivered(service.slack, 1)
    (post,) = posts(emulator)
    assert "3 runs (1 halted, 0 stalled)" in post.payload["text"]
    lines = [b["text"]["text"] for b in post.payload["blocks"] if b["type"] == "section"]
    assert [line.split("*")[1] for line in lines[1:]] == ["beta", "alpha", "gamma"]


def test_retention_keeps_the_newest_records_of_each_run(
    make_service: Callable[..., Service],
) -> None:
    service = make_service(keep_records=250, keep_snapshots=2, state_every_s=0.0)
    feed(service.registry, "long", HEALTHY, 0, 1000)
    feed(service.registry, "short", HEALTHY, 0, 200)
    assert jobs.retention(service.registry) == 7  # whole batches: 300 of "long" stay
    assert service.store.record_count("long") == 300
    assert service.store.record_count("short") == 200
    steps = [r["step"] for r in service.store.recent_records("long", limit=1000)]
    assert steps == list(range(700, 1000))
    assert jobs.retention(service.registry) == 0


# -- job health ------------------------------------------------------------------------
def test_a_failing_job_is_counted_and_shown_in_healthz(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(registry: RunRegistry) -> int:
        raise RuntimeError("digest template broke")

    interval, working = service.jobs.jobs["digest"]
    monkeypatch.setitem(service.jobs.jobs, "digest", (interval, broken))
    assert service.jobs.run("digest") is None
    client = TestClient(create_app(service))
    health = client.get("/healthz").json()
    (digest,) = [j for j in health["jobs"] if j["job"] == "digest"]
    assert (digest["runs"], digest["failures"]) == (1, 1)
    assert digest["last_error"] == "RuntimeError: digest template broke"
    assert digest["last_success_time"] is None
    exposition = client.get("/metrics").text
    assert metric(exposition, "spikewatch_job_failures_total", job_id="digest") == 1
    monkeypatch.setitem(service.jobs.jobs, "digest", (interval, working))
    assert service.jobs.run("digest") == 0
    (digest,) = [j for j in service.health()["jobs"] if j["job"] == "digest"]
    assert (digest["runs"], digest["failures"], digest["last_error"]) == (2, 1, None)


def test_the_scheduler_runs_every_job_and_healthz_shows_the_next_run(tmp_path: Path) -> None:
    intervals: dict[str, Any] = {
        name: 0.1 for name in (
            "stall_check_interval_s", "sweep_interval_s", "retention_interval_s",
            "digest_interval_s",
        )
    }  # fmt: skip
    service = Service(ServiceConfig(db=str(tmp_path / "events.db"), **intervals), token=TOKEN)
    client = TestClient(create_app(service))
    assert {j["job"]: j["next_run_time"] for j in client.get("/healthz").json()["jobs"]} == {
        "stall_check": None, "changepoint_sweep": None, "retention": None, "digest": None,
    }  # fmt: skip
    service.start()
    try:
        wait_for(lambda: all(j.runs >= 2 for j in service.jobs.statuses()), what="job runs")
        jobs_health = client.get("/healthz").json()["jobs"]
        now = time.time()
        for job in jobs_health:
            assert job["failures"] == 0, job
            assert now - 5.0 <= job["next_run_time"] <= now + 5.0, job
            assert job["last_success_time"] is not None
    finally:
        service.stop()
    assert not service.jobs.scheduler.running
