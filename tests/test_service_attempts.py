"""Run attempts and detector snapshots (issue 14, item 3), on the in-process app.

A run id reused from step 0 by a new client session is a new *attempt* of the run, with
its own detector state: not a rollback, no skipped batches. The service snapshots its
detectors at the trainer's snapshot boundaries however the records are batched, so a
rollback rewinds its detectors to exactly where the trainer restored.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from conftest import falling_curve
from service_process import TOKEN as PROCESS_TOKEN
from service_process import ServiceProcess
from spikewatch.http_transport import HttpTransport
from spikewatch.monitor import Monitor
from spikewatch.records import StepRecord
from spikewatch.service.core import Service
from test_service_api import AUTH, make_client

RUN = "gpt-1b"


@pytest.fixture
def app(tmp_path: Path) -> Iterator[tuple[Service, TestClient]]:
    service, client = make_client(tmp_path)
    yield service, client
    service.stop()


def send(
    client: TestClient, losses: list[float], start: int, end: int, *, session: str, seq: int,
    **extra: Any,
) -> dict[str, Any]:  # fmt: skip
    body = {
        "records": [{"step": s, "loss": losses[s], "grad_norm": 1.0} for s in range(start, end)],
        "client": session,
        "seq": seq,
        **extra,
    }
    answer = client.post(f"/v1/runs/{RUN}/records", content=json.dumps(body), headers=AUTH)
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def test_a_run_id_reused_from_step_0_is_a_new_attempt_not_a_rollback(
    app: tuple[Service, TestClient],
) -> None:
    _, client = app
    first = falling_curve(6000, seed=1)
    for seq, start in enumerate(range(0, 6000, 2000)):
        send(client, first, start, start + 2000, session="first", seq=seq)
    again = falling_curve(1500, seed=2)  # a new training: the loss starts high again
    commands = []
    for seq, start in enumerate(range(0, 1500, 100)):
        commands += send(client, again, start, start + 100, session="second", seq=seq)["commands"]
    view = client.get(f"/v1/runs/{RUN}").json()
    assert commands == []
    assert [c["action"] for c in view["commands"]] == []
    assert (view["attempt"], view["attempt_step"]) == (2, 0)
    assert (view["rollbacks"], view["skipped_batches"], view["last_step"]) == (0, 0, 1499)
    assert view["records"] == 7500
    assert view["incidents_total"] == 0


def test_a_new_attempt_has_the_detectors_of_a_fresh_run(app: tuple[Service, TestClient]) -> None:
    service, client = app
    send(client, falling_curve(3000, seed=1), 0, 3000, session="first", seq=0)
    again = falling_curve(500, seed=2)
    send(client, again, 0, 500, session="second", seq=0)
    reference = Monitor(run=RUN, config=service.config.monitor)
    reference.observe_many([StepRecord(run=RUN, step=s, loss=again[s], grad_norm=1.0)
                            for s in range(500)])  # fmt: skip
    mirrored = service.registry.runs[RUN].monitor
    assert mirrored.detector_state() == reference.detector_state()


def test_the_same_session_going_back_without_rewind_to_is_422(
    app: tuple[Service, TestClient],
) -> None:
    _, client = app
    losses = falling_curve(400, seed=1)
    send(client, losses, 0, 300, session="s", seq=0)
    body = {"records": [{"step": 5, "loss": 1.0}], "client": "s", "seq": 1}
    answer = client.post(f"/v1/runs/{RUN}/records", json=body, headers=AUTH)
    assert answer.status_code == 422
    assert answer.json()["field"] == "records[0].step"
    assert "rewind_to" in answer.json()["error"]
    assert client.get(f"/v1/runs/{RUN}").json()["last_step"] == 299
    # An older batch sent late under a new seq is refused the same way.
    late = {"records": [{"step": s, "loss": losses[s]} for s in range(100, 200)], "client": "s"}
    answer = client.post(f"/v1/runs/{RUN}/records", json={**late, "seq": 7}, headers=AUTH)
    assert answer.status_code == 422
    assert client.get(f"/v1/runs/{RUN}").json()["last_step"] == 299


def test_a_retry_without_seq_is_ingested_once(app: tuple[Service, TestClient]) -> None:
    _, client = app
    body = json.dumps({"records": [{"step": s, "loss": 2.0} for s in range(10)]})
    answers = [client.post(f"/v1/runs/{RUN}/records", content=body, headers=AUTH)
               for _ in range(2)]  # fmt: skip
    assert [(a.status_code, a.json()["duplicate"]) for a in answers] == [(200, False), (200, True)]
    assert client.get(f"/v1/runs/{RUN}").json()["records"] == 10


def test_snapshots_land_on_every_boundary_however_the_records_are_batched(
    app: tuple[Service, TestClient],
) -> None:
    service, client = app
    losses = falling_curve(6000, seed=1)
    for seq, start in enumerate(range(0, 6000, 2000)):  # fast batches, all within a second
        send(client, losses, start, start + 2000, session="s", seq=seq)
    steps = [
        step for (step,) in service.store._db.execute(
            "SELECT step FROM snapshots WHERE run = ? ORDER BY step", (RUN,)
        )
    ]  # fmt: skip
    assert steps == list(range(99, 6000, 100))  # the landed code kept 2


def test_a_rollback_rewinds_the_detectors_to_exactly_the_trainers_step(
    app: tuple[Service, TestClient],
) -> None:
    service, client = app
    losses = falling_curve(3000, seed=1)
    send(client, losses, 0, 2950, session="s", seq=0)  # one batch: no per-batch timing
    after = falling_curve(3000, seed=3)
    send(client, after, 2800, 2900, session="s", seq=1, rewind_to=2800)
    reference = Monitor(run=RUN, config=service.config.monitor)
    reference.observe_many(
        [StepRecord(run=RUN, step=s, loss=losses[s], grad_norm=1.0) for s in range(2800)]
        + [StepRecord(run=RUN, step=s, loss=after[s], grad_norm=1.0) for s in range(2800, 2900)]
    )
    assert service.registry.runs[RUN].monitor.detector_state() == reference.detector_state()
    view = client.get(f"/v1/runs/{RUN}").json()
    assert (view["attempt"], view["skipped_batches"]) == (1, 150)


def test_a_reused_run_id_through_the_real_client_is_a_new_attempt(tmp_path: Path) -> None:
    """The probe of issue 14 on a real ``spikewatch serve``: 6,000 healthy steps, then a
    new client with the same run id from step 0 (the landed service commanded a rollback
    at step 15, "onset at step 0", and counted 6,000 skipped batches)."""
    with ServiceProcess(tmp_path) as svc:
        for losses, steps in ((falling_curve(6000, seed=1), 6000),
                              (falling_curve(1500, seed=2), 1500)):  # fmt: skip
            t = HttpTransport(svc.url, run=RUN, token=PROCESS_TOKEN, flush_interval_s=0.05)
            commands = []
            for start in range(0, steps, 100):
                batch = [StepRecord(run=RUN, step=s, loss=losses[s], grad_norm=1.0)
                         for s in range(start, start + 100)]  # fmt: skip
                commands += t.submit(batch)
            assert t.flush(timeout=30)
            commands += t.submit([])
            t.close(timeout=5)
            assert (commands, t.failures, t.rejected) == ([], 0, 0)
        _, view = svc.get(f"/v1/runs/{RUN}")
    assert (view["attempt"], view["attempt_step"], view["last_step"]) == (2, 0, 1499)
    assert (view["rollbacks"], view["skipped_batches"], view["commands"]) == (0, 0, [])
