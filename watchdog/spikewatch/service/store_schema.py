"""The event store's tables and the records that go in and out of them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from spikewatch.sinks.outbox import OutboxMessage

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run TEXT PRIMARY KEY, created REAL NOT NULL, updated REAL NOT NULL,
    monitor TEXT NOT NULL, info TEXT NOT NULL, state_batch INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY, run TEXT NOT NULL, first_step INTEGER NOT NULL,
    last_step INTEGER NOT NULL, count INTEGER NOT NULL, received REAL NOT NULL, body BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS batches_by_run ON batches (run, id);
CREATE TABLE IF NOT EXISTS snapshots (
    run TEXT NOT NULL, step INTEGER NOT NULL, monitor TEXT NOT NULL, PRIMARY KEY (run, step));
CREATE TABLE IF NOT EXISTS incidents (
    run TEXT NOT NULL, id TEXT NOT NULL, kind TEXT NOT NULL, onset_step INTEGER NOT NULL,
    detected_step INTEGER NOT NULL, action TEXT NOT NULL, status TEXT NOT NULL,
    reason TEXT NOT NULL, body TEXT NOT NULL, opened REAL NOT NULL, updated REAL NOT NULL,
    PRIMARY KEY (run, id));
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY, run TEXT NOT NULL, step INTEGER NOT NULL, action TEXT NOT NULL,
    incident TEXT NOT NULL, body TEXT NOT NULL, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS commands (
    id TEXT PRIMARY KEY, run TEXT NOT NULL, action TEXT NOT NULL, status TEXT NOT NULL,
    source TEXT NOT NULL, body TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL);
CREATE INDEX IF NOT EXISTS commands_by_run ON commands (run, created);
CREATE TABLE IF NOT EXISTS slack_threads (key TEXT PRIMARY KEY, ts TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY, kind TEXT NOT NULL, key TEXT NOT NULL, body TEXT NOT NULL,
    created REAL NOT NULL, next_try REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT, sent REAL);
CREATE INDEX IF NOT EXISTS outbox_unsent ON outbox (key, id) WHERE sent IS NULL;
CREATE INDEX IF NOT EXISTS outbox_sent ON outbox (sent);
CREATE INDEX IF NOT EXISTS batches_by_received ON batches (received);
CREATE INDEX IF NOT EXISTS incidents_by_run ON incidents (run, opened);
CREATE INDEX IF NOT EXISTS decisions_by_run ON decisions (run, id);
CREATE INDEX IF NOT EXISTS decisions_by_time ON decisions (at);
"""


@dataclass(frozen=True, slots=True)
class StoredRun:
    """A run as persisted: its monitor state and the service's bookkeeping (``info``)."""

    run: str
    created: float
    monitor: dict[str, Any]
    info: dict[str, Any]
    state_batch: int = 0


@dataclass(slots=True)
class BatchWrite:
    """Everything one ingest request changes, written in one transaction."""

    run: str
    monitor: str | None
    info: dict[str, Any]
    body: bytes | None = None
    first_step: int = 0
    last_step: int = 0
    count: int = 0
    snapshot_step: int | None = None
    snapshots: list[tuple[int, str]] = field(default_factory=list)
    """Detector snapshots ``(step, monitor state JSON)`` taken inside the batch."""
    drop_snapshots_from: int | None = None
    incidents: list[dict[str, Any]] = field(default_factory=list)
    decisions: list[dict[str, Any]] = field(default_factory=list)
    commands: list[dict[str, Any]] = field(default_factory=list)
    outbox: list[OutboxMessage] = field(default_factory=list)
    """Slack messages the request caused, stored with it (see `store_outbox`)."""
