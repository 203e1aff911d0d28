"""Service mode: the trainer's own monitor decides; `spikewatch serve` watches and commands.

Every automatic action (skip an update, roll back, cut the LR, halt) is decided by the
`Monitor` running in the training process, on the step it is for, exactly as in the
embedded mode: nothing automatic waits on the network. The service gets the records and
those decisions (it stores them, exports Prometheus, talks to Slack) and sends back what
operators ask for (halt, roll back to a step, approve or veto a proposed rollback).
Under ``torch.distributed`` only rank 0 has a client; the other ranks run the same
monitor with ``client=None`` and receive the operators' commands by broadcast.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from spikewatch.errors import bad_value
from spikewatch.forensics.verdict import Verdict
from spikewatch.http_transport import HttpTransport
from spikewatch.monitor import Monitor
from spikewatch.records import Decision, StepRecord
from spikewatch.settings import MonitorConfig
from spikewatch.validation import check_float

log = logging.getLogger(__name__)

ApprovalMode = Literal["auto", "manual"]


@dataclass(frozen=True)
class Approval:
    """Whether the trainer's rollbacks wait for an operator (the service's ``approval``).

    Attributes:
        mode: ``auto`` rolls back at once; ``manual`` makes each rollback a proposal
            (training goes on, bad updates are still skipped) until approved or vetoed.
        timeout_s: how long a proposal waits for an operator.
        default: what happens when it times out: ``rollback`` or ``veto``.
    """

    mode: ApprovalMode = "auto"
    timeout_s: float = 3600.0
    default: Literal["rollback", "veto"] = "veto"

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "manual"):
            raise bad_value("approval", self.mode, 'use "auto" or "manual"')
        check_float("approval_timeout_s", self.timeout_s, minimum=0.0, inclusive=False)
        if self.default not in ("rollback", "veto"):
            raise bad_value("approval_default", self.default, 'use "rollback" or "veto"')

    @classmethod
    def from_mapping(cls, data: dict[str, Any]) -> Approval:
        """Build from the service's answer (``mode``, ``timeout_s``, ``default``)."""
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


def config_from_service(
    answer: dict[str, Any] | None, local: MonitorConfig, *, explicit: bool, run: str
) -> tuple[MonitorConfig, Approval]:
    """The effective settings: the service's for this run, unless the trainer was given
    its own (``explicit``) or the service did not answer; the log says which.

    Example:
        >>> answer = {"monitor": {"policy": {"margin": 40}}, "approval": {"mode": "manual"}}
        >>> cfg, approval = config_from_service(answer, MonitorConfig(), explicit=False, run="r")
        >>> cfg.policy.margin, approval.mode
        (40, 'manual')
        >>> config_from_service(None, MonitorConfig(), explicit=False, run="r")[0].policy.margin
        100
    """
    if answer is None:
        log.warning(
            "spikewatch: the monitor service did not answer with run %r's settings; "
            "using the local ones",
            run,
        )
        return local, Approval()
    approval = Approval.from_mapping(answer.get("approval") or {})
    if explicit:
        log.info("spikewatch: run %r uses the settings given to the guard, not the service's", run)
        return local, approval
    return MonitorConfig.from_mapping(answer.get("monitor") or {}), approval


