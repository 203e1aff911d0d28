"""HF ``Trainer`` overhead: the time `SpikewatchCallback` adds to a step at ``logging_steps=50``.

Run ``python bench/overhead_hf.py [--json] [--quick] [--steps N]`` (``bench/overhead.py``
prints this table too, after its own). For each model size a tiny GPT-2 (built from a
config, no download) is trained by a bare ``Trainer`` and by one with the callback at its
defaults (``snapshot_every=100``, ``keep_snapshots=4``), in the order bare, guarded,
guarded, bare, each for the same steps on the same data.

The added time is read inside the guarded runs: the time in the callback's events
(``on_pre_optimizer_step``, ``on_step_end``, ``on_epoch_end``) plus what its taps on the
Trainer add (each tapped method's time minus the time in the Trainer's own method under
it), summed over the run (so the monitor hand-offs every 8 steps and the snapshots
every 100 are in it) and divided by the steps. The step is the bare runs' median time
from one ``on_step_begin`` to the next (data, forward, backward, clip, optimizer,
scheduler, logging). Both are CPU time of the training thread (``time.thread_time_ns``;
the timers' own cost counts as the callback's). Cross-check: the guarded runs' median
step over the bare runs' (whole steps, noisy on a busy host).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from spikewatch_hooks.adapters.hf import SpikewatchCallback

# CPU time of the training thread (torch runs on it with one thread): what the callback
# costs, without the time other processes of a busy host take the core away.
clock = time.thread_time_ns
EVENTS = ("on_pre_optimizer_step", "on_step_end", "on_epoch_end")
TAPPED = ("get_batch_samples", "training_step", "_get_grad_norm")


@dataclass(frozen=True, kw_only=True)
class Size:
    """One model and batch."""

    name: str
    dim: int
    layers: int
    heads: int
    context: int
    batch: int
    vocab: int = 96


SIZES = (
    # bench/overhead.py's "small" TinyGPT shape (0.86 M params): the headline.
    Size(name="small", dim=128, layers=4, heads=4, context=32, batch=8, vocab=256),
    # The tests' 30 k-param toy: the callback's fixed µs against a very short step.
    Size(name="tiny (tests)", dim=32, layers=2, heads=2, context=32, batch=16),
)
HEADLINE = SIZES[0].name


class Tokens(Dataset[dict[str, torch.Tensor]]):
    """Seeded random token windows (labels = inputs)."""

    def __init__(self, n: int, size: Size) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, size.vocab, (n, size.context), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.x[i], "labels": self.x[i]}


class StepClock(TrainerCallback):
    """Times each step from one ``on_step_begin`` to the next."""

    def __init__(self) -> None:
        self.begins: list[int] = []

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        self.begins.append(clock())

    def step_ms(self) -> float:
        """Median step, leaving out the first 10 (warm-up)."""
        gaps = [b - a for a, b in zip(self.begins[10:], self.begins[11:], strict=False)]
        return statistics.median(gaps) / 1e6


class OwnTime(TrainerCallback):
    """Sums the guard callback's own time: its events and what its taps add."""

    def __init__(self, guard: SpikewatchCallback) -> None:
        self.own_ns = 0
        for event in EVENTS:
            setattr(guard, event, self._timed(getattr(guard, event), sign=1))

    def _timed(self, fn: Callable[..., Any], *, sign: int) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                self.own_ns += sign * (clock() - t0)

        return timed

    def under(self, trainer: Trainer) -> None:
        """Time the Trainer's own methods, before the guard taps them (subtracted)."""
        for name in TAPPED:
            setattr(trainer, name, self._timed(getattr(trainer, name), sign=-1))

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        trainer = self.trainer
        for name in TAPPED:  # now the guard's taps: their whole time is added
            setattr(trainer, name, self._timed(getattr(trainer, name), sign=1))

    trainer: Trainer


