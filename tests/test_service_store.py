"""The event store and the registry's persistence: atomic batches, restarts, retention."""

from __future__ import annotations

import json
import random
import sqlite3
from pathlib import Path

import pytest

from spikewatch.monitor import Monitor
from spikewatch.records import StepRecord
from spikewatch.service.config import ServiceConfig
from spikewatch.service.operator import Operator
from spikewatch.service.payloads import IngestBatch
from spikewatch.service.registry import RunRegistry
from spikewatch.service.store import EventStore


def _records(start: int, n: int, seed: int = 0) -> list[StepRecord]:
    rng = random.Random(seed + start)
    return [
        StepRecord(
            run="r",
            step=t,
            loss=3.0 - 0.0005 * t + rng.gauss(0, 0.02) + (2.0 if t == 450 else 0.0),
            grad_norm=1.0 + abs(rng.gauss(0, 0.1)),
        )
        for t in range(start, start + n)
    ]


def _body(records: list[StepRecord]) -> bytes:
    rows = [{"step": r.step, "loss": r.loss, "grad_norm": r.grad_norm} for r in records]
    return json.dumps({"records": rows}).encode()


def _feed(reg: RunRegistry, records: list[StepRecord], size: int = 100) -> None:
    for i in range(0, len(records), size):
        chunk = records[i : i + size]
        reg.ingest("r", IngestBatch.of(chunk), _body(chunk))


def test_a_restart_restores_every_run_exactly(tmp_path: Path) -> None:
    db = tmp_path / "events.db"
    records = _records(0, 1000)
    first = RunRegistry(EventStore(db), ServiceConfig())
    _feed(first, records[:600])
    second = RunRegistry(EventStore(db), ServiceConfig())  # a new process on the same file
    _feed(second, records[600:])
    reference = Monitor(run="r")
    for r in records:
        reference.observe(r)
    run = second.runs["r"]
    assert run.monitor.state_dict() == reference.state_dict()
    assert [i.to_json() for i in run.monitor.incidents] == [
        i.to_json() for i in reference.incidents
    ]
    assert [p[0] for p in run.recent][-1] == 999 and len(run.recent) == 1000


def test_a_failed_write_leaves_no_trace_and_the_retry_counts_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = EventStore(tmp_path / "events.db")
    reg = RunRegistry(store, ServiceConfig())
    records = _records(0, 300)
    _feed(reg, records[:200])
    real_write = store.write

    def disk_full(write: object) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(store, "write", disk_full)
    with pytest.raises(sqlite3.OperationalError):
        _feed(reg, records[200:])
    monkeypatch.setattr(store, "write", real_write)
    _feed(reg, records[200:])  # the client's retry
    reference = Monitor(run="r")
    for r in records:
        reference.observe(r)
    assert reg.runs["r"].monitor.state_dict() == reference.state_dict()
    assert reg.status("r").records == 300  # type: ignore[union-attr]


def test_retention_keeps_the_newest_records_and_snapshots(tmp_path: Path) -> None:
    store = EventStore(tmp_path / "events.db")
    reg = RunRegistry(store, ServiceConfig(snapshot_every=100, state_every_s=0.0))
    _feed(reg, _records(0, 2000))
    dropped = store.prune(keep_records=500, keep_snapshots=3, max_age_s=3600.0)
    assert dropped == 15  # 20 batches of 100; the newest 5 hold the 500 kept
    kept = store.recent_records("r", limit=10_000)
    assert [r["step"] for r in kept] == list(range(1500, 2000))
    steps = [
        s for (s,) in sqlite3.connect(tmp_path / "events.db").execute("SELECT step FROM snapshots")
    ]
    assert len(steps) == 3 and max(steps) == 1999


def test_a_rewind_restores_the_snapshot_before_the_step(tmp_path: Path) -> None:
    store = EventStore(tmp_path / "events.db")
    reg = RunRegistry(store, ServiceConfig(snapshot_every=100, state_every_s=0.0))
    records = _records(0, 700)
    _feed(reg, records)
    state_at_399 = store.snapshot_before("r", 400)
    assert state_at_399 is not None and state_at_399["last_step"] == 399
    again = _records(400, 100, seed=7)  # the trainer rolled back to step 400
    reg.ingest("r", IngestBatch.of(again, rewind_to=400), _body(again))
    reference = Monitor(run="r")
    for r in records[:400]:
        reference.observe(r)
    for r in again:
        reference.observe(r)
    run = reg.runs["r"]
    assert run.monitor.detector_state() == reference.detector_state()
    assert run.counts["skipped_batches"] == 300  # steps 400-699 were thrown away


def test_retention_never_drops_batches_the_saved_state_lacks(tmp_path: Path) -> None:
    frozen = [0.0]  # time stands still: the state is saved with the first batch only
    store = EventStore(tmp_path / "events.db", clock=lambda: frozen[0])
    reg = RunRegistry(store, ServiceConfig(state_every_s=3600.0), clock=lambda: frozen[0])
    records = _records(0, 1000)
    _feed(reg, records)
    frozen[0] = 10.0
    assert store.prune(keep_records=100, keep_snapshots=1, max_age_s=0.001) == 1  # the first
    restarted = RunRegistry(EventStore(tmp_path / "events.db"), ServiceConfig())
    reference = Monitor(run="r")
    for r in records:
        reference.observe(r)
    assert restarted.runs["r"].monitor.state_dict() == reference.state_dict()


def test_an_operator_command_whose_write_fails_is_not_sent_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = EventStore(tmp_path / "events.db")
    reg = RunRegistry(store, ServiceConfig())
    operator = Operator(reg)
    _feed(reg, _records(0, 100))
    real_write = store.write

    def locked(write: object) -> None:
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(store, "write", locked)
    with pytest.raises(sqlite3.OperationalError):
        operator.apply("r", action="rollback", rollback_before_step=50)
    monkeypatch.setattr(store, "write", real_write)
    operator.apply("r", action="rollback", rollback_before_step=50)  # the operator retries
    more = _records(100, 10)
    answer = reg.ingest("r", IngestBatch.of(more), _body(more))
    assert [c["action"] for c in answer["commands"]] == ["rollback"]


def test_a_restart_drops_the_abandoned_branch_from_the_recent_curve(tmp_path: Path) -> None:
    store = EventStore(tmp_path / "events.db")
    reg = RunRegistry(store, ServiceConfig())
    _feed(reg, _records(0, 600))
    again = _records(400, 50, seed=3)
    reg.ingest("r", IngestBatch.of(again, rewind_to=400), _body(again))
    restarted = RunRegistry(EventStore(tmp_path / "events.db"), ServiceConfig())
    steps = [s for s, _ in restarted.runs["r"].recent]
    assert steps == list(range(450)) == [s for s, _ in reg.runs["r"].recent]
