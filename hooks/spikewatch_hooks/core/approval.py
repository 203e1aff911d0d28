"""Operators' commands at a step boundary, and rollbacks waiting for approval.

With ``approval = "manual"`` in the service, a rollback the trainer's monitor decides is
not applied: it becomes a proposal, the snapshot it would restore is pinned in the ring
(so it is still there when an operator says yes), and training goes on (bad updates are
still skipped). An approval arrives as a ``rollback`` command with the proposal's id; a
veto as a ``veto`` command; after ``timeout_s`` the configured default applies. Under
``torch.distributed`` the timeout is judged on rank 0 only and travels as an ``expire``
command with the others, so every rank resolves the proposal at the same step.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from spikewatch.http_wire import decision_of
from spikewatch.records import Decision
from spikewatch.service_transport import Approval
from spikewatch_hooks.state.snapshots.ring import SnapshotRing


@dataclass
class Proposal:
    """A rollback waiting for an operator."""

    id: str
    decision: Decision
    pinned_step: int | None
    since: float


class Approvals:
    """The open proposal (at most one) and what operators' commands do to it."""

    def __init__(
        self,
        ring: SnapshotRing,
        approval: Approval,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ring, self.approval, self.clock = ring, approval, clock
        self.open: Proposal | None = None

    @property
    def manual(self) -> bool:
        """Whether the trainer's rollbacks wait for an operator."""
        return self.approval.mode == "manual"

    def propose(self, decision: Decision, proposal_id: str | None = None) -> dict[str, Any]:
        """Hold ``decision`` for approval; pin its snapshot; return the event to report.

        A proposal already open absorbs later rollbacks of the run (one at a time).
        """
        if self.open is not None:
            return {"event": "folded", "proposal": self.open.id, "reason": decision.reason}
        target = decision.rollback_before_step or 0
        snap = self.ring.newest_at_or_before(target)
        pinned = None if snap is None else snap.step
        self.ring.pinned = pinned
        pid = proposal_id or uuid.uuid4().hex[:16]
        self.open = Proposal(pid, decision, pinned, self.clock())
        return {
            "event": "proposed",
            "proposal": pid,
            "decision": decision.to_json(),
            "pinned_step": pinned,
        }

    def expired(self) -> bool:
        """The open proposal waited ``timeout_s`` (judged where the clock is: rank 0)."""
        p = self.open
        return p is not None and self.clock() - p.since >= self.approval.timeout_s

    def resolve(
        self, commands: list[dict[str, Any]]
    ) -> tuple[list[Decision], list[dict[str, Any]]]:
        """The decisions ``commands`` ask for, and the events to report about them."""
        decisions: list[Decision] = []
        events: list[dict[str, Any]] = []
        for cmd in commands:
            action = cmd.get("action")
            if action == "veto" or (action == "expire" and self.approval.default == "veto"):
                if self._close(cmd["id"]) and action == "expire":
                    events.append({"event": "expired", "proposal": cmd["id"], "outcome": "veto"})
                continue
            if action == "expire":
                proposal = self.open if self.open and self.open.id == cmd["id"] else None
                if proposal is not None:
                    decisions.append(_timed_out(proposal.decision, self.approval.timeout_s))
                    event = {"event": "expired", "proposal": cmd["id"], "outcome": "rollback"}
                    events.append(event)
                continue
            if action in ("rollback", "halt"):
                decisions.append(self._approved(cmd))
        return decisions, events

    def _approved(self, cmd: dict[str, Any]) -> Decision:
        proposal = self.open
        if proposal is not None and cmd["action"] == "rollback" and cmd["id"] == proposal.id:
            # The operator approved what the monitor decided: its LR cut and skip too.
            return replace(
                proposal.decision,
                reason=f"{proposal.decision.reason} (approved by an operator)",
            )
        return decision_of(cmd)

    def _close(self, proposal_id: str) -> bool:
        if self.open is None or self.open.id != proposal_id:
            return False
        self.open = None
        self.ring.pinned = None
        return True

    def applied(self) -> None:
        """A rollback was applied: whatever was proposed is settled by it."""
        self.open = None
        self.ring.pinned = None

    def expire_commands(self) -> list[dict[str, Any]]:
        """An ``expire`` command when the open proposal timed out (rank 0 asks this)."""
        if self.open is not None and self.expired():
            return [{"id": self.open.id, "action": "expire"}]
        return []


def _timed_out(decision: Decision, timeout_s: float) -> Decision:
    return replace(
        decision,
        reason=f"{decision.reason} (no operator answered in {timeout_s:g} s: rolled back)",
    )
