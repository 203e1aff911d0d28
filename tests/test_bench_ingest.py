"""Smoke test of the ingest benchmark: a short run against a real service, no timing asserted."""

from __future__ import annotations

import doctest
import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_quick_ingest_benchmark_reports_every_figure_without_errors() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH / "ingest.py"), "--quick", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert {"records_per_s", "p99_ms", "pass", "errors", "baselines"} <= result.keys()
    assert result["records_per_s"] > 0
    assert result["errors"] == 0, [result[p]["error_samples"] for p in ("saturation", "offered")]
    for phase in ("warmup", "saturation", "offered"):
        assert result[phase]["errors"] == 0
        assert result[phase]["records"] == result[phase]["requests"] * result["settings"]["batch"]
    assert set(result["baselines"]) == {"observe", "observe_many", "service_code"}


def test_load_helpers_docstring_examples() -> None:
    # bench/ is outside pytest's doctest paths in pyproject, so its examples are run here.
    if str(BENCH) not in sys.path:
        sys.path.append(str(BENCH))
    import ingest_load  # noqa: PLC0415 - bench/ holds scripts, importable once on the path

    results = doctest.testmod(ingest_load)
    assert results.attempted > 0
    assert results.failed == 0
