"""`spikewatch demo` end to end through the command line (a shortened run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spikewatch.cli import main


def test_demo_json_reports_the_rollback_and_writes_the_chart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    chart = tmp_path / "demo.png"
    code = main(
        [
            "demo",
            "--steps",
            "300",
            "--threads",
            "1",
            "--json",
            "--plot",
            str(chart),
        ]
    )
    assert code == 0
    out, err = capsys.readouterr()
    summary = json.loads(out)
    # stderr is not a terminal here: progress comes as plain lines, one per finished run.
    for kind in ("clean", "unguarded", "guarded"):
        assert f"{kind}: 300 steps in " in err
    assert "\r" not in err
    assert summary["threads"] == 1
    for key in (
        "clean_final_loss",
        "unguarded_final_loss",
        "guarded_final_loss",
        "rollbacks",
        "skipped_batches",
        "onset_step",
        "detected_step",
    ):
        assert key in summary
    assert summary["rollbacks"] >= 1
    assert summary["onset_step"] == 240  # the first bad batch (80 % of 300 steps)
    clean = summary["clean_final_loss"]
    assert abs(summary["guarded_final_loss"] - clean) < abs(summary["unguarded_final_loss"] - clean)
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_picks_one_thread_on_a_small_host() -> None:
    pytest.importorskip("torch")
    from spikewatch_hooks.demo.run import default_threads  # noqa: PLC0415

    assert [default_threads(n) for n in (1, 2, 3, 4, 16)] == [1, 1, 1, 2, 4]


def test_demo_rejects_too_few_steps(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--steps", "10"]) == 2
    assert "--steps=10 is invalid: use an integer >= 100" in capsys.readouterr().err
