"""Retention of the event store: deletes in small transactions, then gives the space back.

One big ``DELETE`` holds the store's lock (and SQLite's write lock) for as long as it
takes, so ingest and /healthz wait behind it. Here every step deletes at most
``batch_rows`` rows in its own short transaction and then lets other threads in, so a
retention pass over millions of records costs ingest a few milliseconds at a time.

Deleted rows only become free pages inside the file; `compact` hands them back to the
file system with ``PRAGMA incremental_vacuum`` (databases created with
``auto_vacuum=INCREMENTAL``, see `EventStore`) and truncates the WAL with a checkpoint.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

log = logging.getLogger(__name__)

_Tx = Callable[[], AbstractContextManager[sqlite3.Connection]]
_PAUSE_S = 0.002  # between steps: long enough for a waiting ingest thread to take the lock


@dataclass(frozen=True, slots=True, kw_only=True)
class RetentionPolicy:
    """What the store keeps (see `ServiceConfig` for the meaning of each setting).

    ``None`` keeps everything of that kind.
    """

    keep_records: int
    max_record_age_s: float
    keep_snapshots: int
    keep_incidents: int | None = None
    max_incident_age_s: float | None = None
    keep_decisions: int | None = None
    max_decision_age_s: float | None = None
    batch_rows: int = 200


@dataclass(slots=True)
class Pruned:
    """Rows deleted by one retention pass, by table, and pages given back by `compact`."""

    batches: int = 0
    snapshots: int = 0
    incidents: int = 0
    decisions: int = 0
    outbox: int = 0
    freed_pages: int = 0


def delete_in_steps(tx: _Tx, table: str, where: str, params: tuple[object, ...], rows: int) -> int:
    """Delete the rows of ``table`` matching ``where``, ``rows`` per transaction."""
    total = 0
    sql = f"DELETE FROM {table} WHERE rowid IN (SELECT rowid FROM {table} WHERE {where} LIMIT ?)"
    while True:
        with tx() as db:
            n = db.execute(sql, (*params, rows)).rowcount
        total += n
        if n < rows:
            return total
        time.sleep(_PAUSE_S)


def _newest_boundary(read: _Tx, sql: str, params: tuple[object, ...], keep: int) -> int | None:
    """The id of the row where the newest ``keep`` (summed by the query's 2nd column) end."""
    total = 0
    with read() as db:
        for row_id, count in db.execute(sql, params):
            total += count
            if total >= keep:
                return int(row_id)
    return None


def prune(tx: _Tx, read: _Tx, policy: RetentionPolicy, now: float) -> Pruned:
    """One retention pass over every table the policy bounds."""
    out, step = Pruned(), policy.batch_rows
    # Never a batch the stored monitor state does not include yet (a restart replays those).
    saved = "id <= (SELECT state_batch FROM runs WHERE runs.run = batches.run)"
    cutoff = now - policy.max_record_age_s
    out.batches += delete_in_steps(tx, "batches", f"received < ? AND {saved}", (cutoff,), step)
    with read() as db:
        runs = [r for (r,) in db.execute("SELECT run FROM runs").fetchall()]
    for run in runs:
        boundary = _newest_boundary(
            read,
            "SELECT id, count FROM batches WHERE run = ? ORDER BY id DESC",
            (run,),
            policy.keep_records,
        )
        if boundary is not None:
            where = f"run = ? AND id < ? AND {saved}"
            out.batches += delete_in_steps(tx, "batches", where, (run, boundary), step)
        out.snapshots += delete_in_steps(
            tx,
            "snapshots",
            "run = ? AND step NOT IN (SELECT step FROM snapshots WHERE run = ? "
            "ORDER BY step DESC LIMIT ?)",
            (run, run, policy.keep_snapshots),
            step,
        )
        out.incidents += _prune_history(tx, read, run, "incidents", policy=policy, now=now)
        out.decisions += _prune_history(tx, read, run, "decisions", policy=policy, now=now)
    if policy.max_incident_age_s is not None:
        # Sent messages are kept as long as incidents, then go; an unsent message that
        # old is news nobody needs any more (logged, so the loss is visible).
        gone = now - policy.max_incident_age_s
        out.outbox += delete_in_steps(tx, "outbox", "sent IS NOT NULL AND sent < ?", (gone,), step)
        stale = delete_in_steps(tx, "outbox", "sent IS NULL AND created < ?", (gone,), step)
        if stale:
            log.warning("spikewatch: dropped %d Slack messages unsent for too long", stale)
        out.outbox += stale
    return out


def _prune_history(
    tx: _Tx, read: _Tx, run: str, table: str, *, policy: RetentionPolicy, now: float
) -> int:
    """A run's incidents or decisions older than ``max_*_age_s`` or beyond the newest
    ``keep_*``."""
    incidents = table == "incidents"
    keep = policy.keep_incidents if incidents else policy.keep_decisions
    max_age = policy.max_incident_age_s if incidents else policy.max_decision_age_s
    when, order = ("updated", "opened DESC, rowid DESC") if incidents else ("at", "id DESC")
    step, dropped = policy.batch_rows, 0
    if max_age is not None:
        dropped += delete_in_steps(tx, table, f"run = ? AND {when} < ?", (run, now - max_age), step)
    if keep is not None:
        with read() as db:
            count = int(
                db.execute(f"SELECT COUNT(*) FROM {table} WHERE run = ?", (run,)).fetchone()[0]
            )
        if count > keep:
            newest = f"SELECT rowid FROM {table} WHERE run = ? ORDER BY {order} LIMIT ?"
            where = f"run = ? AND rowid NOT IN ({newest})"
            dropped += delete_in_steps(tx, table, where, (run, run, keep), step)
    return dropped


def compact(read: _Tx, *, pages_per_step: int = 256) -> int:
    """Give free pages back to the file system, then truncate the WAL; return pages freed.

    Only databases whose ``auto_vacuum`` is ``INCREMENTAL`` can shrink this way; for
    the others the free pages are reused by later writes (see the README).
    """
    freed = 0
    with read() as db:
        if db.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
            return 0
    while True:
        with read() as db:
            free = int(db.execute("PRAGMA freelist_count").fetchone()[0])
            if free == 0:
                break
            # executescript steps the pragma to the end; execute() frees one page per call.
            db.executescript(f"PRAGMA incremental_vacuum({pages_per_step});")
            left = int(db.execute("PRAGMA freelist_count").fetchone()[0])
        freed += free - left
        if left >= free:  # nothing moved (a reader holds pages): try next pass
            break
        time.sleep(_PAUSE_S)
    with read() as db:
        # A short busy timeout: a reader (spikewatch incidents --db) must not make the
        # checkpoint wait under the store's lock; the next pass truncates instead.
        db.execute("PRAGMA busy_timeout=100")
        try:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        finally:
            db.execute("PRAGMA busy_timeout=5000")
    return freed


def retain(path: str, tx: _Tx, read: _Tx, policy: RetentionPolicy, now: float) -> Pruned:
    """`prune`, then `compact`, with the WAL checkpointed after every step.

    Each step's pages are checkpointed right after it, on a second connection and
    outside the store's lock (a passive checkpoint runs beside writers); otherwise the
    WAL fills with retention's pages and the ingest commit that crosses
    ``wal_autocheckpoint`` pays to copy them all.
    """
    if path == ":memory:":
        return prune(tx, read, policy, now)
    aside = sqlite3.connect(path, check_same_thread=False, isolation_level=None)

    @contextmanager
    def step(open_step: _Tx) -> Iterator[sqlite3.Connection]:
        with open_step() as db:
            yield db
        aside.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    try:
        pruned = prune(lambda: step(tx), lambda: step(read), policy, now)
        pruned.freed_pages = compact(lambda: step(read))
    finally:
        aside.close()
    return pruned
