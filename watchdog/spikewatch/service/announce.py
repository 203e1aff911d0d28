"""What the service tells people as a run goes: incidents, stalls over, recoveries."""

from __future__ import annotations

import dataclasses
from typing import Any

from spikewatch.incidents import Incident
from spikewatch.records import ACTION_SEVERITY, Decision
from spikewatch.service.notify import Notice, follow_up_notice, incident_notice
from spikewatch.service.run import ServiceRun

#: Records after a rollback's detection step with no new incident: the run recovered.
RECOVERY_STEPS = 100


def close_stall(run: ServiceRun, notices: list[Notice]) -> dict[str, Any]:
    """Records arrive again: close the open stall incident and say so in its thread."""
    iid, run.stall_incident = run.stall_incident, None
    incident = run.monitor.incident(iid or "")
    assert incident is not None  # check_stalls registered it
    incident.status, incident.end_step = "closed", run.monitor.last_step
    text = f"records arrive again (step {run.monitor.last_step})"
    notices.append(follow_up_notice(run.run, incident.id, text))
    return incident.to_json()


def touched_incidents(
    run: ServiceRun, decisions: list[Decision], notices: list[Notice], *, min_action: str
) -> list[dict[str, Any]]:
    """The incidents ``decisions`` changed (to store); announce those reaching ``min_action``."""
    ids = dict.fromkeys(d.signal.incident for d in decisions if d.signal is not None)
    reasons = {d.signal.incident: d.reason for d in decisions if d.signal is not None}
    out = []
    for iid in ids:
        incident = run.monitor.incident(iid)
        if incident is None:
            continue
        out.append(incident.to_json())
        _maybe_announce(run, incident, reasons.get(iid), notices, min_action)
    return out


def _maybe_announce(
    run: ServiceRun,
    incident: Incident,
    reason: str | None,
    notices: list[Notice],
    min_action: str,
) -> None:
    if ACTION_SEVERITY[incident.action] < ACTION_SEVERITY[min_action]:
        return
    if incident.id in run.announced:
        return
    run.announced.add(incident.id)
    copy = dataclasses.replace(incident)
    window = [p for p in run.recent if p[0] >= incident.onset_step - 200]
    notices.append(incident_notice(copy, window, reason))


def watch_recovery(run: ServiceRun, decisions: list[Decision], notices: list[Notice]) -> None:
    """After an applied rollback: say whether the run recovered or relapsed."""
    rec = run.recovery
    if rec is None or run.monitor.last_step is None:
        return
    relapse = [d for d in decisions if ACTION_SEVERITY[d.action] >= ACTION_SEVERITY["rollback"]]
    if relapse:
        text = f"not recovered: {relapse[0].reason}"
    elif run.monitor.last_step >= rec["detected_step"] + RECOVERY_STEPS:
        text = f"recovered: step {run.monitor.last_step}, loss {run.loss:.4g}, no new incident"
    else:
        return
    run.recovery = None
    notices.append(follow_up_notice(run.run, rec["incident"], text))