def run(size: Size, steps: int, *, guarded: bool) -> dict[str, float]:
    """Train ``steps`` steps; the median step and (guarded) the callback's own µs/step."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=size.vocab, n_positions=size.context, n_embd=size.dim,
                        n_layer=size.layers, n_head=size.heads, bos_token_id=None,
                        eos_token_id=None)  # fmt: skip
    model = GPT2LMHeadModel(config)
    step_clock = StepClock()
    callbacks: list[TrainerCallback] = [step_clock]
    own = None
    if guarded:
        guard = SpikewatchCallback(run_id="bench")
        own = OwnTime(guard)
        callbacks = [guard, own, step_clock]  # OwnTime's on_train_begin after the taps
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, logging_steps=50, report_to=[], save_strategy="no", use_cpu=True,
            max_steps=steps, per_device_train_batch_size=size.batch, learning_rate=1e-3,
            lr_scheduler_type="cosine", warmup_steps=10, dataloader_num_workers=0,
            train_sampling_strategy="sequential", disable_tqdm=True, seed=0,
        )  # fmt: skip
        data = Tokens(steps * size.batch, size)
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
        trainer.remove_callback(PrinterCallback)  # its log lines would mix with the table
        if own is not None:
            own.trainer = trainer
            own.under(trainer)
        trainer.train()
    result = {"step_ms": step_clock.step_ms()}
    if own is not None:
        result["own_us"] = own.own_ns / steps / 1e3
    return result


def measure(size: Size, steps: int) -> dict[str, Any]:
    """Bare, guarded, guarded, bare: the callback's added µs against the bare step."""
    order = (False, True, True, False)
    runs = [run(size, steps, guarded=g) for g in order]
    bare = statistics.mean(r["step_ms"] for r, g in zip(runs, order, strict=True) if not g)
    guarded = [r for r, g in zip(runs, order, strict=True) if g]
    own_us = statistics.mean(r["own_us"] for r in guarded)
    whole = statistics.mean(r["step_ms"] for r in guarded)
    params = sum(p.numel() for p in GPT2LMHeadModel(GPT2Config(
        vocab_size=size.vocab, n_positions=size.context, n_embd=size.dim, n_layer=size.layers,
        n_head=size.heads)).parameters())  # fmt: skip
    return {
        "size": asdict(size),
        "params": params,
        "bare_step_ms": bare,
        "added_us": own_us,
        "overhead_pct": 100 * own_us / 1e3 / bare,
        "guarded_step_ms": whole,
        "whole_step_ratio": whole / bare,
    }


def benchmark(sizes: Sequence[Size], steps: int) -> dict[str, Any]:
    """One entry per size, the headline (the small model's overhead) and the target."""
    torch.set_num_threads(1)
    rows = {s.name: measure(s, steps) for s in sizes}
    return {
        "logging_steps": 50,
        "steps": steps,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "headline": HEADLINE if HEADLINE in rows else next(iter(rows)),
        "overhead_pct": rows.get(HEADLINE, next(iter(rows.values())))["overhead_pct"],
        "target_pct": 1.0,
        "sizes": rows,
    }


def report_text(result: dict[str, Any]) -> str:
    """The table: bare step, the callback's added µs, its share, the whole-step ratio."""
    lines = [
        f"HF Trainer + SpikewatchCallback, logging_steps={result['logging_steps']}, "
        f"{result['steps']} steps per run (bare, guarded, guarded, bare), "
        f"torch {result['torch']}, {result['threads']} thread(s)",
        f"{'model':<14}{'params':>10}{'bare ms':>10}{'added µs':>10}{'overhead %':>12}"
        f"{'guarded/bare (whole step, noisy)':>34}",
    ]
    for name, r in result["sizes"].items():
        lines.append(
            f"{name:<14}{r['params']:>10,}{r['bare_step_ms']:>10.2f}{r['added_us']:>10.1f}"
            f"{r['overhead_pct']:>12.3f}{r['whole_step_ratio']:>34.3f}"
        )
    lines.append(
        f"HF headline overhead ({result['headline']}): {result['overhead_pct']:.3f}% "
        f"(target <= {result['target_pct']}%)"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, run the benchmark, print the table or JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--quick", action="store_true", help="the small model only, 150 steps")
    parser.add_argument(
        "--steps", type=int, default=None, help="steps per run (default 400; --quick 150)"
    )
    args = parser.parse_args(argv)
    sizes = SIZES[:1] if args.quick else SIZES
    result = benchmark(sizes, args.steps or (150 if args.quick else 400))
    print(json.dumps(result, indent=2) if args.json else report_text(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
