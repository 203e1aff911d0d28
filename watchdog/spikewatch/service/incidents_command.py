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

COLUMNS = ("run", "id", "kind", "onset_step", "detected_step", "action", "status", "reason")


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
        query = "SELECT body FROM incidents" + (" WHERE run = ?" if run else "")
        rows = db.execute(query + " ORDER BY opened, detected_step", (run,) if run else ())
        return [json.loads(body) for (body,) in rows]
    except sqlite3.Error as exc:
        raise SpikewatchError(f"--db {path!r} is not a spikewatch event store ({exc})") from exc


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
        raise SpikewatchError(f"{url} answered {exc.code}: {exc.read()[:200]!r}") from exc
    except (OSError, ValueError) as exc:
        raise SpikewatchError(f"{url} cannot be read ({exc}): is the service running?") from exc


def format_table(incidents: list[dict[str, Any]]) -> str:
    """Incidents as an aligned table (reasons cut to 60 characters).

    Example:
        >>> print(format_table([{"run": "r", "id": "loss-spike-5", "kind": "spike",
        ...     "onset_step": 5, "detected_step": 5, "action": "watch", "status": "closed",
        ...     "reason": "one bad batch"}]))
        run  id            kind   onset_step  detected_step  action  status  reason
        r    loss-spike-5  spike  5           5              watch   closed  one bad batch
    """
    if not incidents:
        return "no incidents"
    rows = [[str(i.get(c, ""))[:60] for c in COLUMNS] for i in incidents]
    widths = [max(len(c), *(len(r[k]) for r in rows)) for k, c in enumerate(COLUMNS)]
    lines = [COLUMNS, *rows]
    return "\n".join(
        "  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def run(args: argparse.Namespace) -> int:
    """Print the incidents."""
    incidents = from_store(args.db, args.run) if args.db else from_service(args.url, args.run)
    if args.json:
        sys.stdout.write("".join(json.dumps(i) + "\n" for i in incidents))
    else:
        sys.stdout.write(format_table(incidents) + "\n")
    return 0
