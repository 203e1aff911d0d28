"""Operators' commands at a step boundary: taken on rank 0, the same on every rank.

Rank 0 alone holds the service client. How many commands it holds rides in the lockstep
gather (`Lockstep.gather`'s flag), so every rank knows at the same step whether to join
the one broadcast that delivers them; without a lockstep they are taken directly.
"""

from __future__ import annotations

import logging
from typing import Any

from spikewatch.records import Decision
from spikewatch.transport import Transport
from spikewatch_hooks.core.approval import Approvals
from spikewatch_hooks.distributed.lockstep import Lockstep
from spikewatch_hooks.state.snapshots.ring import SnapshotRing

log = logging.getLogger("spikewatch_hooks")


class CommandDesk:
    """Where operators' commands and proposals meet the engine.

    Args:
        transport: the engine's transport (a `ServiceTransport` has the commands).
        approvals: the open proposal, if any.
    """

    def __init__(self, transport: Transport, approvals: Approvals) -> None:
        self.transport, self.approvals = transport, approvals
        #: This boundary's decisions from operators (told apart from the monitor's).
        self.latest: list[Decision] = []

    def waiting(self) -> int:
        """Commands (and a timed-out proposal) this rank holds for the others."""
        pending = getattr(self.transport, "pending_commands", None)
        held = 0 if pending is None else int(pending())
        return held + len(self.approvals.expire_commands())

    def take(self, lockstep: Lockstep | None, *, reporting: bool) -> list[Decision]:
        """The operators' decisions for this boundary, the same on every rank."""
        self.latest = []
        take = getattr(self.transport, "take_commands", None)
        if take is None:
            return []
        if lockstep is None:
            commands = take() + self.approvals.expire_commands()
        elif lockstep.leader_flag > 0:  # rank 0 holds some: all join one broadcast
            mine = take() + self.approvals.expire_commands() if lockstep.rank == 0 else None
            commands = lockstep.broadcast(mine)
        else:
            return []
        self.latest, events = self.approvals.resolve(commands)
        self.report(events, reporting=reporting)
        return self.latest

    def from_operator(self, decision: Decision) -> bool:
        """Whether ``decision`` came from an operator at this boundary."""
        return any(decision is d for d in self.latest)

    def report(self, events: list[dict[str, Any]], *, reporting: bool) -> None:
        """Tell the service what the trainer did (rank 0 only)."""
        report = getattr(self.transport, "report", None)
        if events and report is not None and reporting:
            report(events)

    def refuse(self, decision: Decision, ring: SnapshotRing, *, step: int, reporting: bool) -> None:
        """An operator's rollback the ring cannot reach: never restore a later state."""
        why = (
            f"no snapshot at or before step {decision.rollback_before_step} (the ring holds "
            f"steps {ring.steps}); roll back to one of those, or resume from a disk checkpoint"
        )
        if reporting:
            log.error("spikewatch: refused the operator's rollback: %s", why)
        event = {"event": "refused", "step": step, "reason": why,
                 "rollback_before_step": decision.rollback_before_step}  # fmt: skip
        self.report([event], reporting=reporting)
