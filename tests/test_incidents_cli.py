"""``spikewatch incidents`` against a real service: from its API and from its store file."""

from __future__ import annotations

import itertools
import json
import random
import sqlite3
import subprocess
import sys
from pathlib import Path

from forensics_trainer import BAD_INDICES, judged_rollback
from service_process import TOKEN, ServiceProcess


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spikewatch.cli", "incidents", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_incidents_from_the_api_and_from_the_store_agree(tmp_path: Path) -> None:
    rng = random.Random(0)
    records = [
        {"step": t, "loss": 3.0 - 0.001 * t + rng.gauss(0, 0.02) + (2.0 if t == 250 else 0.0)}
        for t in range(400)
    ]
    with ServiceProcess(tmp_path) as svc:
        for i in range(0, 400, 100):
            assert svc.post("/v1/runs/gpt/records", {"records": records[i : i + 100]})[0] == 200
        from_api = _cli("--url", svc.url, "--json")
        from_db = _cli("--db", str(svc.db), "--run", "gpt", "--json")  # the service is running
        table = _cli("--url", svc.url)
    assert from_api.returncode == from_db.returncode == table.returncode == 0, from_api.stderr
    incidents = [json.loads(line) for line in from_api.stdout.splitlines()]
    assert [(i["id"], i["kind"], i["onset_step"]) for i in incidents] == [
        ("loss-spike-250", "spike", 250)
    ]
    assert from_db.stdout == from_api.stdout
    assert table.stdout.splitlines()[1].split()[:3] == ["gpt", "loss-spike-250", "spike"]


def test_a_missing_store_is_a_one_line_error(tmp_path: Path) -> None:
    done = _cli("--db", str(tmp_path / "nope.db"))
    assert done.returncode == 2
    assert "does not exist: pass the store `serve --db` uses" in done.stderr


def test_an_unknown_run_is_a_readable_error_and_long_reasons_end_in_an_ellipsis(
    tmp_path: Path,
) -> None:
    records = [{"step": t, "loss": 3.0 if t < 300 else 6.0} for t in range(400)]
    with ServiceProcess(tmp_path) as svc:
        assert svc.post("/v1/runs/gpt/records", {"records": records})[0] == 200
        unknown = _cli("--url", svc.url, "--run", "nope")
        table, wide = _cli("--url", svc.url), _cli("--url", svc.url, "--wide")
    assert unknown.returncode == 2
    assert "answered 404: no run 'nope': it has sent no records yet" in unknown.stderr
    assert "b'" not in unknown.stderr  # no raw bytes
    reasons = [line.split("  ")[-1] for line in table.stdout.splitlines()[1:]]
    assert any(r.endswith("…") for r in reasons), table.stdout
    assert all(len(r) <= 60 and not r.endswith(" …") for r in reasons)
    whole = [line for line in wide.stdout.splitlines()[1:] if "level_shift" in line]
    assert whole and not whole[0].endswith("…") and len(whole[0].split("  ")[-1]) > 60


def test_an_incident_waiting_on_its_command_does_not_show_closed(tmp_path: Path) -> None:
    rng = random.Random(1)
    shifted = [
        {"step": t, "loss": 3.0 + rng.gauss(0, 0.02) + (1.5 if t >= 300 else 0.0)}
        for t in range(400)
    ]
    with ServiceProcess(tmp_path) as svc:
        _, answer = svc.post("/v1/runs/gpt/records", {"records": shifted, "seq": 1, "client": "c"})
        [cmd] = answer["commands"]  # the service decided a rollback; the trainer has not acked
        waiting = svc.get("/v1/runs/gpt/incidents")[1]["incidents"]
        table = _cli("--db", str(svc.db))
        svc.post(
            "/v1/runs/gpt/records", {"records": [], "acks": [cmd["id"]], "seq": 2, "client": "c"}
        )
        applied = svc.get("/v1/runs/gpt/incidents")[1]["incidents"]
    [rollback] = [i for i in waiting if i["action"] == "rollback"]
    assert rollback["status"] == "rollback pending" and rollback["command"]["id"] == cmd["id"]
    assert "rollback pending" in table.stdout
    [done] = [i for i in applied if i["action"] == "rollback"]
    assert done["status"] != "rollback pending" and done["command"]["status"] == "applied"


def cause_in(row: str, header: str) -> str:
    """The cause column of a table row (a status may hold a space: "rollback pending")."""
    return row[header.index(" cause ") + 1 :].split(maxsplit=1)[0]


def test_a_verdict_shows_its_cause_and_what_it_found_under_its_incident(tmp_path: Path) -> None:
    with ServiceProcess(tmp_path) as svc:
        judged = judged_rollback(svc.url, "gpt-data", TOKEN, cause="data")
        plain = [{"step": t, "loss": 3.0 if t < 300 else 6.0} for t in range(400)]
        assert svc.post("/v1/runs/plain/records", {"records": plain})[0] == 200
        table, from_db = _cli("--url", svc.url), _cli("--db", str(svc.db))
        as_json = _cli("--url", svc.url, "--run", "gpt-data", "--json")
    assert table.returncode == from_db.returncode == as_json.returncode == 0, table.stderr
    assert from_db.stdout == table.stdout
    lines = table.stdout.splitlines()
    assert lines[0].split()[-2:] == ["cause", "reason"]
    [row] = [n for n, line in enumerate(lines) if line.startswith("gpt-data ")]
    assert cause_in(lines[row], lines[0]) == "data"
    under = list(itertools.takewhile(lambda line: line.startswith(" "), lines[row + 1 :]))
    first = ", ".join(str(i) for i in BAD_INDICES[:5])
    assert under[0].startswith("  └ why: 2 of 3 suspect batches and 12 samples stand out")
    assert under[-2:] == [
        "    action: skip the batches, quarantine the samples",
        f"    samples: {first} +7 more",
    ]
    # The why is wrapped under itself, never cut: every word of it is there.
    why = " ".join(line.strip() for line in under[:-2]).removeprefix("└ why: ")
    assert why == judged.verdict.why
    assert all(len(line) <= 100 for line in under) and len(under) > 3
    # An incident without a verdict: "-", and nothing under its row.
    plain_rows = [n for n, line in enumerate(lines) if line.startswith("plain ")]
    assert plain_rows and all(cause_in(lines[n], lines[0]) == "-" for n in plain_rows)
    assert all(not lines[n + 1].startswith(" ") for n in plain_rows if n + 1 < len(lines))
    [shown] = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert shown["verdict"]["samples"] == judged.verdict.to_json()["samples"]


def test_a_store_from_before_verdicts_lists_with_no_cause(tmp_path: Path) -> None:
    with ServiceProcess(tmp_path) as svc:
        judged_rollback(svc.url, "gpt-data", TOKEN, cause="data")
    with sqlite3.connect(svc.db) as raw:  # as an older spikewatch wrote the incidents
        raw.execute("UPDATE incidents SET body = json_remove(body, '$.verdict')")
    table, as_json = _cli("--db", str(svc.db)), _cli("--db", str(svc.db), "--json")
    assert table.returncode == as_json.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert rows and all(cause_in(row, header) == "-" for row in rows), table.stdout
    assert all(json.loads(line)["verdict"] is None for line in as_json.stdout.splitlines())
