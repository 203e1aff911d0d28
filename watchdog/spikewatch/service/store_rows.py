"""How one row of each event-store table is written (inside the caller's transaction)."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from spikewatch.service.store_schema import BatchWrite


def write_run(db: sqlite3.Connection, w: BatchWrite, now: float) -> None:
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


def upsert_incident(db: sqlite3.Connection, inc: dict[str, Any], now: float) -> None:
    """Insert or update an incident (its first ``opened`` time stays)."""
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


def upsert_command(db: sqlite3.Connection, cmd: dict[str, Any], now: float) -> None:
    """Insert or update a command (its ``created`` time stays)."""
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


def incident_of(decision: dict[str, Any]) -> str:
    """The incident a stored decision belongs to (``""`` when none)."""
    signal = decision.get("signal")
    return str(signal.get("incident", "")) if isinstance(signal, dict) else ""
