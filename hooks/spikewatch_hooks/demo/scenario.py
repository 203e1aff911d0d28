"""Three real training runs of `TinyGPT`: clean, poisoned without the guard, poisoned with it.

The poison is a range of bad batches at a fixed *data position* (labels shifted: the
text no longer predicts its next character, as a corrupted shard would), so the guarded
run, which skips data after a rollback, meets the same bad data at the same place.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from spikewatch.policy import PolicyConfig
from spikewatch.settings import MonitorConfig
from spikewatch.transport import Transport
from spikewatch_hooks.demo.corpus import CharCorpus, corpus_text
from spikewatch_hooks.demo.model import TinyGPT
from spikewatch_hooks.guard import SpikeGuard

Kind = Literal["clean", "unguarded", "guarded"]
Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo; the defaults take 1.5-2.5 minutes on 2 CPU cores (1 torch thread)."""

    steps: int = 600
    poison_start: int = 480
    poison_batches: int = 60
    batch_size: int = 32
    context: int = 64
    lr: float = 3e-3
    warmup: int = 50
    seed: int = 0
    eval_batches: int = 16
    snapshot_every: int = 10

    @classmethod
    def for_steps(cls, steps: int) -> DemoSettings:
        """Settings for ``steps``, with the bad batches at the same fraction of the run."""
        return cls(steps=steps, poison_start=int(steps * 0.8), poison_batches=max(10, steps // 10))

    def guard_config(self) -> MonitorConfig:
        """Policy sized to this short run (a real run keeps the 100-step defaults)."""
        return MonitorConfig(policy=PolicyConfig(margin=20, skip_ahead=self.poison_batches))


@dataclass
class RunResult:
    """What one run did."""

    kind: Kind
    final_loss: float
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    onset_step: int | None = None
    detected_step: int | None = None
    rollback_step: int | None = None


def batches(corpus: CharCorpus, s: DemoSettings, *, poison: bool) -> Iterator[Batch]:
    """An endless, seeded stream of training batches from the first 90 % of the text."""
    g = torch.Generator().manual_seed(s.seed + 1)
    limit = int(len(corpus.tokens) * 0.9) - s.context - 1
    position = 0
    while True:
        starts = torch.randint(0, limit, (s.batch_size,), generator=g)
        x, y = _windows(corpus.tokens, starts, s.context)
        if poison and s.poison_start <= position < s.poison_start + s.poison_batches:
            y = (y + 7) % corpus.vocab_size  # the labels no longer match the text
        position += 1
        yield x, y


def evaluate(model: TinyGPT, corpus: CharCorpus, s: DemoSettings) -> float:
    """Mean loss on held-out text (the last 10 %), the same batches for every run."""
    g = torch.Generator().manual_seed(s.seed + 2)
    low, high = int(len(corpus.tokens) * 0.9), len(corpus.tokens) - s.context - 1
    total = 0.0
    with torch.no_grad():
        for _ in range(s.eval_batches):
            x, y = _windows(
                corpus.tokens, torch.randint(low, high, (s.batch_size,), generator=g), s.context
            )
            total += model.loss(x, y).item()
    return total / s.eval_batches


def train(
    kind: Kind,
    s: DemoSettings,
    corpus: CharCorpus,
    progress: Callable[[int, int], None] | None = None,
    *,
    transport: Transport | None = None,
) -> RunResult:
    """Train one run and report it (``transport``: where the guarded run's records go)."""
    torch.manual_seed(s.seed)
    model = TinyGPT(corpus.vocab_size, context=s.context)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(s))
    result = RunResult(kind=kind, final_loss=math.nan)
    stream = batches(corpus, s, poison=kind != "clean")
    if kind == "guarded":
        _train_guarded(
            model,
            opt=opt,
            sched=sched,
            stream=stream,
            s=s,
            result=result,
            progress=progress,
            transport=transport,
        )
    else:
        _train_plain(
            model, opt=opt, sched=sched, stream=stream, s=s, result=result, progress=progress
        )
    result.final_loss = evaluate(model, corpus, s)
    return result


def _train_plain(
    model: TinyGPT,
    *,
    opt: torch.optim.Optimizer,
    sched: object,
    stream: Iterator[Batch],
    s: DemoSettings,
    result: RunResult,
    progress: Callable[[int, int], None] | None,
) -> None:
    for step in range(s.steps):
        x, y = next(stream)
        loss = model.loss(x, y)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()  # type: ignore[attr-defined]
        opt.zero_grad(set_to_none=True)
        result.steps.append(step)
        result.losses.append(loss.item())
        if progress is not None:
            progress(step + 1, s.steps)


def _train_guarded(
    model: TinyGPT,
    *,
    opt: torch.optim.Optimizer,
    sched: object,
    stream: Iterator[Batch],
    s: DemoSettings,
    result: RunResult,
    progress: Callable[[int, int], None] | None,
    transport: Transport | None = None,
) -> None:
    guard = SpikeGuard(
        model=model,
        optimizer=opt,
        scheduler=sched,
        run_id="demo",
        config=s.guard_config(),
        snapshot_every=s.snapshot_every,
        keep_snapshots=8,
        transport=transport,
        probe_loss=sample_loss,  # forensics: after the rollback, was it the data?
    )
    for x, y in guard.batches(stream):
        step = guard.step_count
        loss = model.loss(x, y)
        loss.backward()  # type: ignore[no-untyped-call]
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        decision = guard.step(loss=loss, grad_norm=grad_norm)
        opt.zero_grad(set_to_none=True)
        result.steps.append(step)
        result.losses.append(float(loss.detach()))  # for the chart; the guard never reads it
        if decision is not None and decision.action == "rollback" and result.rollback_step is None:
            result.rollback_step = step
        if progress is not None:
            progress(min(guard.step_count, s.steps), s.steps)
        if guard.step_count >= s.steps or guard.halted:
            break
    guard.close()
    result.stats = guard.stats
    monitor = getattr(guard.transport, "monitor", None)
    for incident in [] if monitor is None else monitor.incidents:
        if incident.action == "rollback":
            result.onset_step, result.detected_step = incident.onset_step, incident.detected_step
            break


def sample_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Each sample's mean next-character loss (the forensics probe's loss function)."""
    x, y = batch
    logits = model(x)
    per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), y, reduction="none")
    return per_token.mean(dim=1)


def _windows(tokens: torch.Tensor, starts: torch.Tensor, context: int) -> Batch:
    idx = starts[:, None] + torch.arange(context + 1)[None, :]
    chunk = tokens[idx]
    return chunk[:, :-1], chunk[:, 1:]


def _schedule(s: DemoSettings) -> Callable[[int], float]:
    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / s.warmup)
        return warm * 0.5 * (1.0 + math.cos(math.pi * min(step, s.steps) / s.steps))

    return factor


def load_corpus() -> CharCorpus:
    """The demo's corpus (standard-library docstrings)."""
    return CharCorpus(corpus_text())
