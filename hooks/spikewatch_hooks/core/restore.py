"""Where a rollback restores from: the snapshot ring, else the disk checkpoints.

1. The newest ring snapshot at or before the target step (the fast path).
2. Else, with ``checkpoint_dir``: the newest automatic disk checkpoint at or before it
   (`state.deep`), loaded in the running process. The ring cannot reach back when the
   process restarted inside an incident (the ring then starts at the resume step) or
   when the onset is older than ``keep_snapshots * snapshot_every`` steps.
3. Else the oldest state there is (ring or disk), with a warning saying why and what
   would have reached back.

The log says which it was; the live skip ledger and counters are never replaced.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from spikewatch_hooks.state.checkpoint import CheckpointError

if TYPE_CHECKING:  # the engine calls this module: no import back up at run time
    from spikewatch.records import Decision
    from spikewatch_hooks.core.engine import GuardEngine

log = logging.getLogger("spikewatch_hooks")


@dataclass(frozen=True)
class RestorePoint:
    """The state a rollback restored: its step, next data position, detector state,
    LR scale, and where it came from (for the log)."""

    step: int
    data_position: int
    detector_state: dict[str, Any]
    lr_scale: float
    source: str


def roll_back(engine: GuardEngine, decision: Decision) -> None:
    """Restore the state for ``decision`` (`rollback_source`), cut the LR as it says,
    put the batches consumed since (and ``skip_ahead`` more) in the ledger, and log it."""
    target = decision.rollback_before_step or 0
    consumed_to, from_step = engine.position + 1, engine.step_count
    engine.updates.settle_scaler()
    point = rollback_source(engine, target)
    engine.transport.rewind(point.detector_state)
    if engine.forensics is not None:  # probe from the restored state: data or state?
        decision = engine.forensics.after_restore(engine, decision, point.step)
    engine.updates.scale_lr(decision.lr_factor / point.lr_scale)
    engine.lr_scale = decision.lr_factor
    why = f"rollback at step {from_step}: {decision.reason}"
    wasted = engine.ledger.add(point.data_position, consumed_to, reason=why)
    # skip_ahead counts optimizer steps; the ledger, loader batches (main's accumulation
    # support sets batches_per_step on the engine; 1 batch per step without it).
    ahead = decision.skip_ahead * int(getattr(engine, "batches_per_step", 1))
    engine.ledger.add(consumed_to, consumed_to + ahead, reason=why + " (ahead)")
    engine.count("rollbacks")
    where = engine.attribution(decision)
    engine.count("skipped_batches", wasted)  # the ones ahead count when passed over
    if engine.reporting:
        log.warning(
            "spikewatch: rolled back from step %d to step %d (%s), skipping batches "
            "[%d, %d), lr x%g: %s%s",
            from_step,
            point.step,
            point.source,
            point.data_position,
            consumed_to + ahead,
            decision.lr_factor,
            decision.reason,
            where,
        )
    engine.step_count = point.step
    engine.approvals.applied()
    engine.values.clear()
    if engine.lockstep is not None:
        engine.lockstep.clear()
    engine.clear_found_inf()
    if decision.action == "halt":  # forensics: state-caused and the escalation is spent
        engine.halt(decision.reason)


def rollback_source(engine: GuardEngine, target: int) -> RestorePoint:
    """Restore the newest state at or before ``target`` into the live objects."""
    snap = engine.ring.newest_at_or_before(target)
    if snap is not None:
        return _from_ring(engine, snap, "snapshot in memory")
    if engine.disk is not None:
        path = _try_disk(engine, target)
        if path is not None:
            return _from_engine(engine, f"checkpoint {path}: the ring holds none that old")
    return _oldest(engine, target)


def _from_ring(engine: GuardEngine, snap: Any, source: str) -> RestorePoint:
    engine.ring.restore(snap)
    return RestorePoint(
        step=snap.step,
        data_position=snap.data_position,
        detector_state=snap.extra["detector_state"],
        lr_scale=float(snap.extra["lr_scale"]),
        source=source,
    )


def _from_engine(engine: GuardEngine, source: str) -> RestorePoint:
    """The state just loaded from disk (the engine's step, position and detectors)."""
    return RestorePoint(
        step=engine.step_count,
        data_position=engine.position + 1,
        detector_state=engine.transport.detector_state(),
        lr_scale=engine.lr_scale,
        source=source,
    )


def _try_disk(engine: GuardEngine, target: int, *, newest: bool = True) -> Any:
    try:
        if newest:
            return engine.disk.restore_at_or_before(engine, target)
        found = engine.disk.available(engine)
        if not found:
            return None
        engine.disk.load_keeping_ledger(engine, found[-1][0])
        return found[-1][0]
    except (CheckpointError, OSError) as exc:
        # Fail open: the ring's oldest snapshot is still a rollback.
        engine.count("deep_restore_failures")
        log.error("spikewatch: could not restore from disk (%s); using the ring", exc)
        return None


def _oldest(engine: GuardEngine, target: int) -> RestorePoint:
    """Nothing at or before ``target``: the oldest state there is, and why."""
    snap = engine.ring.oldest()
    assert snap is not None  # a snapshot is taken at construction and at every load
    disk_steps = [] if engine.disk is None else [s for _, s in engine.disk.available(engine)]
    if disk_steps and min(disk_steps) < snap.step:
        path = _try_disk(engine, target, newest=False)
        if path is not None:
            _warn(engine, target, f"oldest checkpoint, {path} (step {engine.step_count})", "")
            return _from_engine(engine, f"oldest checkpoint {path}")
    if engine.disk is None:
        advice = " (raise keep_snapshots, or set checkpoint_dir, to reach further back)"
    elif engine.stats["resumes"] and snap.step == engine.ring.steps[0]:
        advice = (
            " (the ring restarted at the resume; lower checkpoint_every so a checkpoint "
            "from before the incident is on disk)"
        )
    else:
        advice = " (raise keep_snapshots or lower checkpoint_every to reach further back)"
    _warn(engine, target, f"snapshot at step {snap.step}", advice)
    return _from_ring(engine, snap, "oldest snapshot in memory")


def _warn(engine: GuardEngine, target: int, used: str, advice: str) -> None:
    log.warning(  # every rank: a rollback short of its target is worth seeing everywhere
        "spikewatch: no snapshot or checkpoint at or before step %d; using the %s%s",
        target,
        used,
        advice,
    )
