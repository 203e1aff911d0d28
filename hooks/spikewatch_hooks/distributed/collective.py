"""Checkpoint steps every rank takes together: a failure on one rank is raised on all.

A rank that raised while another waits in the next collective would hang the run, so
each step of a save or a load runs through `together`: every rank runs its part, then
the ranks exchange their errors, and every rank raises if any failed.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from spikewatch_hooks.state.checkpoint import CheckpointError

if TYPE_CHECKING:
    from spikewatch_hooks.core.engine import GuardEngine

_T = TypeVar("_T")


def group_of(engine: GuardEngine) -> tuple[dist.ProcessGroup | None, int, int]:
    """The engine's process group, this rank in it, and its size (``None, 0, 1`` alone)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None, 0, 1
    group = None if engine.lockstep is None else engine.lockstep.group
    return group, dist.get_rank(group), dist.get_world_size(group)


def together(group: dist.ProcessGroup | None, work: Callable[[], _T], what: str) -> _T:
    """Run ``work`` on every rank and return this rank's result; if it failed on any
    rank, every rank raises (the failing rank its own error), so none is left waiting."""
    result, _ = _run_and_agree(group, work, what, share=False)
    return result


def together_gathered(
    group: dist.ProcessGroup | None, work: Callable[[], _T], what: str
) -> list[_T]:
    """Like `together`, and every rank gets every rank's result, in rank order."""
    _, results = _run_and_agree(group, work, what, share=True)
    return results


def _run_and_agree(
    group: dist.ProcessGroup | None, work: Callable[[], _T], what: str, *, share: bool
) -> tuple[_T, list[_T]]:
    failure: Exception | None = None
    result: Any = None
    try:
        result = work()
    except Exception as exc:  # sent to every rank below, raised as is here
        failure = exc
    mine = (None if failure is None else str(failure), result if share else None)
    replies: list[tuple[str | None, Any]] = [mine]
    if dist.is_available() and dist.is_initialized():
        # Objects, not a tensor: this also works on an NCCL-only group.
        replies = [(None, None)] * dist.get_world_size(group)
        dist.all_gather_object(replies, mine, group=group)
    if failure is not None:
        raise failure
    bad = [(rank, error) for rank, (error, _) in enumerate(replies) if error is not None]
    if bad:
        raise CheckpointError(f"rank {bad[0][0]} could not {what}: {bad[0][1]}")
    return result, [reply for _, reply in replies]


def dcp_call(where: Path, call: Callable[[], _T]) -> _T:
    """Run a ``torch.distributed.checkpoint`` call; its failures become `CheckpointError`.

    DCP gathers a failure on any rank to every rank itself, so all raise alike.
    """
    with warnings.catch_warnings():  # one process without a group is a supported case
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            return call()
        except (RuntimeError, OSError, ValueError, CheckpointException) as exc:
            raise dcp_error(where, exc) from exc


def dcp_error(where: Path, exc: BaseException) -> CheckpointError:
    """A `CheckpointError` for a failed DCP call, with the cause's first line."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return CheckpointError(
        f"{where}: torch.distributed.checkpoint failed ({first}); check the folder "
        "(space, permissions) and that model and optimizer match the saved ones"
    )
