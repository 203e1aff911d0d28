"""A trainer in service mode that judges its rollback, over the real trainer-side pieces.

`ServiceTransport` around the trainer's `Monitor`, `HttpTransport` to a real service:
fed `SPIKING` until the monitor rolls back, then a probe whose losses are made up with a
known answer goes through the real `judge` and `ServiceTransport.judge` (what the
hook's forensics calls after the restore). Not a pytest plugin.
"""

from __future__ import annotations

from dataclasses import dataclass

from service_client import SPIKING
from spikewatch.forensics import BatchLoss, ForensicsConfig, Verdict, judge
from spikewatch.http_transport import HttpTransport
from spikewatch.monitor import Monitor
from spikewatch.records import Decision, StepRecord
from spikewatch.service_transport import ServiceTransport
from spikewatch.settings import MonitorConfig

#: Dataset indices of the samples a ``data`` probe finds bad (more than Slack lists).
BAD_INDICES = [90_000 + 7 * k for k in range(12)]


def _reference() -> list[BatchLoss]:
    """Eight ordinary batches the restored state has not trained on, four samples each."""
    return [
        BatchLoss(p, 2.0 + 0.01 * (p % 3), [(10_000 + 4 * p + k, 2.0 + 0.01 * k) for k in range(4)])
        for p in range(8)
    ]


def _suspect(cause: str, onset: int) -> list[BatchLoss]:
    if cause == "unknown":
        return []  # the hook could not fetch the batches: too little to compare
    if cause == "state":
        return [BatchLoss(onset + k, 2.0 + 0.005 * k) for k in range(3)]
    ordinary: list[tuple[int | None, float]] = [(50_000 + k, 2.0) for k in range(4)]
    bad: list[tuple[int | None, float]] = [(i, 9.0) for i in BAD_INDICES]
    return [  # two batches with six bad samples each, one ordinary batch
        BatchLoss(onset, 6.8, ordinary[:2] + bad[:6]),
        BatchLoss(onset + 1, 7.2, ordinary[2:] + bad[6:]),
        BatchLoss(onset + 2, 2.01, ordinary),
    ]


def probe(cause: str, rollback: Decision, config: ForensicsConfig) -> Verdict:
    """The verdict `judge` gives on losses made up to mean ``cause``."""
    assert rollback.signal is not None
    onset = rollback.signal.onset_step
    verdict = judge(
        _suspect(cause, onset), _reference(), config,
        incident=rollback.signal.incident, step=rollback.step, onset_step=onset,
    )  # fmt: skip
    assert verdict.cause == cause, verdict
    return verdict


@dataclass
class Judged:
    """What the trainer did: its rollback, the verdict and the decision as it then stood."""

    rollback: Decision
    verdict: Verdict
    decided: Decision
    transport: ServiceTransport


def judged_rollback(
    url: str, run: str, token: str, *, cause: str, config: MonitorConfig | None = None
) -> Judged:
    """Train on `SPIKING` in batches of 100 until the monitor rolls back, judge the
    rollback as ``cause``, and deliver everything (the client's ``finish``)."""
    monitor = Monitor(run=run, config=config or MonitorConfig())
    client = HttpTransport(url, run=run, token=token, flush_interval_s=0.05)
    transport = ServiceTransport(monitor, client)
    for start in range(0, len(SPIKING), 100):
        records = [StepRecord(run=run, step=s, loss=SPIKING[s]) for s in range(start, start + 100)]
        rollbacks = [d for d in transport.submit(records) if d.action == "rollback"]
        if rollbacks:
            break
    else:
        raise AssertionError("the monitor never rolled back on SPIKING")
    verdict = probe(cause, rollbacks[0], monitor.config.forensics)
    decided, _ = transport.judge(rollbacks[0], verdict)
    assert transport.finish(timeout=30), "the client did not deliver in 30 s"
    assert monitor.last_verdict is not None
    return Judged(rollbacks[0], monitor.last_verdict, decided, transport)
