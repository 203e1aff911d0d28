"""The event store: runs, recent records, incidents, decisions and commands in SQLite (WAL).

Every ingest request is one transaction, committed before the service answers, so a
record the trainer saw acknowledged survives ``kill -9`` of the service (WAL with
``synchronous=NORMAL`` loses nothing on a process crash; only an OS crash can cost the
last transactions). Record batches are kept as the request bodies themselves: the
service never re-encodes them on the hot path, and reads them back only for charts,
sweeps and rewinds.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from spikewatch.service.store_schema import SCHEMA, SCHEMA_VERSION, BatchWrite, StoredRun


class EventStore:
    """SQLite-backed history of every run; safe to share between threads.

    Example:
        >>> store = EventStore(":memory:")
        >>> store.write(BatchWrite(run="r", monitor="{}", info={"records": 1},
        ...                        body=b'{"records": [{"step": 3, "loss": 1.5}]}',
        ...                        first_step=3, last_step=3, count=1))
        >>> [r.run for r in store.runs()], store.recent_records("r", limit=10)
        (['r'], [{'step': 3, 'loss': 1.5}])
    """

    def __init__(self, path: str | Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path, self.clock = str(path), clock
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._lock = threading.RLock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        with self._tx() as db:
            for stmt in SCHEMA.strip().split(";"):
                if stmt.strip():
                    db.execute(stmt)
            db.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', ?)",
                (str(SCHEMA_VERSION),),
            )

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        """Checkpoint the WAL and close."""
        with self._lock:
            self._db.close()

    def ping(self) -> bool:
        """True when the database answers (for /healthz)."""
        with self._lock:
            return bool(self._db.execute("SELECT 1").fetchone() == (1,))

    # -- writes -------------------------------------------------------------------------
    def write(self, w: BatchWrite) -> None:
        """Apply one ingest request's changes atomically."""
        now = self.clock()
        with self._tx() as db:
            if w.body is not None:
                db.execute(
                    "INSERT INTO batches (run, first_step, last_step, count, received, body) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (w.run, w.first_step, w.last_step, w.count, now, w.body),
                )
            self._write_run(db, w, now)
            if w.drop_snapshots_from is not None:  # states of a branch the trainer abandoned
                db.execute(
                    "DELETE FROM snapshots WHERE run = ? AND step >= ?",
                    (w.run, w.drop_snapshots_from),
                )
            if w.snapshot_step is not None:
                db.execute(
                    "INSERT OR REPLACE INTO snapshots (run, step, monitor) VALUES (?, ?, ?)",
                    (w.run, w.snapshot_step, w.monitor),
                )
            for inc in w.incidents:
                self._upsert_incident(db, inc, now)
            db.executemany(
                "INSERT INTO decisions (run, step, action, incident, body, at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (w.run, d["step"], d["action"], _incident_of(d), json.dumps(d), now)
                    for d in w.decisions
                ],
            )
            for cmd in w.commands:
                self._upsert_command(db, cmd, now)

    @staticmethod
    def _write_run(db: sqlite3.Connection, w: BatchWrite, now: float) -> None:
        """The run's bookkeeping, and its monitor state when the write carries one.

        ``state_batch`` is the newest batch the stored monitor state includes; batches
        after it are replayed on a restart (see `RunRegistry`).
        """
        info = json.dumps(w.info)
        if w.monitor is None:
            db.execute("UPDATE runs SET updated = ?, info = ? WHERE run = ?", (now, info, w.run))
            return
        db.execute(
            "INSERT INTO runs (run, created, updated, monitor, info, state_batch) "
            "VALUES (?, ?, ?, ?, ?, (SELECT COALESCE(MAX(id), 0) FROM batches WHERE run = ?)) "
            "ON CONFLICT (run) DO UPDATE SET updated=excluded.updated, monitor=excluded.monitor, "
            "info=excluded.info, state_batch=excluded.state_batch",
            (w.run, now, now, w.monitor, info, w.run),
        )

    @staticmethod
    def _upsert_incident(db: sqlite3.Connection, inc: dict[str, Any], now: float) -> None:
        db.execute(
            "INSERT INTO incidents (run, id, kind, onset_step, detected_step, action, status, "
            "reason, body, opened, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (run, id) DO UPDATE SET kind=excluded.kind, "
            "onset_step=excluded.onset_step, "
            "action=excluded.action, status=excluded.status, reason=excluded.reason, "
            "body=excluded.body, updated=excluded.updated",
            (
                inc["run"], inc["id"], inc["kind"], inc["onset_step"], inc["detected_step"],
                inc["action"], inc["status"], inc["reason"], json.dumps(inc), now, now,
            ),
        )  # fmt: skip

    @staticmethod
    def _upsert_command(db: sqlite3.Connection, cmd: dict[str, Any], now: float) -> None:
        db.execute(
            "INSERT INTO commands (id, run, action, status, source, body, created, updated) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
            "status=excluded.status, body=excluded.body, updated=excluded.updated",
            (
                cmd["id"],
                cmd["run"],
                cmd["action"],
                cmd["status"],
                cmd["source"],
                json.dumps(cmd),
                now,
                now,
            ),
        )

    def save_incident(self, incident: dict[str, Any]) -> None:
        """Insert or update one incident (scheduled jobs: stalls, sweeps)."""
        with self._tx() as db:
            self._upsert_incident(db, incident, self.clock())

    def save_commands(self, commands: list[dict[str, Any]]) -> None:
        """Insert or update commands (operator actions)."""
        with self._tx() as db:
            for cmd in commands:
                self._upsert_command(db, cmd, self.clock())

    def save_thread(self, key: str, ts: str) -> None:
        """Remember the Slack thread of an incident."""
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO slack_threads (key, ts) VALUES (?, ?)", (key, ts))

    # -- reads --------------------------------------------------------------------------
    def runs(self) -> list[StoredRun]:
        """Every run with its persisted monitor state and bookkeeping."""
        with self._lock:
            rows = self._db.execute(
                "SELECT run, created, monitor, info, state_batch FROM runs ORDER BY run"
            ).fetchall()
        return [StoredRun(r, c, json.loads(m), json.loads(i), b) for r, c, m, i, b in rows]

    def run(self, run: str) -> StoredRun | None:
        """One run as persisted, or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT run, created, monitor, info, state_batch FROM runs WHERE run = ?", (run,)
            ).fetchone()
        if row is None:
            return None
        return StoredRun(row[0], row[1], json.loads(row[2]), json.loads(row[3]), row[4])

    def batches_after(self, run: str, batch_id: int) -> list[bytes]:
        """Request bodies of ``run`` stored after batch ``batch_id``, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT body FROM batches WHERE run = ? AND id > ? ORDER BY id", (run, batch_id)
            ).fetchall()
        return [bytes(b) for (b,) in rows]

    def incidents(self, run: str) -> list[dict[str, Any]]:
        """A run's incidents, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT body FROM incidents WHERE run = ? ORDER BY opened, detected_step", (run,)
            ).fetchall()
        return [json.loads(b) for (b,) in rows]

    def commands(self, run: str) -> list[dict[str, Any]]:
        """A run's commands, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT body FROM commands WHERE run = ? ORDER BY created, id", (run,)
            ).fetchall()
        return [json.loads(b) for (b,) in rows]

    def threads(self) -> dict[str, str]:
        """Slack threads by incident key."""
        with self._lock:
            return dict(self._db.execute("SELECT key, ts FROM slack_threads").fetchall())

    def snapshot_before(self, run: str, step: int) -> dict[str, Any] | None:
        """The newest monitor snapshot taken after a step before ``step``."""
        with self._lock:
            row = self._db.execute(
                "SELECT monitor FROM snapshots WHERE run = ? AND step < ? "
                "ORDER BY step DESC LIMIT 1",
                (run, step),
            ).fetchone()
        return None if row is None else dict(json.loads(row[0]))

    def recent_records(
        self, run: str, *, limit: int, after_step: int | None = None
    ) -> list[dict[str, Any]]:
        """The newest ``limit`` records of ``run`` (as sent), oldest first."""
        out: list[dict[str, Any]] = []
        with self._lock:
            cursor = self._db.execute(
                "SELECT body, count FROM batches WHERE run = ? ORDER BY id DESC", (run,)
            )
            bodies: list[bytes] = []
            total = 0
            for body, count in cursor:
                bodies.append(body)
                total += count
                if total >= limit:
                    break
        for body in reversed(bodies):
            out.extend(json.loads(body)["records"])
        if after_step is not None:
            out = [r for r in out if r["step"] > after_step]
        return out[-limit:]

    def record_count(self, run: str) -> int:
        """Records of ``run`` still stored."""
        with self._lock:
            row = self._db.execute(
                "SELECT COALESCE(SUM(count), 0) FROM batches WHERE run = ?", (run,)
            ).fetchone()
        return int(row[0])

    # -- retention ----------------------------------------------------------------------
    def prune(self, *, keep_records: int, keep_snapshots: int, max_age_s: float) -> int:
        """Drop record batches beyond ``keep_records`` per run or older than ``max_age_s``,
        and all but the newest ``keep_snapshots`` snapshots; return batches dropped."""
        cutoff = self.clock() - max_age_s
        dropped = 0
        with self._tx() as db:
            dropped += db.execute(
                "DELETE FROM batches WHERE received < ? AND id <= "
                "(SELECT state_batch FROM runs WHERE runs.run = batches.run)",
                (cutoff,),
            ).rowcount
            for (run,) in db.execute("SELECT run FROM runs").fetchall():
                dropped += _prune_run(db, run, keep_records, keep_snapshots)
        return dropped


def _prune_run(db: sqlite3.Connection, run: str, keep_records: int, keep_snapshots: int) -> int:
    total, boundary = 0, None
    for batch_id, count in db.execute(
        "SELECT id, count FROM batches WHERE run = ? ORDER BY id DESC", (run,)
    ):
        total += count
        if total >= keep_records:
            boundary = batch_id
            break
    dropped = 0
    if boundary is not None:  # never a batch the stored monitor state does not include yet
        dropped = db.execute(
            "DELETE FROM batches WHERE run = ? AND id < ? AND id <= "
            "(SELECT state_batch FROM runs WHERE run = ?)",
            (run, boundary, run),
        ).rowcount
    db.execute(
        "DELETE FROM snapshots WHERE run = ? AND step NOT IN "
        "(SELECT step FROM snapshots WHERE run = ? ORDER BY step DESC LIMIT ?)",
        (run, run, keep_snapshots),
    )
    return dropped


def _incident_of(decision: dict[str, Any]) -> str:
    signal = decision.get("signal")
    return str(signal.get("incident", "")) if isinstance(signal, dict) else ""
