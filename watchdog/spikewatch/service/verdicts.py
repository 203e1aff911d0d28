"""The trainer's forensics verdicts: kept with their incidents, counted, told in Slack.

After a rollback the trainer probes the suspect batches from the restored state and
its monitor keeps the `Verdict` with the incident (`Monitor.adopt_verdict`), which may
change the rollback (a ``state`` verdict cuts the LR at once, or halts). The service
mirrors that: the incident gets the verdict and the decision as it now stands, the run
counts the verdict by cause, and the incident's thread gets the verdict's message.
"""

from __future__ import annotations

from typing import Any

from spikewatch.forensics.verdict import Verdict
from spikewatch.records import Decision
from spikewatch.service.commands import trainer_halts
from spikewatch.service.notify import Notice, verdict_notice
from spikewatch.service.run import MirrorMonitor, ServiceRun


def apply_verdicts(
    run: ServiceRun, events: list[dict[str, Any]], notices: list[Notice]
) -> list[dict[str, Any]]:
    """Keep each ``verdict`` event's verdict with its incident; the incidents to store.

    Call it after the batch's decisions are adopted and announced, so that the verdict's
    message follows the incident's own into its thread.

    Example:
        >>> from spikewatch.records import Signal
        >>> from spikewatch.settings import MonitorConfig
        >>> run = ServiceRun("r", MonitorConfig(), recent=10)
        >>> run.use_trainer_decisions()
        >>> s = Signal(run="r", kind="spike", metric="loss", step=30, value=9.0, score=12.0,
        ...            baseline=2.0, onset_step=28, peak_step=30, incident="loss-spike-28")
        >>> d = Decision(run="r", step=30, action="rollback", reason="12 sigma", signal=s)
        >>> v = Verdict(cause="data", incident=s.incident, step=30, onset_step=28,
        ...             action="skip the batches, quarantine the samples")
        >>> event = {"event": "verdict", "verdict": v.to_json(), "decision": d.to_json()}
        >>> notices = []
        >>> [i["verdict"]["cause"] for i in apply_verdicts(run, [event], notices)]
        ['data']
        >>> run.verdicts["data"], [n.key for n in notices]
        (1, ['r/loss-spike-28'])
    """
    out = []
    for event in events:
        if event["event"] != "verdict":
            continue
        verdict = Verdict.from_json(event["verdict"])
        decided = Decision.from_json(event["decision"])
        incident = _keep(run, verdict, decided)
        run.verdicts[verdict.cause] += 1
        notices.append(verdict_notice(run.run, verdict.incident, verdict.to_json()))
        trainer_halts(run, [decided], notices)  # a state verdict may have halted the run
        if incident is not None:
            out.append(incident)
    return out


def _keep(run: ServiceRun, verdict: Verdict, decided: Decision) -> dict[str, Any] | None:
    """The verdict and the decision as it now stands, on the incident (opened from the
    decision if the service never saw it: the batch with it was dropped)."""
    monitor, signal = run.monitor, decided.signal
    ours = signal is not None and signal.incident == verdict.incident
    if ours and isinstance(monitor, MirrorMonitor):
        monitor.adopt([decided])  # the reason (and a halt) now say what forensics found
    incident = monitor.incident(verdict.incident)
    if incident is None:
        return None
    incident.verdict = verdict.to_json()
    return incident.to_json()
