"""The HF callback never reads a step's loss or grad norm on the host (no per-step sync).

The Trainer's own loss and grad-norm tensors are made recording tensors (the
`test_no_sync` subclass) where the Trainer creates them, under the callback's taps; a
host read of them, or of anything computed from them, while one of the callback's events
runs is the callback's (the Trainer's own reads, e.g. its NaN filter, happen outside).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")

import torch

from hf_scenario import Scenario, make_trainer
from spikewatch_hooks.adapters.hf import SpikewatchCallback
from spikewatch_hooks.demo.corpus import CharCorpus, corpus_text
from test_no_sync import HOST_READS, _moves_to_a_device

EVENTS = ("on_train_begin", "on_pre_optimizer_step", "on_step_end", "on_epoch_end")


@pytest.fixture(scope="module")
def corpus() -> Iterator[CharCorpus]:
    yield CharCorpus(corpus_text(50_000))


class Inside:
    """Marks the time spent in the guard callback's events."""

    def __init__(self, guard: SpikewatchCallback) -> None:
        self.active = False
        for event in EVENTS:
            setattr(guard, event, self._marked(getattr(guard, event)))

    def _marked(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def marked(*args: Any, **kwargs: Any) -> Any:
            self.active = True
            try:
                return fn(*args, **kwargs)
            finally:
                self.active = False

        return marked


def step_tensor_class(inside: Inside, reads: list[str]) -> type[torch.Tensor]:
    """A recording Tensor subclass: host reads while the guard's events run go to ``reads``."""

    class StepTensor(torch.Tensor):
        @classmethod
        def __torch_function__(
            cls, func: Any, types: Any, args: Any = (), kwargs: Any = None
        ) -> Any:
            kwargs = kwargs or {}
            name = getattr(func, "__name__", repr(func))
            to_host = name == "to" and _moves_to_a_device(args[1:], kwargs)
            if inside.active and (name in HOST_READS or to_host):
                reads.append(name)
            return super().__torch_function__(func, types, args, kwargs)  # type: ignore[no-untyped-call]

    return StepTensor


class Recording:
    """Turns the Trainer's per-step loss and grad norm into recording tensors, under the
    guard's taps (installed before ``train()``, so the taps wrap these)."""

    def __init__(self, trainer: Any, step_tensor: type[torch.Tensor]) -> None:
        self.made = 0
        for name in ("training_step", "_get_grad_norm"):
            setattr(trainer, name, self._recorded(getattr(trainer, name), step_tensor))

    def _recorded(self, fn: Callable[..., Any], cls: type[torch.Tensor]) -> Callable[..., Any]:
        def recorded(*args: Any, **kwargs: Any) -> Any:
            value = fn(*args, **kwargs)
            self.made += 1
            return value.as_subclass(cls) if isinstance(value, torch.Tensor) else value

        return recorded


@pytest.mark.parametrize("accumulation", [1, 4])
def test_the_callback_reads_no_step_value_on_the_host(
    corpus: CharCorpus, tmp_path: Path, accumulation: int
) -> None:
    s = Scenario(steps=40, poison_batches=0, spare_batches=0, accumulation=accumulation)
    guard = SpikewatchCallback(run_id="hf-no-sync", snapshot_every=10)
    inside = Inside(guard)
    guard_reads: list[str] = []
    _, trainer, _ = make_trainer(corpus, tmp_path, s, poison=False, callbacks=[guard])
    recording = Recording(trainer, step_tensor_class(inside, guard_reads))
    trainer.train()
    assert recording.made == s.steps * (accumulation + 1)  # every step's values went through
    assert guard.engine.step_count == s.steps  # ... and reached the guard
    assert guard_reads == []  # the callback never reads them (the Trainer itself does)


def test_overhead_bench_quick_json() -> None:
    bench = Path(__file__).resolve().parents[1] / "bench" / "overhead_hf.py"
    done = subprocess.run(
        [sys.executable, str(bench), "--json", "--quick", "--steps", "24"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert set(result["sizes"]) == {"small"} and result["headline"] == "small"
    assert result["logging_steps"] == 50 and result["steps"] == 24
    row = result["sizes"]["small"]
    assert row["bare_step_ms"] > 0 and row["added_us"] > 0
    assert result["overhead_pct"] == row["overhead_pct"]
    assert row["overhead_pct"] == pytest.approx(100 * row["added_us"] / 1e3 / row["bare_step_ms"])
