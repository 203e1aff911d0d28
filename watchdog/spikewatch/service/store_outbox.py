"""The Slack outbox as a table of the event store (see `spikewatch.sinks.outbox`).

Ingest writes its messages with `insert_messages` inside its own transaction, so an
incident is never marked announced without the message that announces it; the sink's
sender reads and marks rows through `SqliteOutbox`. A row is kept (``sent`` set) after
delivery until retention drops it, so the table also tells what Slack got and when.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

from spikewatch.sinks.outbox import Backlog, OutboxMessage, OutboxRow

_Tx = Callable[[], AbstractContextManager[sqlite3.Connection]]


def insert_messages(db: sqlite3.Connection, messages: Sequence[OutboxMessage], now: float) -> None:
    """Add ``messages`` as unsent rows, due at once (inside the caller's transaction)."""
    db.executemany(
        "INSERT INTO outbox (kind, key, body, created, next_try) VALUES (?, ?, ?, ?, ?)",
        [(m.kind, m.key, json.dumps(m.body), now, now) for m in messages],
    )


class SqliteOutbox:
    """An `Outbox` on the event store's connection.

    Args:
        transaction: opens a write transaction on the store (its lock held).
        reading: holds the store's lock for a read and yields the connection.
        clock: when a row is written.
    """

    def __init__(
        self,
        *,
        transaction: _Tx,
        reading: _Tx,
        clock: Callable[[], float],
    ) -> None:
        self._tx, self._read, self.clock = transaction, reading, clock

    def add(self, messages: Sequence[OutboxMessage]) -> int:
        """Store ``messages`` (one transaction)."""
        with self._tx() as db:
            insert_messages(db, messages, self.clock())
        return len(messages)

    def due(self, now: float, limit: int) -> list[OutboxRow]:
        """Unsent rows due at ``now``, oldest first; none behind an older unsent row of
        its key (the partial index keeps both lookups on unsent rows only)."""
        with self._read() as db:
            rows = db.execute(
                "SELECT id, kind, key, body, created, attempts FROM outbox AS o "
                "WHERE sent IS NULL AND next_try <= ? AND (key = '' OR NOT EXISTS ("
                "SELECT 1 FROM outbox AS p WHERE p.sent IS NULL AND p.key = o.key "
                "AND p.id < o.id)) ORDER BY id LIMIT ?",
                (now, limit),
            ).fetchall()
        return [_row(r) for r in rows]

    def progress(self, row_id: int, body: dict[str, Any], thread: tuple[str, str]) -> None:
        """Keep the row's new body and the incident's thread in one transaction."""
        with self._tx() as db:
            db.execute("UPDATE outbox SET body = ? WHERE id = ?", (json.dumps(body), row_id))
            db.execute("INSERT OR REPLACE INTO slack_threads (key, ts) VALUES (?, ?)", thread)

    def sent(self, row_id: int, now: float) -> None:
        """Mark the row delivered."""
        with self._tx() as db:
            db.execute("UPDATE outbox SET sent = ?, last_error = NULL WHERE id = ?", (now, row_id))

    def failed(self, row_id: int, next_try: float, error: str) -> None:
        """Count the attempt, keep the error (for a person reading the table), wait."""
        with self._tx() as db:
            db.execute(
                "UPDATE outbox SET attempts = attempts + 1, next_try = ?, last_error = ? "
                "WHERE id = ?",
                (next_try, error[:500], row_id),
            )

    def threads(self) -> dict[str, str]:
        """Thread ts by incident key."""
        with self._read() as db:
            return dict(db.execute("SELECT key, ts FROM slack_threads").fetchall())

    def backlog(self) -> Backlog:
        """Unsent rows and the oldest one's creation time."""
        with self._read() as db:
            count, oldest = db.execute(
                "SELECT COUNT(*), MIN(created) FROM outbox WHERE sent IS NULL"
            ).fetchone()
        return Backlog(int(count), None if oldest is None else float(oldest))


def _row(row: tuple[Any, ...]) -> OutboxRow:
    row_id, kind, key, body, created, attempts = row
    message = OutboxMessage(kind=kind, key=key, body=json.loads(body))
    return OutboxRow(row_id, message, created, attempts)