class ServiceTransport:
    """A `Transport` whose own `Monitor` decides, reporting to a service ``client``.

    Args:
        monitor: the trainer's monitor (every rank has an identical one).
        client: the service client (rank 0 only; None on the other ranks).
        approval: whether rollbacks wait for an operator.

    Example:
        >>> t = ServiceTransport(Monitor(run="r"), client=None)
        >>> [d.action for d in t.submit([StepRecord(run="r", step=0, loss=float("nan"))])]
        ['skip_step']
        >>> t  # doctest: +ELLIPSIS
        ServiceTransport(Monitor(run='r', records=1, ...), approval='auto', no client (not rank 0))
    """

    def __init__(
        self, monitor: Monitor, client: HttpTransport | None, *, approval: Approval | None = None
    ) -> None:
        self.monitor, self.client = monitor, client
        self.approval = approval or Approval()
        self.failures = 0

    def __repr__(self) -> str:
        client = "no client (not rank 0)" if self.client is None else repr(self.client)
        return f"ServiceTransport({self.monitor!r}, approval={self.approval.mode!r}, {client})"

    def submit(self, records: Sequence[StepRecord]) -> list[Decision]:
        """Decide on ``records`` here; send them and every decision to the service."""
        decisions: list[Decision] = []
        try:
            for record in records:
                decisions.extend(self.monitor.observe(record))
        except Exception:
            # Fail open: training must never stop because the monitor has a bug.
            self.failures += 1
            log.exception("spikewatch monitor failed; training continues unwatched for now")
        if self.client is not None:
            self.client.report(records, decisions)
        return [d for d in decisions if d.action != "watch"]

    def report(self, events: Sequence[dict[str, Any]]) -> None:
        """Tell the service what the trainer did about proposals and commands (a
        rollback proposed, a command refused, a proposal that timed out)."""
        if self.client is not None:
            self.client.report([], [], events)
            if any(e["event"] == "proposed" for e in events):
                self.client.polling = True  # until an answer comes back

    def pending_commands(self) -> int:
        """Operator commands waiting to be taken (0 without a client)."""
        return 0 if self.client is None else self.client.pending_commands()

    def take_commands(self) -> list[dict[str, Any]]:
        """Operator commands that arrived (acknowledged with the next batch)."""
        if self.client is None:
            return []
        commands = self.client.take_commands()
        if commands:
            self.client.polling = False
        return commands

    def restorable(self, steps: list[int], config: dict[str, Any] | None = None) -> None:
        """Tell the service which steps can be restored (and the effective settings)."""
        if self.client is not None:
            self.client.configure(config or {}, steps)

    def adopt_rank(self, lockstep: Any) -> None:
        """The guard joined a ``torch.distributed`` lockstep late (built before
        ``init_process_group``): only rank 0 keeps a client, and every rank takes rank
        0's settings, so all monitors decide alike."""
        if lockstep.rank != 0 and self.client is not None:
            self.client.close(timeout=0.0)  # nothing was sent yet: no records, no finish
            self.client = None
        mine = (dataclasses.asdict(self.monitor.config), dataclasses.asdict(self.approval))
        config_json, approval_json = lockstep.broadcast(mine)
        config = MonitorConfig.from_mapping(config_json)
        if config != self.monitor.config:
            self.monitor = Monitor(run=self.monitor.run, config=config)
        self.approval = Approval.from_mapping(approval_json)

    def detector_state(self) -> dict[str, Any]:
        """The monitor's detector state (kept with each snapshot)."""
        return self.monitor.detector_state()

    def rewind(self, state: dict[str, Any]) -> None:
        """Rewind the monitor with the model; the service rewinds with the next records."""
        self.monitor.rewind(state)
        if self.client is not None:
            self.client.rewind(state)

    def incidents(self) -> int:
        """Incidents the trainer's monitor opened."""
        return len(self.monitor.incidents)

    def skip_threshold(self) -> float:
        """The monitor's grad-norm skip threshold."""
        return self.monitor.skip_threshold()

    def judge(self, decision: Decision, verdict: Verdict) -> tuple[Decision, Verdict]:
        """The trainer's monitor keeps the forensics verdict and says what the rollback
        becomes; the service gets both as a ``verdict`` event (its incident, Slack,
        Prometheus)."""
        decided, kept = self.monitor.adopt_verdict(decision, verdict)
        if self.client is not None:
            sent = _within_limits(kept)
            self.client.report(
                [],
                [],
                [{"event": "verdict", "verdict": sent.to_json(), "decision": decided.to_json()}],
            )
        return decided, kept

    def finish(self, timeout: float = 10.0) -> bool:
        """Deliver what is queued and tell the service the run ended."""
        return True if self.client is None else self.client.finish(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Finish and stop the client."""
        if self.client is not None:
            self.client.close(timeout=timeout)


#: Named samples a verdict carries to the service (the quarantine file holds them all).
MAX_REPORTED_SAMPLES = 1000


def _within_limits(verdict: Verdict) -> Verdict:
    """The verdict as the service takes it: at most `MAX_REPORTED_SAMPLES` samples
    (a larger array would be refused, and with it the batch it travels in).

    Example:
        >>> v = Verdict(cause="data", incident="i", step=9, onset_step=5, why="bad data",
        ...             samples=[{"position": 5, "index": i, "loss": 9.0} for i in range(1500)])
        >>> short = _within_limits(v)
        >>> len(short.samples), short.why
        (1000, 'bad data (the first 1000 of 1500 named samples)')
    """
    if len(verdict.samples) <= MAX_REPORTED_SAMPLES:
        return verdict
    return dataclasses.replace(
        verdict,
        samples=verdict.samples[:MAX_REPORTED_SAMPLES],
        why=f"{verdict.why} (the first {MAX_REPORTED_SAMPLES} of {len(verdict.samples)} "
        "named samples)",
    )
