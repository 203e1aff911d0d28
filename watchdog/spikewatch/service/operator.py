"""Operators' commands: halt, resume, roll back, approve or veto a proposed rollback."""

from __future__ import annotations

from typing import Any

from spikewatch.errors import SpikewatchError
from spikewatch.records import Decision
from spikewatch.service.commands import new_command
from spikewatch.service.registry import RunRegistry


class OperatorError(SpikewatchError):
    """An operator's command cannot be applied; ``status`` is the HTTP status to answer."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class Operator:
    """Applies operators' commands to the registry's runs and persists them.

    Example:
        >>> from spikewatch.records import StepRecord
        >>> from spikewatch.service.config import ServiceConfig
        >>> from spikewatch.service.payloads import IngestBatch
        >>> from spikewatch.service.store import EventStore
        >>> reg = RunRegistry(EventStore(":memory:"), ServiceConfig())
        >>> _ = reg.ingest("r", IngestBatch.of([StepRecord(run="r", step=0, loss=1.0)]), b"{}")
        >>> Operator(reg).apply("r", action="halt", reason="bad data")["command"]["status"]
        'pending'
        >>> reg.status("r").state
        'halted'
    """

    def __init__(self, registry: RunRegistry) -> None:
        self.registry = registry

    def apply(
        self,
        run_id: str,
        *,
        action: str,
        command: str | None = None,
        reason: str = "operator request",
        rollback_before_step: int | None = None,
        skip_ahead: int = 0,
    ) -> dict[str, Any]:
        """Apply one command; return ``{"command": ..., "run": state}``."""
        reg = self.registry
        with reg.lock:
            run = reg.fresh(run_id)
            if run is None:
                raise OperatorError(f"no run {run_id!r}: it has sent no records yet", 404)
            if action in ("approve", "veto"):
                cmd = self._decide(run.commands, action, command)
            elif action == "resume":
                cmd = self._resume(run.commands, run_id, reason)
                run.halted = False
                run.monitor.policy.resume()
            else:
                _check_restorable(run.restorable, action, rollback_before_step)
                cmd = self._new(
                    run_id,
                    action,
                    reason=reason,
                    last_step=run.monitor.last_step,
                    before=rollback_before_step,
                    skip_ahead=skip_ahead,
                )
                run.commands[cmd["id"]] = cmd
                run.halted = run.halted or action == "halt"
            changed = [
                c for c in run.commands.values() if c["id"] == cmd["id"] or c.get("_changed")
            ]
            for c in changed:
                c.pop("_changed", None)
            reg.commit_run(run, commands=changed)
            return {"command": cmd, "run": run.state}

    @staticmethod
    def _decide(
        commands: dict[str, dict[str, Any]], action: str, command_id: str | None
    ) -> dict[str, Any]:
        if command_id is None:
            raise OperatorError(f"{action} needs the proposed command's id in 'command'", 422)
        cmd = commands.get(command_id)
        if cmd is None:
            raise OperatorError(
                f"no command {command_id!r} for this run: see GET /v1/runs/{{run}}", 404
            )
        allowed = ("proposed",) if action == "approve" else ("proposed", "pending")
        if cmd["status"] not in allowed:
            raise OperatorError(
                f"command {command_id!r} is {cmd['status']}: only a proposed one can be {action}d",
                409,
            )
        cmd["status"] = "pending" if action == "approve" else "vetoed"
        return cmd

    @staticmethod
    def _resume(commands: dict[str, dict[str, Any]], run_id: str, reason: str) -> dict[str, Any]:
        for c in commands.values():
            if c["action"] == "halt" and c["status"] == "pending":
                c["status"], c["_changed"] = "withdrawn", True
        return {"id": "", "run": run_id, "action": "resume", "status": "applied", "reason": reason}

    @staticmethod
    def _new(
        run_id: str,
        action: str,
        *,
        reason: str,
        last_step: int | None,
        before: int | None,
        skip_ahead: int,
    ) -> dict[str, Any]:
        if action == "rollback" and before is None:
            raise OperatorError(
                "rollback needs rollback_before_step: the step to restore at or before", 422
            )
        decision = Decision(
            run=run_id,
            step=last_step or 0,
            action=action,  # type: ignore[arg-type]
            reason=f"operator: {reason}",
            rollback_before_step=before,
            skip_ahead=skip_ahead,
        )
        return new_command(run_id, decision, status="pending", source="operator", incident="")


def _check_restorable(restorable: list[int] | None, action: str, before: int | None) -> None:
    """Refuse at once a rollback the trainer has said it cannot carry out."""
    if action != "rollback" or before is None or not restorable:
        return
    if min(restorable) > before:
        raise OperatorError(
            f"the trainer holds no snapshot at or before step {before} (it can restore "
            f"steps {sorted(restorable)}): choose one of those, or resume it from a disk "
            "checkpoint",
            409,
        )
