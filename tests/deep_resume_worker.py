"""A training process for the kill -9 / resume test (`test_deep_rollback.py`).

python deep_resume_worker.py first  DIR   train with checkpoints; SIGKILL itself just
                                          after the step-230 checkpoint, inside the
                                          incident that began at batch 220
python deep_resume_worker.py resume DIR   resume from spikewatch-latest.pt, train to
                                          the end; write DIR/resumed.json and params
python deep_resume_worker.py reference DIR  plain training (no guard) on batches
                                          [0, 220) then on those the resumed run
                                          trained after its last rollback

The model is deterministic (no dropout, one thread), so a resumed run that restored the
state from before the onset and trained no bad batch since ends bit-equal to the
reference.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch

from spikewatch.policy import PolicyConfig
from spikewatch.settings import MonitorConfig
from spikewatch_hooks.guard import SpikeGuard

BAD = range(220, 280)  # the loss of these batches jumps x50: a persistent level shift
KILL_AT = 231  # steps: after the step-230 checkpoint, before the incident is decided
N = 400


def _model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    return model, torch.optim.AdamW(model.parameters(), lr=0.05)


def _data() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(16, 8, generator=g) for _ in range(N)]


def _loss(model: torch.nn.Module, x: torch.Tensor, position: int) -> Any:
    loss = (model(x) - x.sum(dim=1, keepdim=True)).pow(2).mean()
    return loss * 50.0 if position in BAD else loss


def _guard(model: torch.nn.Module, opt: torch.optim.Optimizer, folder: Path) -> SpikeGuard:
    config = MonitorConfig(policy=PolicyConfig(margin=5, skip_ahead=80))
    return SpikeGuard(model, opt, config=config, snapshot_every=10, keep_snapshots=4,
                      checkpoint_dir=folder, checkpoint_every=10)  # fmt: skip


def _undecided(guard: SpikeGuard) -> bool:
    monitor: Any = getattr(guard.transport, "monitor")  # noqa: B009
    return monitor.loss.pending() is not None or monitor.grad_norm.pending() is not None


def _train(guard: SpikeGuard, model: torch.nn.Module, opt: torch.optim.Optimizer,
           *, kill: bool) -> tuple[list[int], list[int]]:  # fmt: skip
    """Train; return (positions trained since the last rollback, restored steps)."""
    trained: list[int] = []
    restored: list[int] = []
    for x in guard.batches(_data()):
        position = guard.engine.position
        _loss(model, x, position).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        decision = guard.step(loss=_loss(model, x, position).detach(), grad_norm=grad_norm)
        opt.zero_grad(set_to_none=True)
        if decision is not None and decision.action == "rollback":
            trained, restored = [], [*restored, guard.step_count]
        else:
            trained.append(position)
        if kill and guard.step_count == KILL_AT:
            if not _undecided(guard):
                sys.exit(3)  # the scenario needs an open incident at the kill
            os.kill(os.getpid(), signal.SIGKILL)
    return trained, restored


def main(mode: str, folder: Path) -> None:
    """Run one of the three processes (see the module docstring)."""
    torch.set_num_threads(1)
    model, opt = _model()
    if mode == "first":
        _train(_guard(model, opt, folder), model, opt, kill=True)
        sys.exit(4)  # never reached: killed inside the incident
    if mode == "resume":
        messages: list[str] = []
        handler = logging.Handler()
        handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
        logging.getLogger("spikewatch_hooks").addHandler(handler)
        guard = _guard(model, opt, folder)
        guard.resume(folder / "spikewatch-latest.pt")
        resumed_at = guard.step_count
        trained, restored = _train(guard, model, opt, kill=False)
        summary = {"resumed_at": resumed_at, "restored_steps": restored, "trained": trained,
                   "ledger": guard.stats["skip_ledger"], "log": messages}  # fmt: skip
        (folder / "resumed.json").write_text(json.dumps(summary))
        torch.save(model.state_dict(), folder / "resumed.pt")
        return
    summary = json.loads((folder / "resumed.json").read_text())
    data = _data()
    for position in [*range(BAD.start), *summary["trained"]]:
        _loss(model, data[position], position).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.save(model.state_dict(), folder / "reference.pt")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
