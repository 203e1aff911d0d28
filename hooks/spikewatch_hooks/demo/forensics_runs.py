"""Forensics scenarios on `TinyGPT`: bad data, or a bad state, and what the probe says.

A map-style dataset of text windows read in order (a corrupted shard is a contiguous
run of dataset indices, so it meets the run as a burst of bad batches):

- ``random``: a share of the samples in a range of batches are random bytes;
- ``shift``: their labels are shifted (the text no longer predicts its next character);
- ``lr``: the data is clean, the learning rate jumps ``lr_jump`` x at ``lr_step``
  (a schedule bug): a state the same data cannot be blamed for.

Under torch.distributed (an initialised process group) the model is DDP-wrapped and
each rank reads its own shard of every batch (a `DistributedSampler`, in order).
Used by tests/test_forensics_runs.py, tests/test_forensics_dist.py, bench/forensics.py.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from spikewatch.forensics.verdict import ForensicsConfig
from spikewatch.policy import PolicyConfig
from spikewatch.settings import MonitorConfig
from spikewatch_hooks.demo.corpus import CharCorpus
from spikewatch_hooks.demo.model import TinyGPT
from spikewatch_hooks.demo.scenario import sample_loss
from spikewatch_hooks.guard import SpikeGuard

Scenario = Literal["random", "shift", "lr", "clean"]
Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class ForensicsSettings:
    """Sizes of one scenario run (the defaults: ~10-20 s on 2 CPU cores)."""

    steps: int = 500
    batch_size: int = 16
    context: int = 32
    dim: int = 64
    lr: float = 1e-2
    warmup: int = 30
    seed: int = 0
    poison_start: int = 330  # first bad batch (data position)
    poison_batches: int = 40
    poison_share: float = 0.5  # share of each bad batch's samples that are bad
    lr_step: int = 330
    lr_jump: float = 30.0
    eval_batches: int = 8

    def config(self, *, on_state: str = "lr_cut", enabled: bool = True) -> MonitorConfig:
        """Monitor settings sized to the run."""
        return MonitorConfig(
            policy=PolicyConfig(margin=20, skip_ahead=self.poison_batches, recurrence_steps=200),
            forensics=ForensicsConfig(on_state=on_state, enabled=enabled),  # type: ignore[arg-type]
        )


class Windows(Dataset[Batch]):
    """Text windows; ``poisoned`` maps a dataset index to how it is corrupted."""

    def __init__(self, corpus: CharCorpus, s: ForensicsSettings, poisoned: dict[int, str]) -> None:
        g = torch.Generator().manual_seed(s.seed + 11)
        limit = int(len(corpus.tokens) * 0.9) - s.context - 1
        self.starts = torch.randint(0, limit, (s.steps * s.batch_size * 2,), generator=g)
        self.tokens, self.context, self.vocab = corpus.tokens, s.context, corpus.vocab_size
        self.poisoned = poisoned

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> Batch:
        start = int(self.starts[index])
        chunk = self.tokens[start : start + self.context + 1]
        x, y = chunk[:-1], chunk[1:]
        kind = self.poisoned.get(index)
        if kind == "random":
            g = torch.Generator().manual_seed(index)
            noise = torch.randint(0, self.vocab, (self.context + 1,), generator=g)
            x, y = noise[:-1], noise[1:]
        elif kind == "shift":
            y = (y + 7) % self.vocab
        return x, y


def poisoned_indices(s: ForensicsSettings, scenario: Scenario) -> dict[int, str]:
    """The corrupted dataset indices: every other sample of the bad batches (seeded)."""
    if scenario not in ("random", "shift"):
        return {}
    g = torch.Generator().manual_seed(s.seed + 5)
    first, count = s.poison_start * s.batch_size, s.poison_batches * s.batch_size
    chosen = torch.rand(count, generator=g) < s.poison_share
    return {first + i: scenario for i in range(count) if bool(chosen[i])}


@dataclass
class ScenarioResult:
    """What one run did."""

    final_loss: float
    stats: dict[str, Any]
    poisoned: set[int]
    losses: list[float] = field(default_factory=list)
    checksum: float = 0.0  # sum of the final weights (equal on every rank under DDP)
    train_seconds: float = 0.0  # the training loop's wall time (steps and guard)

    @property
    def named(self) -> set[int]:
        """Dataset indices every verdict of the run named."""
        verdict = self.stats.get("last_verdict") or {}
        return {int(s["index"]) for s in verdict.get("samples", []) if s["index"] is not None}


def run(
    scenario: Scenario,
    s: ForensicsSettings,
    corpus: CharCorpus,
    *,
    guarded: bool = True,
    probe: bool = True,
    on_state: str = "lr_cut",
    quarantine_file: str | None = None,
    after_step: Callable[[SpikeGuard], None] | None = None,
) -> ScenarioResult:
    """Train one scenario run; ``probe=False`` is the guard without forensics."""
    torch.manual_seed(s.seed)
    gpt = TinyGPT(corpus.vocab_size, context=s.context, dim=s.dim, layers=2, heads=4)
    model: nn.Module = gpt
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(s, scenario))
    poisoned = poisoned_indices(s, scenario)
    data = Windows(corpus, s, poisoned)
    sampler: DistributedSampler[Batch] | None = None
    if dist.is_available() and dist.is_initialized():  # each rank reads its own shard
        model = DistributedDataParallel(gpt)
        sampler = DistributedSampler(data, shuffle=False)
    loader = DataLoader(data, batch_size=s.batch_size, shuffle=False, sampler=sampler)
    guard = None
    if guarded:
        guard = SpikeGuard(
            model, opt, sched, run_id=f"forensics-{scenario}", config=s.config(on_state=on_state),
            snapshot_every=10, keep_snapshots=8, probe_loss=sample_loss if probe else None,
            quarantine_file=quarantine_file,
        )  # fmt: skip
    result = ScenarioResult(final_loss=math.nan, stats={}, poisoned=set(poisoned))
    batches = guard.batches(loader) if guard is not None else iter(loader)
    started = time.perf_counter()
    for step, (x, y) in enumerate(batches):
        loss = sample_loss(model, (x, y)).mean()
        loss.backward()  # type: ignore[no-untyped-call]
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if guard is None:
            opt.step()
            sched.step()
        else:
            guard.step(loss=loss, grad_norm=grad_norm)
            if after_step is not None:
                after_step(guard)
        opt.zero_grad(set_to_none=True)
        result.losses.append(float(loss.detach()))
        done = guard.step_count if guard is not None else step + 1
        if done >= s.steps or (guard is not None and guard.halted):
            break
    result.train_seconds = time.perf_counter() - started
    result.final_loss = evaluate(gpt, corpus, s)
    result.checksum = float(sum(p.detach().double().sum() for p in gpt.parameters()))
    result.stats = guard.stats if guard is not None else {}
    return result


def evaluate(model: TinyGPT, corpus: CharCorpus, s: ForensicsSettings) -> float:
    """Mean loss on held-out text (the last 10 %), the same batches for every run."""
    g = torch.Generator().manual_seed(s.seed + 2)
    low, high = int(len(corpus.tokens) * 0.9), len(corpus.tokens) - s.context - 1
    total = 0.0
    with torch.no_grad():
        for _ in range(s.eval_batches):
            starts = torch.randint(low, high, (s.batch_size * 4,), generator=g)
            idx = starts[:, None] + torch.arange(s.context + 1)[None, :]
            chunk = corpus.tokens[idx]
            total += model.loss(chunk[:, :-1], chunk[:, 1:]).item()
    return total / s.eval_batches


def _schedule(s: ForensicsSettings, scenario: Scenario) -> Callable[[int], float]:
    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / s.warmup)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(step, s.steps) / s.steps))
        jump = s.lr_jump if scenario == "lr" and step >= s.lr_step else 1.0
        return warm * max(cosine, 0.1) * jump

    return factor


def with_steps(s: ForensicsSettings, steps: int) -> ForensicsSettings:
    """``s`` for a run of ``steps``, the trouble at the same fraction of it."""
    at = int(steps * 2 / 3)
    return replace(s, steps=steps, poison_start=at, lr_step=at)
