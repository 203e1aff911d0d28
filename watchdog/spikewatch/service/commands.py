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
        if cmd is not None and cmd["status"] == "vetoed" and not cmd.get("acked"):
            cmd["acked"] = True  # the trainer has let go of the proposal
            changed.append(cmd)
            continue
        if cmd is None or cmd["status"] != "pending":
            continue  # unknown or already applied: acks are idempotent
        cmd["status"] = "applied"
        changed.append(cmd)
        incident = cmd.get("incident") or ""
        if cmd["action"] == "rollback" and run.trainer_decides:
            text = f"rollback to step {cmd['rollback_before_step']} handed to the trainer"
        elif cmd["action"] == "rollback":
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


def vetoed(run: ServiceRun) -> list[str]:
    """Proposals an operator vetoed that the trainer has not let go of yet."""
    return [
        c["id"]
        for c in run.commands.values()
        if c["status"] == "vetoed" and c["source"] == "trainer" and not c.get("acked")
    ]


def trainer_halts(run: ServiceRun, decisions: list[Decision], notices: list[Notice]) -> None:
    """The trainer's monitor halted the run: mark it and say so in the incident's thread."""
    for d in decisions:
        if d.action == "halt" and not run.halted:
            run.halted = True
            incident = d.signal.incident if d.signal else ""
            notices.append(
                follow_up_notice(run.run, incident, f"halted by the trainer: {d.reason}")
            )


def apply_events(
    run: ServiceRun, events: list[dict[str, Any]], notices: list[Notice]
) -> list[dict[str, Any]]:
    """What the trainer did about proposals and commands: the commands it changed."""
    changed = []
    for event in events:
        kind = event["event"]
        if kind == "proposed":
            decision = Decision.from_json(event["decision"])
            incident = decision.signal.incident if decision.signal else ""
            cmd = new_command(run.run, decision, status="proposed", source="trainer",
                              incident=incident)  # fmt: skip
            cmd["id"] = str(event["proposal"])[:64]
            run.commands[cmd["id"]] = cmd
            changed.append(cmd)
            text = (
                f"rollback proposed, waiting for approval (command {cmd['id']}): approve or "
                f"veto it with POST /v1/runs/{run.run}/commands; training goes on meanwhile"
            )
            notices.append(follow_up_notice(run.run, incident, text))
        elif kind == "expired":
            held = run.commands.get(str(event.get("proposal")))
            if held is not None and held["status"] == "proposed":
                rolled = event.get("outcome") == "rollback"
                held["status"] = "applied" if rolled else "expired"
                changed.append(held)
                text = "no operator answered: " + ("rolled back" if rolled else "not rolled back")
                notices.append(follow_up_notice(run.run, held["incident"], text))
        elif kind == "refused":
            text = f"the trainer refused an operator's rollback: {event.get('reason', '')}"
            notices.append(follow_up_notice(run.run, "", text))
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
