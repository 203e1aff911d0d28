"""Deep rollback from disk: a restart inside an open incident still reaches back to a
state from before the onset, and never trains a bad batch into the final model.

The kill is a real ``SIGKILL`` of a real training process (`deep_resume_worker.py`).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from spikewatch.policy import PolicyConfig
from spikewatch.records import Decision
from spikewatch.settings import MonitorConfig
from spikewatch_hooks.guard import SpikeGuard
from spikewatch_hooks.state.checkpoint import load_checkpoint

WORKER = Path(__file__).with_name("deep_resume_worker.py")
BAD_START, BAD_STOP = 220, 280


def _worker(mode: str, folder: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(WORKER), mode, str(folder)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        check=False,
    )


def test_kill_9_inside_an_incident_then_resume_restores_from_before_the_onset(
    tmp_path: Path,
) -> None:
    first = _worker("first", tmp_path)
    assert first.returncode == -signal.SIGKILL, first.stderr
    # The automatic checkpoint taken inside the incident did not replace the one before.
    assert load_checkpoint(tmp_path / "spikewatch-latest.pt")["guard"]["step"] == 230
    assert load_checkpoint(tmp_path / "spikewatch-good.pt")["guard"]["step"] == 220

    resumed = _worker("resume", tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((tmp_path / "resumed.json").read_text())
    assert summary["resumed_at"] == 230
    # One rollback, to a state from before the onset (batch 220), loaded from disk.
    assert summary["restored_steps"] == [BAD_START]
    [rolled] = [m for m in summary["log"] if m.startswith("spikewatch: rolled back")]
    assert f"to step {BAD_START} (oldest checkpoint {tmp_path / 'spikewatch-good.pt'})" in rolled
    assert not any("keep_snapshots" in m for m in summary["log"])
    [(start, stop)] = summary["ledger"]
    assert start <= BAD_START and stop >= BAD_STOP
    # No bad batch in what the final model was trained on since the rollback ...
    assert not [p for p in summary["trained"] if BAD_START <= p < BAD_STOP]
    assert summary["trained"]  # ... and it trained on after the bad range
    # ... nor before it: bit-equal to plain training on [0, 220) and those batches.
    reference = _worker("reference", tmp_path)
    assert reference.returncode == 0, reference.stderr
    got, want = torch.load(tmp_path / "resumed.pt"), torch.load(tmp_path / "reference.pt")
    assert all(torch.equal(got[k], want[k]) for k in want)


def _setup() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    return model, torch.optim.AdamW(model.parameters(), lr=0.05)


def _train(guard: SpikeGuard, model: torch.nn.Module, n: int, *, bad: range = range(0)) -> None:
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(16, 8, generator=g) for _ in range(n)]
    for x in guard.batches(data):
        scale = 50.0 if guard.engine.position in bad else 1.0
        loss: Any = (model(x) - x.sum(dim=1, keepdim=True)).pow(2).mean() * scale
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        guard.step(loss=loss, grad_norm=grad_norm)
        guard.engine.optimizer.zero_grad(set_to_none=True)


def _rollback_to(step: int, now: int) -> Decision:
    return Decision(run="run", step=now, action="rollback", reason="test",
                    rollback_before_step=step)  # fmt: skip


def test_the_checkpoint_before_an_open_incident_is_kept_through_later_saves(
    tmp_path: Path,
) -> None:
    model, opt = _setup()
    config = MonitorConfig(policy=PolicyConfig(margin=5, skip_ahead=80))
    guard = SpikeGuard(model, opt, config=config, snapshot_every=10,
                       checkpoint_dir=tmp_path, checkpoint_every=4)  # fmt: skip
    _train(guard, model, 232, bad=range(220, 400))  # saves at 224, 228, 232: all inside
    assert load_checkpoint(tmp_path / "spikewatch-latest.pt")["guard"]["step"] == 232
    assert load_checkpoint(tmp_path / "spikewatch-good.pt")["guard"]["step"] == 220


def test_a_deep_restore_keeps_the_live_ledger_and_counters(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model, opt = _setup()
    guard = SpikeGuard(model, opt, snapshot_every=10, keep_snapshots=1,
                       checkpoint_dir=tmp_path, checkpoint_every=40)  # fmt: skip
    _train(guard, model, 100)  # ring: 100; disk: latest 80 (no good one: all clean)
    assert not (tmp_path / "spikewatch-good.pt").exists()
    guard.engine.ledger.add(500, 510, reason="newer than the checkpoint")
    guard.engine.count("skipped_steps", 3)
    # Neither reaches back to 40: the oldest state there is, the checkpoint at 80.
    with caplog.at_level(logging.WARNING, logger="spikewatch_hooks"):
        guard.engine.rollback(_rollback_to(40, now=100))
    assert guard.step_count == 80
    assert "no snapshot or checkpoint at or before step 40; using the oldest checkpoint" in (
        caplog.text
    )
    assert guard.ledger.ranges() == [(80, 100), (500, 510)]
    assert guard.stats["skipped_steps"] == 3 and guard.stats["rollbacks"] == 1
    assert guard.engine.ring.steps == [80]


def test_a_deep_restore_loads_the_newest_checkpoint_at_or_before_the_target(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model, opt = _setup()
    guard = SpikeGuard(model, opt, snapshot_every=10, keep_snapshots=2,
                       checkpoint_dir=tmp_path, checkpoint_every=50)  # fmt: skip
    _train(guard, model, 90)  # ring: 80, 90; disk: step 50
    at_50 = load_checkpoint(tmp_path / "spikewatch-latest.pt")["model"]
    guard.engine.ledger.add(1000, 1001, reason="newer")
    with caplog.at_level(logging.WARNING, logger="spikewatch_hooks"):
        guard.engine.rollback(_rollback_to(60, now=guard.step_count))
    assert guard.step_count == 50
    assert all(torch.equal(model.state_dict()[k], at_50[k]) for k in at_50)
    assert f"(checkpoint {tmp_path / 'spikewatch-latest.pt'}: the ring holds none" in caplog.text
    assert (1000, 1001) in guard.ledger.ranges()
    assert guard.ledger.ranges()[0][0] == 50


def test_without_checkpoint_dir_the_advice_names_both_fixes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model, opt = _setup()
    guard = SpikeGuard(model, opt, snapshot_every=10, keep_snapshots=1)
    _train(guard, model, 30)
    with caplog.at_level(logging.WARNING, logger="spikewatch_hooks"):
        guard.engine.rollback(_rollback_to(5, now=30))
    assert "raise keep_snapshots, or set checkpoint_dir, to reach further back" in caplog.text
