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
