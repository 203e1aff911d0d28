"""Commands for trainers: made from the policy's decisions, acknowledged by the trainer.

A command is ``proposed`` (waiting for an operator), ``pending`` (sent with every ingest
answer until acknowledged), ``applied``, ``vetoed`` or ``withdrawn``.
"""

from __future__ import annotations

import uuid
from typing import Any

from spikewatch.records import Command, Decision
from spikewatch.service.notify import Notice, follow_up_notice
from spikewatch.service.run import ServiceRun


def apply_acks(run: ServiceRun, acks: list[str], notices: list[Notice]) -> list[dict[str, Any]]:
    """Mark the commands the trainer applied; count rollbacks; say so in their threads."""
    changed = []
    for cid in acks:
        cmd = run.commands.get(cid)
        if cmd is None or cmd["status"] != "pending":
            continue  # unknown or already applied: acks are idempotent
        cmd["status"] = "applied"
        changed.append(cmd)
        incident = cmd.get("incident") or ""
        if cmd["action"] == "rollback":
            run.counts["rollbacks"] += 1
            run.pending_skip_ahead = int(cmd["skip_ahead"])
            run.recovery = {"incident": incident, "detected_step": cmd["issued_step"]}
            text = (
                f"rollback applied: restored the newest snapshot at or before step "
                f"{cmd['rollback_before_step']}, skipping {cmd['skip_ahead']} batches ahead"
            )
        else:
            text = f"{cmd['action']} applied by the trainer: {cmd['reason']}"
        notices.append(follow_up_notice(run.run, incident, text))
    return changed


def commands_from(
    run: ServiceRun, decisions: list[Decision], notices: list[Notice], *, approval: str
) -> list[dict[str, Any]]:
    """Commands for the trainer from the policy's rollbacks and halts (one per incident)."""
    out = []
    for d in decisions:
        if d.action not in ("rollback", "halt"):
            continue
        incident = d.signal.incident if d.signal else ""
        if any(
            c["incident"] == incident and c["action"] == d.action for c in run.commands.values()
        ):
            continue  # one command per incident and action
        status = "proposed" if d.action == "rollback" and approval == "manual" else "pending"
        cmd = new_command(run.run, d, status=status, source="policy", incident=incident)
        run.commands[cmd["id"]] = cmd
        out.append(cmd)
        if d.action == "halt":
            run.halted = True
            notices.append(follow_up_notice(run.run, incident, f"halted: {d.reason}"))
    return out


def new_command(
    run: str, decision: Decision, *, status: str, source: str, incident: str
) -> dict[str, Any]:
    """A command for the trainer from a decision, as stored and sent."""
    cmd = Command(
        run=run,
        id=uuid.uuid4().hex[:16],
        action=decision.action,  # type: ignore[arg-type]
        reason=decision.reason,
        issued_step=decision.step,
        rollback_before_step=decision.rollback_before_step,
        lr_factor=decision.lr_factor,
        skip_ahead=decision.skip_ahead,
    )
    return {**cmd.to_json(), "status": status, "source": source, "incident": incident}
