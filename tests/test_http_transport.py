"""The trainer's HTTP transport against a real `spikewatch serve` process."""

from __future__ import annotations

import dataclasses
import json
import pickle
import random
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from service_process import TOKEN, ServiceProcess
from spikewatch.errors import ConfigError
from spikewatch.http_transport import HttpTransport
from spikewatch.monitor import Monitor
from spikewatch.records import StepRecord
from spikewatch.service.config import ServiceConfig
from spikewatch.service.registry import RunRegistry
from spikewatch.service.store import EventStore
from spikewatch.service_transport import ServiceTransport
from spikewatch_hooks.core.options import GuardOptions
from spikewatch_hooks.demo.corpus import CharCorpus
from spikewatch_hooks.demo.scenario import DemoSettings, load_corpus, train
from spikewatch_hooks.guard import SpikeGuard


def _curve(n: int, seed: int = 0) -> list[StepRecord]:
    rng = random.Random(seed)
    out = []
    for t in range(n):
        loss = 3.0 * (0.6 + 0.4 * 0.999**t) + rng.gauss(0, 0.02)
        if t in (700, 1900):
            loss += 2.0  # one-step spikes: incidents the service must keep across a crash
        if t == 2600:
            loss = float("nan")
        out.append(StepRecord(run="r", step=t, loss=loss, grad_norm=1.0 + abs(rng.gauss(0, 0.1))))
    return out


