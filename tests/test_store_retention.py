"""A bounded event store: retention deletes in small steps beside ingest, gives the space
back to the file system, and prunes incidents and decisions by age and count.

Measured on the old store: one big DELETE under the store lock stalled ingest and
/healthz for 1.8 s, and the file grew from 97 MB to 188 MB (WAL 94 MB) because nothing
was ever vacuumed or checkpointed.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from spikewatch.records import StepRecord
from spikewatch.service.config import ServiceConfig
from spikewatch.service.jobs import retention
from spikewatch.service.payloads import IngestBatch
from spikewatch.service.registry import RunRegistry
from spikewatch.service.store import JOURNAL_SIZE_LIMIT, EventStore
from spikewatch.service.store_schema import BatchWrite

DAY = 24 * 3600.0


def ingest(reg: RunRegistry, run: str, start: int, n: int = 100) -> float:
    """One request of ``n`` records through the registry; returns its latency in seconds."""
    steps = range(start, start + n)
    records = [StepRecord(run=run, step=s, loss=2.0 + 0.001 * (s % 7)) for s in steps]
    wire = [{"step": r.step, "loss": r.loss} for r in records]
    body = json.dumps({"records": wire}).encode()
    batch = IngestBatch.of(records)
    began = time.perf_counter()
    reg.ingest(run, batch, body)
    return time.perf_counter() - began


def p99(latencies: list[float]) -> float:
    ordered = sorted(latencies)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def insert_old_batches(path: Path, run: str, *, batches: int, per_batch: int, at: float) -> None:
    """``batches`` stored requests of ``per_batch`` records each, received at ``at``
    (executemany on a second connection: seconds for a million records)."""
    body = json.dumps(
        {"records": [{"step": s, "loss": 2.0, "grad_norm": 1.0} for s in range(per_batch)]}
    ).encode()
    db = sqlite3.connect(path)
    with db:
        db.executemany(
            "INSERT INTO batches (run, first_step, last_step, count, received, body) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            ((run, b * per_batch, b * per_batch + per_batch - 1, per_batch, at, body)
             for b in range(batches)),
        )  # fmt: skip
    db.close()


def measure_retention(path: Path) -> dict[str, Any]:
    """Ingest p99 without and beside a retention pass over 1M old records; file sizes."""
    config = ServiceConfig(db=str(path), state_every_s=0.0, max_record_age_s=DAY)
    reg = RunRegistry(EventStore(path), config)
    ingest(reg, "old", 0)
    insert_old_batches(path, "old", batches=10_000, per_batch=100, at=time.time() - 2 * DAY)
    ingest(reg, "old", 1_000_000)  # its saved state now covers the old batches: prunable
    quiet = [ingest(reg, "live", 100 * i) for i in range(300)]
    before = reg.store.file_bytes()
    done, during = threading.Event(), []

    def prune() -> None:
        retention(reg)
        done.set()

    worker = threading.Thread(target=prune)
    worker.start()
    step = 100 * len(quiet)
    while not done.is_set():
        during.append(ingest(reg, "live", step))
        step += 100
    worker.join()
    out = {"quiet_p99": p99(quiet), "during_p99": p99(during), "during_n": len(during)}
    out.update(before=before, after=reg.store.file_bytes(), old=reg.store.record_count("old"))
    out["wal"] = Path(str(path) + "-wal").stat().st_size
    reg.store.close()
    return out


def test_retention_of_a_million_records_keeps_ingest_fast_and_shrinks_the_file(
    tmp_path: Path,
) -> None:
    # Best of 3 (like bench/): other processes on a shared machine only add latency.
    tries = []
    for attempt in range(3):
        m = measure_retention(tmp_path / f"events-{attempt}.db")
        tries.append(m)
        assert m["old"] == 200  # the two recent batches, inside the age
        assert m["during_n"] >= 50, "retention ended too soon to measure ingest beside it"
        assert m["after"] < m["before"] / 5, m  # the freed pages went back to the disk
        assert m["wal"] <= JOURNAL_SIZE_LIMIT
        # Within 2x the quiet p99 (plus 2 ms for scheduling noise on a shared core).
        if m["during_p99"] <= 2 * m["quiet_p99"] + 0.002:
            return
    pytest.fail(f"ingest p99 beside retention over 2x its quiet value in 3 tries: {tries}")


def test_incidents_and_decisions_are_pruned_by_age_and_count(tmp_path: Path) -> None:
    now = [1_000_000.0]
    store = EventStore(tmp_path / "events.db", clock=lambda: now[0], incident_limit=4)
    config = ServiceConfig(
        db=str(tmp_path / "events.db"),
        keep_incidents=4,
        max_incident_age_s=10 * DAY,
        keep_decisions=6,
        max_decision_age_s=5 * DAY,
    )
    for i in range(10):
        now[0] = 1_000_000.0 + i * DAY  # one incident and two decisions a day
        incident = incident_json(f"inc-{i}", step=100 * i)
        decisions = [decision_json(100 * i + k, f"inc-{i}") for k in range(2)]
        store.write(BatchWrite(run="r", monitor="{}", info={}, incidents=[incident],
                               decisions=decisions))  # fmt: skip
    now[0] = 1_000_000.0 + 12 * DAY  # inc-0..2 are past 10 days; decisions of days 0-6 past 5
    pruned = store.retain(config.retention())  # what the retention job runs
    assert (pruned.incidents, pruned.decisions) == (6, 14)
    with store.reading() as db:
        kept = [r for (r,) in db.execute("SELECT id FROM incidents ORDER BY opened")]
        steps = [s for (s,) in db.execute("SELECT step FROM decisions ORDER BY id")]
    assert kept == ["inc-6", "inc-7", "inc-8", "inc-9"]  # 7 young enough, the newest 4
    assert steps == [700, 701, 800, 801, 900, 901]  # 6 young enough, and the newest 6
    assert [i["id"] for i in store.incidents("r")] == kept  # what a restart loads


def test_a_restart_loads_only_the_newest_incidents(tmp_path: Path) -> None:
    store = EventStore(tmp_path / "events.db", incident_limit=3)
    for i in range(8):
        store.write(BatchWrite(run="r", monitor="{}", info={}, incidents=[incident_json(
            f"inc-{i}", step=i)]))  # fmt: skip
    assert [i["id"] for i in store.incidents("r")] == ["inc-5", "inc-6", "inc-7"]
    assert len(store.incidents("r", limit=100)) == 8  # the store keeps them until retention


def test_a_new_store_vacuums_incrementally_and_an_old_one_says_how_to(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    new = EventStore(tmp_path / "new.db")
    with new.reading() as db:
        assert db.execute("PRAGMA auto_vacuum").fetchone() == (2,)  # INCREMENTAL
        assert db.execute("PRAGMA journal_size_limit").fetchone() == (JOURNAL_SIZE_LIMIT,)
    old_path = tmp_path / "old.db"
    sqlite3.connect(old_path).execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
    with caplog.at_level(logging.WARNING):
        old = EventStore(old_path)
    with old.reading() as db:
        assert db.execute("PRAGMA auto_vacuum").fetchone() == (0,)  # SQLite cannot switch it
    assert "PRAGMA auto_vacuum=INCREMENTAL; VACUUM;" in caplog.text
    old.retain(ServiceConfig().retention())  # prunes; frees pages inside the file only


def incident_json(incident_id: str, *, step: int) -> dict[str, Any]:
    return {
        "id": incident_id, "run": "r", "kind": "spike", "metric": "loss", "onset_step": step,
        "peak_step": step, "end_step": None, "transient": False, "score": 9.0,
        "action": "rollback", "detected_step": step, "reason": "test", "status": "closed",
    }  # fmt: skip


def decision_json(step: int, incident: str) -> dict[str, Any]:
    return {"step": step, "action": "skip", "signal": {"incident": incident}, "reason": "test"}
