"""What the demo chart has to show, computed from the three runs' plain data (no drawing).

The three runs are identical until the first bad batch (same seed, same data), so the
chart draws that prefix once; after it each run has its own line, and the guarded run
has two: the branch it abandoned at the rollback and the one it kept.
"""

from __future__ import annotations

from dataclasses import dataclass

from spikewatch_hooks.demo.scenario import RunResult

Branch = tuple[list[int], list[float]]


@dataclass(frozen=True)
class GuardStory:
    """What the guard did, in chart terms.

    Attributes:
        abandoned: the guarded run's steps and smoothed losses from the first bad batch
            to the rollback (its own spike), later undone.
        kept: the branch it kept, from the restored step to the end (smoothed losses,
            continuing the mean of the steps before the restore point).
        rollback_step: the step the rollback was decided at (the abandoned branch's end).
        restore_step: the step training resumed from (the kept branch's start).
        skipped: data positions [start, stop) the guarded run never trained on.
        recovery_step: first kept step past the bad data whose smoothed loss is at the
            clean run's (within 2 %).
    """

    abandoned: Branch
    kept: Branch
    rollback_step: int
    restore_step: int
    skipped: tuple[int, int]
    recovery_step: int | None


def branches(run: RunResult) -> list[Branch]:
    """Split a run where its step counter went back (a rollback): old branch, new branch."""
    out: list[Branch] = [([], [])]
    for step, loss in zip(run.steps, run.losses, strict=True):
        if out[-1][0] and step <= out[-1][0][-1]:
            out.append(([], []))
        out[-1][0].append(step)
        out[-1][1].append(loss)
    return out


def shared_prefix(runs: list[RunResult]) -> int:
    """How many leading steps all runs share exactly (same step, same loss)."""
    n = min(len(r.steps) for r in runs)
    for i in range(n):
        if len({(r.steps[i], r.losses[i]) for r in runs}) > 1:
            return i
    return n


def smooth(values: list[float], window: int = 8) -> list[float]:
    """Trailing moving average (so a noisy per-step loss reads as a trend)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def guard_story(
    guarded: RunResult, clean: RunResult, prefix: int, *, bad_end: int
) -> GuardStory | None:
    """What the guard did (``bad_end``: first step after the bad data), or None when it
    never rolled back."""
    parts = branches(guarded)
    if len(parts) < 2:
        return None
    old, kept = parts[-2], parts[-1]
    restore = kept[0][0]
    cut = max(next((i for i, s in enumerate(old[0]) if s >= prefix), len(old[0])) - 1, 0)
    before = [v for s, v in zip(*old, strict=True) if s < restore]
    kept_smooth = smooth(before + kept[1])[len(before) :]
    skipped = int(guarded.stats.get("skipped_batches", 0))
    return GuardStory(
        abandoned=(old[0][cut:], smooth(old[1])[cut:]),
        kept=(kept[0], kept_smooth),
        rollback_step=old[0][-1],
        restore_step=restore,
        skipped=(restore, restore + skipped),
        recovery_step=_recovery((kept[0], kept_smooth), clean, bad_end),
    )


def _recovery(kept: Branch, clean: RunResult, after: int, tolerance: float = 0.02) -> int | None:
    """First kept step at or after ``after`` whose smoothed loss is within ``tolerance``
    of the clean run's at the same step."""
    reference = dict(zip(clean.steps, smooth(clean.losses), strict=True))
    for step, loss in zip(*kept, strict=True):
        clean_loss = reference.get(step)
        if step >= after and clean_loss is not None and loss <= clean_loss * (1 + tolerance):
            return step
    return None
