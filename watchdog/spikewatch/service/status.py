"""What the service knows about each run at a glance: read by /v1/runs, Prometheus, digests."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

RunState = Literal["active", "stalled", "halted", "finished"]


@dataclass(frozen=True, slots=True, kw_only=True)
class RunStatus:
    """A point-in-time view of one run (a copy: safe to read on any thread).

    Attributes:
        run: the run id.
        state: ``active`` (records arriving), ``stalled`` (none for ``stall_after``
            seconds), ``halted`` (the policy or an operator stopped it) or ``finished``
            (the trainer said it ended: never stalled).
        records: records ingested since the run was first seen.
        last_step: step of the newest record (None before the first).
        last_record_time: Unix time (seconds) the newest record arrived.
        loss: loss of the newest record (may be NaN or inf).
        grad_norm: grad norm of the newest record that had one.
        lr: learning rate of the newest record that had one.
        spike_score: robust z-score of the newest loss value (0 while warming up).
        signals: signals raised so far, by kind (spike, level_shift, nonfinite, divergence).
        verdicts: forensics verdicts the trainer reported on its rollbacks, by cause
            (data, state, unknown).
        rollbacks: rollbacks decided for the run.
        skipped_steps: optimizer steps the run was told to skip.
        skipped_batches: batches skipped by rollbacks (reported back by the trainer).
        incidents_open: incidents not yet confirmed or closed.
        incidents_total: incidents opened so far.
        client_dropped: records the trainer-side client reported dropping (queue full).
        decides: ``trainer`` (its own monitor decides, the service watches) or
            ``service`` (a client that only sends records).
        config: the trainer's effective settings, as it reported them (None if not).
        restorable: the steps the trainer said it can restore (its snapshot ring).
        attempt: 1, then one more each time a new client session starts the run over
            from an earlier step without a rollback (a reused run id, a restart from an
            older checkpoint); each attempt has its own detector state.
        attempt_step: the first step of the current attempt (None before any record).
    """

    run: str
    state: RunState
    records: int
    last_step: int | None
    last_record_time: float | None
    loss: float | None
    grad_norm: float | None
    lr: float | None
    spike_score: float
    signals: dict[str, int] = field(default_factory=dict)
    verdicts: dict[str, int] = field(default_factory=dict)
    rollbacks: int = 0
    skipped_steps: int = 0
    skipped_batches: int = 0
    incidents_open: int = 0
    incidents_total: int = 0
    client_dropped: int = 0
    decides: Literal["trainer", "service"] = "service"
    config: dict[str, Any] | None = None
    restorable: list[int] | None = None
    attempt: int = 1
    attempt_step: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class JobStatus:
    """A scheduled job's health, for /healthz and Prometheus.

    Attributes:
        job: the job id (``changepoint_sweep``, ``stall_check``, ``digest``, ``retention``).
        next_run_time: Unix time of the next run (None when paused).
        last_run_time: Unix time the last run started (None before the first).
        last_success_time: Unix time the last successful run finished.
        runs: runs so far.
        failures: runs that raised.
        last_error: the last failure's message (None when the last run succeeded).
    """

    job: str
    next_run_time: float | None
    last_run_time: float | None = None
    last_success_time: float | None = None
    runs: int = 0
    failures: int = 0
    last_error: str | None = None
