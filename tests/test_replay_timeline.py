"""The replay report keeps every decision in order, and the end of a curve decides nothing."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from conftest import falling_curve
from spikewatch.cli import main
from spikewatch.monitor import Monitor
from spikewatch.records import StepRecord
from spikewatch.replay.analyze import analyze
from spikewatch.replay.model import Curve


def lr_range_test(n: int = 1600, *, seed: int = 0) -> list[float]:
    """An LR range test: the loss falls, then climbs faster and faster as the LR grows."""
    rng = random.Random(seed)
    out = []
    for t in range(n):
        x = 4.0 * (0.6 + 0.4 * 0.995**t) + rng.gauss(0, 0.03)
        if t > 900:
            x += 0.02 * math.exp((t - 900) / 120.0) - 0.02
        out.append(x)
    return out


def test_every_decision_of_a_multi_decision_replay_is_listed_in_order() -> None:
    loss = lr_range_test()
    monitor = Monitor(run="lr.csv")
    want = [d for t, x in enumerate(loss) for d in monitor.observe(StepRecord("lr.csv", t, x))]
    report = analyze(Curve(path="lr.csv", format="csv", steps=list(range(len(loss))), loss=loss))
    got = [(d.step, d.action, d.incident) for d in report.decisions]
    assert got == [(d.step, d.action, d.signal and d.signal.incident) for d in want]
    assert [d.step for d in report.decisions] == sorted(d.step for d in report.decisions)
    acting = [d for d in report.decisions if d.action != "watch"]
    ladder = [(d.action, d.rollback_before_step, d.lr_factor, d.escalation) for d in acting[:4]]
    assert ladder == [
        ("rollback", 947, 1.0, 0),  # restore 100 steps before the onset at 1047
        ("rollback", 847, 0.5, 1),  # the same trouble again: twice the margin, half the LR
        ("rollback", 647, 0.25, 2),
        ("halt", None, 1.0, 3),
    ]
    assert all(d.incident == "loss-divergence-1047" for d in acting)
    assert "restore <= step 947" in acting[0].reason
    assert "budget is spent" in acting[3].reason
    # The replay goes on past the halt (nothing was rolled back): every later decision
    # is a halt that says so, listed too.
    assert all("halted earlier" in d.reason for d in acting[4:]) and len(acting) > 4
    # The incident keeps only its most severe action (and the first halt's reason).
    [event] = [e for e in report.events if e.action != "watch"]
    assert (event.action, event.incident) == ("halt", "loss-divergence-1047")
    assert "budget is spent" in event.reason


def test_json_report_lists_the_decisions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "lr.csv"
    rows = [f"{t},{x:.5f}" for t, x in enumerate(lr_range_test())]
    path.write_text("step,loss\n" + "\n".join(rows) + "\n")
    assert main(["replay", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) >= {"points", "events", "decisions"}
    actions = [d["action"] for d in report["decisions"] if d["action"] != "watch"]
    assert actions[:4] == ["rollback", "rollback", "rollback", "halt"]
    keys = {"step", "action", "reason", "rollback_before_step", "lr_factor", "incident"}
    assert all(d.keys() >= keys for d in report["decisions"])
    incidents = {e["incident"] for e in report["events"]}
    assert {d["incident"] for d in report["decisions"]} <= incidents
    assert main(["replay", str(path)]) == 0
    text = capsys.readouterr().out
    assert text.count(" rollback ") >= 3 and " halt " in text
    restore = [line for line in text.splitlines() if " rollback " in line]
    assert all(line.split()[0].isdigit() for line in restore[-3:])  # timeline rows by step


def test_a_candidate_open_at_the_end_is_unresolved_not_a_rollback() -> None:
    loss = falling_curve(600)
    loss[590:] = [x + 3.0 for x in loss[590:]]
    report = analyze(Curve(path="x.csv", format="csv", steps=list(range(600)), loss=loss))
    [event] = report.events
    assert (event.kind, event.onset_step, event.end_step, event.transient) == (
        "unresolved",
        590,
        None,
        None,
    )
    assert event.action == "watch"
    assert "before the candidate could be confirmed (0 of the 8" in event.reason
    assert all(d.action == "watch" for d in report.decisions)


def test_none_and_zero_grad_norms_never_skip_or_halt() -> None:
    rng = random.Random(2)
    n = 2000
    grads: list[float | None] = []
    for _ in range(n):
        r = rng.random()
        grads.append(None if r < 0.3 else 0.0 if r < 0.8 else 1.0 + rng.gauss(0, 0.05))
    grads[:60] = [0.0] * 60  # the log starts with zeros only
    loss = falling_curve(n, seed=2)
    report = analyze(
        Curve(path="x.csv", format="csv", steps=list(range(n)), loss=loss, grad_norm=grads)
    )
    assert report.decisions == []
    assert report.events == []
