"""``spikewatch incidents``: what happened, from the event store or a running service."""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from spikewatch.errors import SpikewatchError
from spikewatch.service.incidents_table import format_table


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``incidents`` to the command line."""
    p = subparsers.add_parser(
        "incidents",
        help="list incidents from the event store (--db) or a running service (--url)",
        description="List the incidents the monitor service recorded, oldest first.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--db", help="the service's SQLite event store (read-only)")
    source.add_argument("--url", help="a running `spikewatch serve`, e.g. http://127.0.0.1:9650")
    p.add_argument("--run", help="only this run")
    p.add_argument("--json", action="store_true", help="print JSON lines")
    p.add_argument("--wide", action="store_true", help="print whole reasons in the table")
    p.set_defaults(handler=run)


def from_store(path: str, run: str | None) -> list[dict[str, Any]]:
    """Incidents from a store file, opened read-only (the service may be running).

    Example:
        >>> from spikewatch.service.store import EventStore
        >>> import tempfile, os
        >>> db = os.path.join(tempfile.mkdtemp(), "events.db")
        >>> EventStore(db).save_incident({"run": "r", "id": "loss-spike-5", "kind": "spike",
        ...     "onset_step": 5, "detected_step": 5, "action": "watch", "status": "closed",
        ...     "reason": "one bad batch"})
        >>> [i["id"] for i in from_store(db, None)]
        ['loss-spike-5']
    """
    if not Path(path).is_file():
        raise SpikewatchError(f"--db {path!r} does not exist: pass the store `serve --db` uses")
    try:
        db = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True)
        where, params = (" WHERE run = ?", (run,)) if run else ("", ())
        rows = db.execute(f"SELECT body FROM incidents{where} ORDER BY opened, detected_step",
                          params)  # fmt: skip
        incidents = [json.loads(body) for (body,) in rows]
        commands = [json.loads(b) for (b,) in db.execute(
            f"SELECT body FROM commands{where} ORDER BY created, id", params)]  # fmt: skip
        return with_commands(incidents, commands)
    except sqlite3.Error as exc:
        raise SpikewatchError(f"--db {path!r} is not a spikewatch event store ({exc})") from exc


def with_commands(
    incidents: list[dict[str, Any]], commands: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Each incident with its newest command (``command``); an incident whose command the
    trainer has not applied yet shows that command's status, never ``closed``. Every
    incident has a ``verdict`` (None: no forensics verdict, or a store from before them).

    Example:
        >>> inc = [{"id": "loss-spike-5", "status": "closed", "action": "rollback"}]
        >>> cmd = [{"id": "c1", "incident": "loss-spike-5", "action": "rollback",
        ...         "status": "pending"}]
        >>> with_commands(inc, cmd)[0]["status"], with_commands(inc, [])[0]["status"]
        ('rollback pending', 'closed')
        >>> print(with_commands(inc, [])[0]["verdict"])
        None
    """
    newest = {c.get("incident"): c for c in commands if c.get("incident")}
    out = []
    for stored in incidents:
        incident = {**stored, "verdict": stored.get("verdict")}
        cmd = newest.get(incident.get("id"))
        if cmd is None:
            out.append(incident)
            continue
        view = {**incident, "command": {k: cmd.get(k) for k in ("id", "action", "status")}}
        if cmd.get("status") in ("pending", "proposed"):
            view["status"] = f"{cmd.get('action')} {cmd.get('status')}"
        out.append(view)
    return out


def from_service(url: str, run: str | None) -> list[dict[str, Any]]:
    """Incidents from a running service's API (GET needs no token)."""
    base = url.rstrip("/")
    runs = [run] if run else [r["run"] for r in _get(f"{base}/v1/runs")["runs"]]
    out: list[dict[str, Any]] = []
    for name in runs:
        quoted = urllib.parse.quote(name, safe="")
        out.extend(_get(f"{base}/v1/runs/{quoted}/incidents")["incidents"])
    return out


def _get(url: str) -> Any:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=10) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise SpikewatchError(f"{url} answered {exc.code}: {_error_text(exc.read())}") from exc
    except (OSError, ValueError) as exc:
        raise SpikewatchError(f"{url} cannot be read ({exc}): is the service running?") from exc


def _error_text(body: bytes) -> str:
    """The service's ``{"error": ...}`` message, or the start of whatever came back."""
    try:
        message = json.loads(body).get("error")
    except (ValueError, AttributeError):
        message = None
    return str(message) if message else body[:200].decode(errors="replace").strip()


def run(args: argparse.Namespace) -> int:
    """Print the incidents."""
    incidents = from_store(args.db, args.run) if args.db else from_service(args.url, args.run)
    if args.json:
        sys.stdout.write("".join(json.dumps(i) + "\n" for i in incidents))
    else:
        width = None if args.wide else 60
        sys.stdout.write(format_table(incidents, reason_width=width) + "\n")
    return 0
