"""HF resume after a rollback: the guard's state rides in every HF checkpoint.

A guarded, poisoned run (`hf_resume_worker`) rolls back, writes a checkpoint after the
rollback and is killed with SIGKILL right after it; a fresh process-state Trainer and
callback resume with ``trainer.train(resume_from_checkpoint=...)`` and must end where
the uninterrupted guarded run ends, without computing any batch of the skip ledger.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import torch

from hf_scenario import SCENARIO, guard_for, held_out_loss, make_trainer, train
from spikewatch_hooks.adapters.hf.resume import STATE_KEY
from spikewatch_hooks.demo.corpus import CharCorpus, corpus_text

log = logging.getLogger(__name__)
WORKER = Path(__file__).with_name("hf_resume_worker.py")
SAVE_STEPS, KILL_AT = 140, 280  # checkpoints at 140 (before the poison) and 280 (after)


@pytest.fixture(scope="module")
def corpus() -> Iterator[CharCorpus]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield CharCorpus(corpus_text(200_000))
    torch.set_num_threads(threads)


def killed_after_checkpoint(out: Path) -> Path:
    """Run the worker until its checkpoint at KILL_AT is written, then SIGKILL it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(WORKER), str(out), str(SAVE_STEPS), str(KILL_AT)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not (out / "saved").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            _, err = proc.communicate()
            raise AssertionError(f"worker ended early ({proc.returncode}):\n{err.decode()[-3000:]}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    return out / f"checkpoint-{KILL_AT}"


def test_resume_after_rollback_ends_where_the_uninterrupted_run_ends(
    corpus: CharCorpus, tmp_path: Path
) -> None:
    s = SCENARIO
    callback = guard_for(s)
    model, whole, _ = train(corpus, tmp_path / "whole", s, poison=True, callback=callback)
    uninterrupted = held_out_loss(model, corpus, s)
    assert callback.stats["rollbacks"] == 1

    checkpoint = killed_after_checkpoint(tmp_path / "killed")
    saved: dict[str, Any] = json.loads((checkpoint / "trainer_state.json").read_text())
    guard = saved["stateful_callbacks"][STATE_KEY]["guard"]
    assert guard["stats"]["rollbacks"] == 1 and guard["ledger"]["ranges"]

    resumed_cb = guard_for(s)
    model, trainer, computed = make_trainer(
        corpus, tmp_path / "killed", s, poison=True, callbacks=[resumed_cb]
    )
    trainer.train(resume_from_checkpoint=str(checkpoint))
    resumed = held_out_loss(model, corpus, s)

    stats, ledger = resumed_cb.stats, resumed_cb.engine.ledger
    log.info("held-out loss: uninterrupted %.4f resumed %.4f", uninterrupted, resumed)
    assert abs(resumed - uninterrupted) <= 0.01 * uninterrupted, (uninterrupted, resumed)
    assert stats["rollbacks"] == 1 and not stats["halted"]  # the counters came back
    assert ledger.ranges() == callback.engine.ledger.ranges()
    assert all(p in ledger for p in s.poisoned_positions)
    # No ledger batch computed after the restart; the data picks up where it stopped.
    positions = computed.positions
    assert [p for p in positions if p in ledger] == []
    assert positions[0] == saved["stateful_callbacks"][STATE_KEY]["next_position"]
    # The owed steps came back: the surviving branch ends at max_steps updates.
    assert resumed_cb.engine.step_count == resumed_cb.engine.scheduler.last_epoch == s.steps
    assert trainer.state.global_step == whole.state.global_step
