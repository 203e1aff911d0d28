"""``spikewatch incidents`` against a real service: from its API and from its store file."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

from service_process import ServiceProcess


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
