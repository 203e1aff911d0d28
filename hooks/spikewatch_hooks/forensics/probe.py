"""`Forensics`: what the engine asks after it restored the pre-onset state.

1. Pick the batches: the suspect ones (trained from the onset to the detection) and
   up to ``reference_batches`` ordinary ones the restored state has not trained on
   either (trained after the restored step, ending a few steps before the onset, which
   the monitor may place a step or two late), all from the `BatchCache`.
2. Evaluate them forward only (`evaluate.untouched`), within ``max_suspect`` batches
   and ``max_seconds``; under torch.distributed every rank its own shard.
3. `judge` the losses; the monitor turns the `Verdict` into the rollback's next step.
4. ``data``: the named samples go to the quarantine file and are skipped from then on.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from spikewatch.forensics.judge import judge
from spikewatch.forensics.quarantine import append, entries_of, quarantined_indices
from spikewatch.forensics.verdict import ForensicsConfig, Verdict
from spikewatch.records import Decision
from spikewatch_hooks.forensics.cache import BatchCache, CachedBatch
from spikewatch_hooks.forensics.evaluate import (
    ProbeFailedError,
    ProbeLoss,
    agree_positions,
    combine,
    evaluate,
)
from spikewatch_hooks.forensics.rows import unquarantined

if TYPE_CHECKING:
    from spikewatch_hooks.core.engine import GuardEngine

log = logging.getLogger("spikewatch_hooks")

#: Steps right before the onset left out of the reference (the onset may be late).
_ONSET_SLACK = 2


class Forensics:
    """The probe, its batch cache and the quarantine of one guard.

    Args:
        loss_fn: ``probe_loss(model, batch)`` -> per-sample losses ([B]) or a scalar.
        config: the monitor's `ForensicsConfig` (batches, seconds, thresholds).
        cache: where the hook keeps recent batches (`remember`).
        quarantine_file: JSONL file of quarantined samples (read at start, appended to).
    """

    def __init__(
        self,
        loss_fn: ProbeLoss,
        config: ForensicsConfig,
        cache: BatchCache,
        *,
        quarantine_file: str | os.PathLike[str] | None = None,
    ) -> None:
        self.loss_fn, self.config, self.cache = loss_fn, config, cache
        self.quarantine_file = quarantine_file
        self.quarantined: set[int] = (
            set() if quarantine_file is None else quarantined_indices(quarantine_file)
        )
        self.last_verdict: Verdict | None = None
        self.forward_passes = 0  # what probing cost this run (in `guard.stats`)
        self.seconds = 0.0

    def remember(
        self,
        engine: GuardEngine,
        batch: Any,
        indices: tuple[int, ...] | None,
        *,
        position: int | None = None,
    ) -> None:
        """Keep the batch about to be trained on at the engine's step, at data
        ``position`` (default: the engine's current one)."""
        where = engine.position if position is None else position
        self.cache.remember(where, step=engine.step_count, batch=batch, indices=indices)

    def unquarantined(
        self, engine: GuardEngine, batch: Any, indices: tuple[int, ...] | None
    ) -> tuple[Any, tuple[int, ...] | None]:
        """``batch`` without its quarantined samples (`rows.unquarantined`, counted);
        ``(None, None)``: skip it whole. Unchanged when its indices are unknown."""
        if indices is None or not self.quarantined:
            return batch, indices
        return unquarantined(batch, indices, self.quarantined, engine.count)

    def after_restore(
        self, engine: GuardEngine, decision: Decision, restored_step: int
    ) -> Decision:
        """Probe from the state just restored; return the rollback as the verdict left it."""
        if not self.config.enabled or decision.signal is None:  # an operator's rollback
            return decision
        verdict = self.probe(engine, decision, restored_step)
        judge_verdict = getattr(engine.transport, "judge", None)
        decided = decision
        if judge_verdict is not None:
            decided, verdict = judge_verdict(decision, verdict)
        self.last_verdict = verdict
        engine.count(f"verdicts_{verdict.cause}")
        if verdict.cause == "data":
            self._quarantine(engine, verdict)
        if engine.reporting:
            log.warning("spikewatch forensics: %s (%s); %s", verdict.cause, verdict.why,
                        verdict.action)  # fmt: skip
        self.cache.clear()  # the positions after the restore point are never trained on
        return decided

    def probe(self, engine: GuardEngine, decision: Decision, restored_step: int) -> Verdict:
        """Evaluate the suspect and reference batches and judge them."""
        signal = decision.signal
        assert signal is not None
        cfg, onset = self.config, signal.onset_step
        kept = list(self.cache.entries())
        suspect = [e for e in kept if onset <= e.step <= decision.step][: cfg.max_suspect]
        before = [e for e in kept if restored_step <= e.step < onset - _ONSET_SLACK]
        reference = before[-cfg.reference_batches :]
        suspect = _agreed(suspect, engine)
        reference = _agreed(reference, engine)
        started = time.monotonic()
        deadline = started + cfg.max_seconds
        try:
            ref_losses = evaluate(engine.model, self.loss_fn, reference, deadline=deadline,
                                  lockstep=engine.lockstep)  # fmt: skip
            sus_losses = evaluate(engine.model, self.loss_fn, suspect, deadline=deadline,
                                  lockstep=engine.lockstep)  # fmt: skip
        except ProbeFailedError as exc:
            engine.count("probe_failures")
            return Verdict(cause="unknown", incident=signal.incident, step=decision.step,
                           onset_step=onset, why=str(exc))  # fmt: skip
        seconds = time.monotonic() - started
        passes = len(ref_losses) + len(sus_losses)
        self.forward_passes += passes
        self.seconds += seconds
        verdict = judge(
            combine(sus_losses, engine.lockstep),
            combine(ref_losses, engine.lockstep),
            cfg,
            incident=signal.incident,
            step=decision.step,
            onset_step=onset,
        )
        why = verdict.why + _shortfall(len(suspect), len(reference), self.cache)
        return replace(verdict, forward_passes=passes, seconds=round(seconds, 4), why=why)

    def summary(self) -> dict[str, Any]:
        """For ``guard.stats``: the last verdict and what probing cost."""
        return {
            "last_verdict": None if self.last_verdict is None else self.last_verdict.summary(),
            "probe_forward_passes": self.forward_passes,
            "probe_seconds": round(self.seconds, 4),
            "probe_cache_batches": len(self.cache),
            "probe_cache_bytes": self.cache.nbytes,
        }

    def _quarantine(self, engine: GuardEngine, verdict: Verdict) -> None:
        indices = {int(s["index"]) for s in verdict.samples if s.get("index") is not None}
        self.quarantined |= indices
        engine.count("quarantined_samples", len(indices))
        if self.quarantine_file is None or not engine.reporting or not verdict.samples:
            return
        try:
            append(self.quarantine_file, entries_of(verdict, engine.run_id))
        except OSError as exc:  # fail open: training goes on; the log and stats say so
            engine.count("quarantine_failures")
            log.error("spikewatch: could not write %s (%s)", self.quarantine_file, exc)


def _agreed(entries: list[CachedBatch], engine: GuardEngine) -> list[CachedBatch]:
    common = agree_positions([e.position for e in entries], engine.lockstep)
    chosen = set(common)
    return [e for e in entries if e.position in chosen]


def _shortfall(suspect: int, reference: int, cache: BatchCache) -> str:
    if suspect and reference:
        return ""
    return (
        f" [the cache held {len(cache)} batches: raise probe_cache_batches (or "
        "probe_cache_bytes) so it reaches back past the onset]"
    )


def make_forensics(
    engine: GuardEngine,
    probe_loss: ProbeLoss | None,
    quarantine_file: str | os.PathLike[str] | None,
    cache_batches: int,
    cache_bytes: int,
) -> Forensics | None:
    """The guard's forensics: with a ``probe_loss`` or a quarantine file, else None
    (no batch is kept then: forensics costs nothing unless asked for)."""
    cache = BatchCache(cache_batches, cache_bytes)  # validates the caps either way
    if probe_loss is None and quarantine_file is None:
        return None
    return Forensics(
        probe_loss or _no_probe_loss,
        engine.config.forensics,
        cache,
        quarantine_file=quarantine_file,
    )


def _no_probe_loss(model: Any, batch: Any) -> Any:
    raise TypeError("no probe_loss was given to the guard, so the probe cannot run")
