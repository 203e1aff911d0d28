"""How a batch continues its run: a retry, the next records, a rollback, or a new attempt.

* A **retry** is answered, not ingested again: the same ``client`` with a ``seq`` not
  above its last one, or, for a client that sends no ``seq``, the very body of the run's
  previous batch.
* A **rollback**: ``rewind_to`` says the trainer restored a snapshot and continues there.
* A **new attempt**: a new ``client`` session whose first step is not after the run's
  last step, without ``rewind_to`` — the run id reused from step 0, or a restart from an
  older checkpoint. It gets its own detector state (fresh from step 0, else the
  service's snapshot before its first step), its own policy, and none of the last
  session's commands; it is neither a rollback nor skipped batches.
* Anything else going back (the same session, no ``rewind_to``) is refused (422).
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

from spikewatch.service.payload_error import PayloadError
from spikewatch.service.payloads import IngestBatch
from spikewatch.service.run import LIVE_STATUSES, ServiceRun

Continuation = Literal["retry", "next", "rewind", "attempt"]


def body_digest(body: bytes) -> str:
    """A short digest of a request body (recognises a retry sent without ``seq``)."""
    return hashlib.blake2b(body, digest_size=16).hexdigest()


def continuation(run: ServiceRun, batch: IngestBatch, digest: str) -> Continuation:
    """What ``batch`` is to ``run`` (see the module docstring); raises `PayloadError`
    for steps that go back without a rollback or a new session."""
    same_client = batch.client == run.client
    if same_client and batch.seq is not None and run.seq is not None and batch.seq <= run.seq:
        return "retry"
    if batch.seq is None and batch.steps and digest == run.digest:
        return "retry"
    last = run.monitor.last_step
    back = bool(batch.steps) and last is not None and batch.steps[0] <= last
    if back and not same_client and batch.client is not None:
        return "attempt"
    if batch.rewind_to is not None:
        return "rewind"
    if back:
        raise PayloadError(
            "records[0].step",
            f"records[0].step={batch.steps[0]} is not after the run's last step {last}: "
            "a trainer that rolled back sends rewind_to=<the step it continues from>; a "
            "new training session of this run sends a new client id (a new attempt)",
        )
    return "next"


def start_attempt(
    run: ServiceRun, step: int, snapshot: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """Begin a new attempt at ``step``; return the last session's commands withdrawn."""
    old = run.monitor
    fresh = type(old)(run=run.run, config=old.config)
    if snapshot is not None:  # a restart from a checkpoint: detection as it was there
        fresh.rewind({"loss": snapshot["loss"], "grad_norm": snapshot["grad_norm"]})
    fresh.records, fresh.last_step = old.records, step - 1
    fresh.restore_incidents(old.incidents)  # history: counted, folded into by nothing new
    run.monitor = fresh
    run.attempt += 1
    run.attempt_step, run.halted, run.last_snapshot_step = step, False, None
    run.seq, run.pending_skip_ahead, run.recovery = None, 0, None
    while run.recent and run.recent[-1][0] >= step:
        run.recent.pop()
    withdrawn = []
    for cmd in run.commands.values():
        if cmd["status"] in LIVE_STATUSES:  # meant for a session that is gone
            cmd["status"] = "withdrawn"
            withdrawn.append(cmd)
    return withdrawn
