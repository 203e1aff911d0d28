"""The event store: runs, recent records, incidents, decisions and commands in SQLite (WAL).

Every ingest request is one transaction, committed before the service answers, so a
record the trainer saw acknowledged survives ``kill -9`` of the service (WAL with
``synchronous=NORMAL`` loses nothing on a process crash; only an OS crash can cost the
last transactions). Record batches are kept as the request bodies themselves: the
service never re-encodes them on the hot path, and reads them back only for charts,
sweeps and rewinds.

The store stays bounded: retention (`store_retention`) deletes in small transactions
and gives the space back. A new database is created with ``auto_vacuum=INCREMENTAL``,
so freed pages return to the file system; SQLite cannot switch an existing database
without a full ``VACUUM``, so one created by an older spikewatch keeps its size (free
pages are reused) until ``sqlite3 events.db 'PRAGMA auto_vacuum=INCREMENTAL; VACUUM;'``
is run once with the service stopped (the service logs this at start).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from spikewatch.service.store_outbox import SqliteOutbox, insert_messages
from spikewatch.service.store_retention import Pruned, RetentionPolicy, retain
from spikewatch.service.store_rows import incident_of, upsert_command, upsert_incident, write_run
from spikewatch.service.store_schema import SCHEMA, SCHEMA_VERSION, BatchWrite, StoredRun

log = logging.getLogger(__name__)

#: The WAL is truncated to this after a checkpoint (SQLite keeps a big one otherwise).
JOURNAL_SIZE_LIMIT = 16 * 1024 * 1024


class EventStore:
    """SQLite-backed history of every run; safe to share between threads.

    Example:
        >>> store = EventStore(":memory:")
        >>> store.write(BatchWrite(run="r", monitor="{}", info={"records": 1},
        ...                        body=b'{"records": [{"step": 3, "loss": 1.5}]}',
        ...                        first_step=3, last_step=3, count=1))
        >>> [r.run for r in store.runs()], store.recent_records("r", limit=10)
        (['r'], [{'step': 3, 'loss': 1.5}])

    Args:
        path: the SQLite file (``:memory:`` for tests).
        clock: time of every row written.
        incident_limit: the most incidents per run `incidents` returns (the newest),
            so a restart never loads every incident ever; None: all.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        clock: Callable[[], float] = time.time,
        incident_limit: int | None = None,
    ) -> None:
        self.path, self.clock, self.incident_limit = str(path), clock, incident_limit
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._lock = threading.RLock()
        self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")  # takes effect on a new file only
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT}")
        self._create_schema()
        self.outbox = SqliteOutbox(transaction=self._tx, reading=self.reading, clock=clock)

    def _create_schema(self) -> None:
        with self._tx() as db:
            for stmt in SCHEMA.strip().split(";"):
                if stmt.strip():
                    db.execute(stmt)
            db.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', ?)",
                (str(SCHEMA_VERSION),),
            )
            mode = db.execute("PRAGMA auto_vacuum").fetchone()[0]
        if mode != 2 and self.path != ":memory:":
            log.warning(
                "spikewatch: the event store %s was created without auto_vacuum, so "
                "retention frees space inside it but the file never shrinks; to change "
                "that, stop the service once and run: sqlite3 %s "
                "'PRAGMA auto_vacuum=INCREMENTAL; VACUUM;'",
                self.path,
                self.path,
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

    @contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        """The connection, with the store's lock held (reads outside a transaction)."""
        with self._lock:
            yield self._db

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
            write_run(db, w, now)
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
            db.executemany(  # detector snapshots taken inside the batch
                "INSERT OR REPLACE INTO snapshots (run, step, monitor) VALUES (?, ?, ?)",
                [(w.run, step, monitor) for step, monitor in w.snapshots],
            )
            for inc in w.incidents:
                upsert_incident(db, inc, now)
            db.executemany(
                "INSERT INTO decisions (run, step, action, incident, body, at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (w.run, d["step"], d["action"], incident_of(d), json.dumps(d), now)
                    for d in w.decisions
                ],
            )
            for cmd in w.commands:
                upsert_command(db, cmd, now)
            insert_messages(db, w.outbox, now)

    def save_incident(self, incident: dict[str, Any]) -> None:
        """Insert or update one incident (scheduled jobs: stalls, sweeps)."""
        with self._tx() as db:
            upsert_incident(db, incident, self.clock())

    def save_commands(self, commands: list[dict[str, Any]]) -> None:
        """Insert or update commands (operator actions)."""
        with self._tx() as db:
            for cmd in commands:
                upsert_command(db, cmd, self.clock())

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

    def incidents(self, run: str, *, limit: int | None = None) -> list[dict[str, Any]]:
        """A run's newest ``limit`` incidents (default `incident_limit`), oldest first."""
        limit = self.incident_limit if limit is None else limit
        with self._lock:
            rows = self._db.execute(
                "SELECT body FROM (SELECT body, opened, detected_step, rowid AS r FROM incidents "
                "WHERE run = ? ORDER BY opened DESC, detected_step DESC, r DESC LIMIT ?) "
                "ORDER BY opened, detected_step, r",
                (run, -1 if limit is None else limit),
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
    def prune(
        self,
        *,
        keep_records: int,
        keep_snapshots: int,
        max_age_s: float,
        policy: RetentionPolicy | None = None,
    ) -> int:
        """Drop record batches beyond ``keep_records`` per run or older than ``max_age_s``,
        and all but the newest ``keep_snapshots`` snapshots; return batches dropped.

        ``policy`` (which then overrides the three numbers) also bounds incidents,
        decisions and sent Slack messages; see `retain` for every count.
        """
        policy = policy or RetentionPolicy(
            keep_records=keep_records, max_record_age_s=max_age_s, keep_snapshots=keep_snapshots
        )
        return self.retain(policy).batches

    def retain(self, policy: RetentionPolicy) -> Pruned:
        """Delete what ``policy`` no longer keeps, in small transactions (ingest goes on
        between them), then give the freed pages back and truncate the WAL."""
        return retain(self.path, self._tx, self.reading, policy, self.clock())

    def file_bytes(self) -> int:
        """Size of the database file and its WAL, in bytes (0 in memory)."""
        if self.path == ":memory:":
            return 0
        return sum(
            p.stat().st_size for p in (Path(self.path), Path(self.path + "-wal")) if p.exists()
        )