def _wait(predicate: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_a_killed_service_loses_nothing_and_keeps_detector_state(tmp_path: Path) -> None:
    records = _curve(3000)
    with ServiceProcess(tmp_path) as svc:
        t = HttpTransport(svc.url, run="r", token=TOKEN, batch_size=50, flush_interval_s=0.02)
        for i in range(0, 1500, 8):
            t.submit(records[i : i + 8])
        _wait(lambda: t.sent >= 400)  # mid-run: some delivered, the rest queued or in flight
        svc.kill()
        started = time.monotonic()
        for i in range(1504, 2400, 8):
            t.submit(records[i : i + 8])
        assert time.monotonic() - started < 1.0  # the trainer never waits on a dead service
        _wait(lambda: t.failures > 0)
        svc.start()
        t.submit(records[2400:])
        assert t.flush(timeout=60)
        t.close()
        status, run = svc.get("/v1/runs/r")
        assert status == 200
        assert run["records"] == 3000 and run["last_step"] == 2999  # each record exactly once
    reference = Monitor(run="r")
    for r in records:
        reference.observe(r)
    restarted = RunRegistry(EventStore(tmp_path / "events.db"), ServiceConfig())  # a third start
    monitor = restarted.runs["r"].monitor
    assert json.dumps(monitor.state_dict()) == json.dumps(reference.state_dict())
    assert [i.to_json() for i in monitor.incidents] == [i.to_json() for i in reference.incidents]
    assert t.dropped == 0 and t.rejected == 0


def test_submit_never_blocks_and_drops_when_full(tmp_path: Path) -> None:
    port_nobody_listens_on = "http://127.0.0.1:9"
    t = HttpTransport(port_nobody_listens_on, run="r", token="x", max_queue=1000, timeout_s=0.5)
    records = _curve(2000)
    started = time.monotonic()
    for i in range(0, 2000, 8):
        assert t.submit(records[i : i + 8]) == []
    assert time.monotonic() - started < 1.0
    assert (t.queued, t.dropped) == (1000, 1000)
    _wait(lambda: t.failures > 0)
    assert not t.flush(timeout=0.2)
    t.close(timeout=0.1)


def test_a_batch_the_service_rejects_is_dropped_and_counted(tmp_path: Path) -> None:
    with ServiceProcess(tmp_path) as svc:
        t = HttpTransport(svc.url, run="r", token=TOKEN, batch_size=10, flush_interval_s=0.02)
        bad = StepRecord(run="r", step=0, loss="high")  # type: ignore[arg-type]
        t.submit([bad, StepRecord(run="r", step=1, loss=1.0)])  # one batch
        assert t.flush(timeout=20)
        t.close()
        assert t.rejected == 2  # the whole batch was unacceptable; training went on
        assert svc.get("/v1/runs/r")[0] == 404


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"url": "localhost:9650"}, "monitor_url='localhost:9650' is invalid"),
        ({"token": ""}, "pass token= or set SPIKEWATCH_TOKEN"),
    ],
)
def test_misconfiguration_fails_at_start(
    kwargs: dict[str, str], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SPIKEWATCH_TOKEN", raising=False)
    args = {"url": "http://127.0.0.1:9650", "token": "t", **kwargs}
    with pytest.raises(ConfigError, match=message):
        HttpTransport(args["url"], run="r", token=args["token"])


@pytest.fixture(scope="module")
def corpus() -> Iterator[CharCorpus]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_corpus()
    torch.set_num_threads(threads)


SMALL = dataclasses.replace(
    DemoSettings.for_steps(400), batch_size=16, context=32, warmup=20, poison_batches=60
)


def test_a_guarded_run_recovers_through_the_service(tmp_path: Path, corpus: CharCorpus) -> None:
    config = "[monitor.policy]\nmargin = 20\nskip_ahead = 60\n"
    with ServiceProcess(tmp_path, config=config) as svc:
        transport = HttpTransport(
            svc.url, run="demo", token=TOKEN, batch_size=8, flush_interval_s=0.01
        )
        guarded = train("guarded", SMALL, corpus, transport=transport)
        clean = train("clean", SMALL, corpus)
        _, run = svc.get("/v1/runs/demo")
    assert guarded.stats["rollbacks"] >= 1
    assert abs(guarded.final_loss - clean.final_loss) <= 0.05 * clean.final_loss
    assert run["rollbacks"] >= 1 and run["skipped_batches"] > 0
    [(start, stop)] = guarded.stats["skip_ledger"]
    assert start <= SMALL.poison_start and stop >= SMALL.poison_start + SMALL.poison_batches


def test_closing_the_transport_finishes_the_run_and_new_records_resume_it(tmp_path: Path) -> None:
    records = _curve(300)
    fast_stall_check = "[service]\nstall_after_s = 0.5\nstall_check_interval_s = 0.2\n"
    with ServiceProcess(tmp_path, config=fast_stall_check) as svc:
        t = HttpTransport(svc.url, run="r", token=TOKEN, batch_size=100, flush_interval_s=0.02)
        t.submit(records[:200])
        t.close()
        assert svc.get("/v1/runs/r")[1]["state"] == "finished"
        _wait(lambda: _job_runs(svc, "stall_check") >= 5)  # stall checks ran past stall_after_s
        assert svc.get("/v1/runs/r")[1]["state"] == "finished"  # never taken for a stall
        again = HttpTransport(svc.url, run="r", token=TOKEN, batch_size=100, flush_interval_s=0.02)
        again.submit(records[200:])
        assert again.flush(timeout=20)
        assert svc.get("/v1/runs/r")[1]["state"] == "active"
        again.close()


def _job_runs(svc: ServiceProcess, job: str) -> int:
    _, health = svc.get("/healthz")
    return int(next(j["runs"] for j in health["jobs"] if j["job"] == job))


def test_numpy_values_are_sent_and_exit_without_close_is_no_finish(tmp_path: Path) -> None:
    with ServiceProcess(tmp_path) as svc:
        t = HttpTransport(svc.url, run="r", token=TOKEN, batch_size=10, flush_interval_s=0.02)
        loss, position = np.float32(2.5), np.int64(7)  # what a trainer often passes along
        t.submit([StepRecord(run="r", step=0, loss=loss, data_position=position)])  # type: ignore[arg-type]
        t._at_exit()  # what the interpreter runs at exit when the loop died without close()
        _, run = svc.get("/v1/runs/r")
        assert (run["records"], run["loss"], run["state"]) == (1, 2.5, "active")
        assert t.rejected == 0


def test_monitor_url_gives_the_guard_its_own_monitor_and_a_client(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SPIKEWATCH_TOKEN", "from-the-env")
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = SpikeGuard(model, opt, run_id="r", monitor_url="http://127.0.0.1:9")
    assert isinstance(guard.transport, ServiceTransport)
    assert isinstance(guard.transport.client, HttpTransport)
    assert guard.transport.client.url == "http://127.0.0.1:9"
    guard.close(timeout=0.1)


def test_a_callback_holds_no_client_until_training_starts() -> None:
    """Launchers pickle callbacks into worker processes: the client is made with the engine."""
    options = GuardOptions.build(run_id="r", monitor_url="http://127.0.0.1:9", token="t")
    assert pickle.loads(pickle.dumps(options)).monitor_url == "http://127.0.0.1:9"
    t = HttpTransport("http://127.0.0.1:9", run="r", token="t")
    with pytest.raises(TypeError, match="cannot be pickled into another process"):
        pickle.dumps(t)  # a client made by hand still says why it cannot travel
    t.close(timeout=0.1)
