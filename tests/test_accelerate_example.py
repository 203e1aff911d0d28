"""examples/accelerate_train.py: accelerate ``accumulate(4)``, real training on CPU.

The guard counts optimizer steps (150), not micro-batches (600), whether ``guard.step``
is called only when ``accelerator.sync_gradients`` or on every micro-batch.
"""

from __future__ import annotations

import importlib.util
import io
import json
import re
import sys
from contextlib import redirect_stdout
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

pytest.importorskip("accelerate")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "accelerate_train.py"
STEPS, ACCUMULATE = 150, 4

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("accelerate_train", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["accelerate_train"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def report(example: ModuleType) -> dict[str, Any]:
    """The example's own run: clean, poisoned unguarded, poisoned guarded."""
    out = io.StringIO()
    with redirect_stdout(out):
        code = example.main(["--steps", str(STEPS), "--accumulate", str(ACCUMULATE)])
    result: dict[str, Any] = json.loads(out.getvalue().strip().splitlines()[-1])
    result["exit_code"] = code
    return result


def test_poisoned_run_recovers_with_the_guard(report: dict[str, Any]) -> None:
    clean, unguarded, guarded = report["clean"], report["unguarded"], report["guarded"]
    assert report["exit_code"] == 0 and report["healthy"] is True
    assert unguarded >= 1.20 * clean
    assert abs(guarded["held_out_loss"] - clean) <= 0.05 * clean
    stats = guarded["guard"]
    assert stats["rollbacks"] >= 1
    assert stats["step_count"] == STEPS  # optimizer steps, not 600 micro-batches
    [(start, stop)] = stats["skip_ledger"]
    poison_start, poison_stop = report["poison"]
    assert start <= poison_start and stop >= poison_stop
    assert start % ACCUMULATE == 0  # snapshots sit on optimizer-step boundaries
    assert guarded["ledger_forwards"] == 0


def test_skip_ahead_counts_optimizer_steps(
    example: ModuleType, caplog: pytest.LogCaptureFixture
) -> None:
    data = example.make_data(2 * STEPS * ACCUMULATE, poison=range(480, 560))
    run = example.train(data, steps=STEPS, accumulate=ACCUMULATE, guarded=True)
    found = re.search(r"rolled back from step (\d+) .*batches \[(\d+), (\d+)\)", caplog.text)
    assert found is not None, caplog.text
    step, stop = int(found.group(1)), int(found.group(3))
    assert stop == (step + 1) * ACCUMULATE + 20 * ACCUMULATE  # skip_ahead=20 steps
    assert run.guard["skip_ledger"] == [(int(found.group(2)), stop)]


def test_healthy_twin_is_left_alone(example: ModuleType, report: dict[str, Any]) -> None:
    data = example.make_data(2 * STEPS * ACCUMULATE)
    run = example.train(data, steps=STEPS, accumulate=ACCUMULATE, guarded=True)
    assert run.guard["rollbacks"] == 0 and run.guard["skipped_batches"] == 0
    assert run.guard["step_count"] == run.optimizer_steps == STEPS
    assert run.held_out_loss == pytest.approx(report["clean"], rel=1e-6)


def test_step_on_every_micro_batch_still_counts_optimizer_steps(example: ModuleType) -> None:
    data = example.make_data(2 * STEPS * ACCUMULATE)
    run = example.train(
        data, steps=STEPS, accumulate=ACCUMULATE, guarded=True, every_micro_batch=True
    )
    assert run.guard["step_count"] == run.optimizer_steps == STEPS
    assert run.guard["rollbacks"] == 0
