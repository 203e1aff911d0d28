"""Lockstep across ranks: every rank sees the same numbers, so it takes the same decision.

Each rank stages its (local loss, grad norm) per step; one all-gather per hand-off to
the monitor (every ``monitor_every`` steps, 8 by default) gives every rank every rank's
values. The monitor is then fed the mean loss
(a NaN on any rank makes it NaN: non-finite anywhere counts for all) and the mean grad
norm (identical on every rank under DDP, whose gradients are already averaged). The
monitor is deterministic, so each rank's replica decides exactly what rank 0 decides,
at the same step, with no broadcast. Between hand-offs no collective is needed: the
immediate skip check reads only the grad norm, which DDP makes identical on every rank
(a NaN loss on one rank makes the averaged gradients NaN everywhere), so every rank
flags the same steps and joins the same gathers. Only rank 0 reports (logs, sinks); the other ranks
stay silent. The gathered values are kept for a while, so an incident can say which
rank(s) saw the spike: bad data on one rank, or a problem of the whole model.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import torch
import torch.distributed as dist

from spikewatch.errors import SpikewatchError
from spikewatch_hooks.core.values import StepValues

Number = torch.Tensor | float | int


class PeerFailureError(SpikewatchError):
    """A guard collective failed or timed out: a peer rank died or stalled."""


class Lockstep:
    """The per-step collective of a guarded distributed run.

    Args:
        group: the process group (default: the world).
        keep: how many steps of per-rank values to keep for attribution.
    """

    def __init__(self, group: dist.ProcessGroup | None = None, *, keep: int = 256) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.keep = keep
        self._gathered: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._staged: list[tuple[int, int, float | None, torch.Tensor, bool]] = []
        self.leader_flag = 0.0

    @staticmethod
    def active() -> bool:
        """True inside an initialised process group with more than one rank."""
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def stage(
        self, step: int, position: int, lr: float | None, loss: Number, grad_norm: Number | None
    ) -> None:
        """Keep this step's local (loss, grad norm) on the device until the next `gather`."""
        device = loss.device if isinstance(loss, torch.Tensor) else torch.device("cpu")
        local = torch.stack([_scalar(loss, device), _scalar(grad_norm, device)])
        self._staged.append((step, position, lr, local, grad_norm is not None))

    def __len__(self) -> int:
        return len(self._staged)

    def gather(self, flag: float = 0.0) -> list[StepValues]:
        """One all-gather of every staged step; the means every rank will decide on.

        ``flag`` rides along (rank 0's is kept in `leader_flag`): how many operator
        commands rank 0 holds, so every rank knows at the same step whether to join the
        broadcast that delivers them, with no collective of its own.
        Reads the gathered values on the host (on a GPU: one sync per gather).
        """
        self.leader_flag = 0.0
        if not self._staged:
            return []
        staged, self._staged = self._staged, []
        values = torch.stack([s[3] for s in staged]).reshape(-1)
        local = torch.cat([values, torch.tensor([flag], dtype=values.dtype, device=values.device)])
        flat = torch.empty(
            self.world_size * local.numel(), dtype=torch.float32, device=local.device
        )
        try:
            _ALL_GATHER(flat, local, group=self.group)
        except (RuntimeError, dist.DistBackendError) as exc:
            raise PeerFailureError(
                f"rank {self.rank}/{self.world_size}: the guard's all-gather at step "
                f"{staged[-1][0]} failed ({str(exc).splitlines()[0]}); a peer rank probably "
                "died or stalled. Stopping here instead of hanging: check the other ranks' "
                "logs, then resume from the last checkpoint (the process group's timeout "
                "bounds the wait)"
            ) from exc
        rows = flat.view(self.world_size, local.numel())
        self.leader_flag = float(rows[0, -1])
        per_rank = rows[:, :-1].reshape(self.world_size, len(staged), 2)
        for i, s in enumerate(staged):
            self._gathered[s[0]] = per_rank[:, i, :]
        while len(self._gathered) > self.keep:
            self._gathered.popitem(last=False)
        means = per_rank.mean(dim=0).tolist()
        return [
            StepValues(step, position, lr, m[0], m[1] if has_grad else None)
            for (step, position, lr, _, has_grad), m in zip(staged, means, strict=True)
        ]

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (operator commands, the effective settings)."""
        box = [obj if self.rank == 0 else None]
        try:
            dist.broadcast_object_list(
                box,
                src=dist.get_global_rank(self.group, 0) if self.group is not None else 0,
                group=self.group,
            )
        except (RuntimeError, dist.DistBackendError) as exc:
            raise PeerFailureError(
                f"rank {self.rank}/{self.world_size}: the guard's broadcast failed "
                f"({str(exc).splitlines()[0]}); a peer rank probably died or stalled"
            ) from exc
        return box[0]

    def ranks_at(self, step: int) -> list[float] | None:
        """Each rank's local loss at ``step`` (reads the device once), if still kept."""
        gathered = self._gathered.get(step)
        return None if gathered is None else [row[0] for row in gathered.tolist()]

    def attribution(self, step: int) -> str:
        """Which rank(s) saw the loss jump at ``step``, as a phrase for an incident."""
        losses = self.ranks_at(step)
        if losses is None:
            return "per-rank losses no longer kept"
        finite = [x for x in losses if math.isfinite(x)]
        low = min(finite) if finite else math.nan
        odd = [r for r, x in enumerate(losses) if not math.isfinite(x) or x > low + 0.1 * abs(low)]
        shown = ", ".join(f"{x:.4g}" for x in losses)
        if not odd or len(odd) == len(losses):
            return f"all {len(losses)} ranks alike (losses {shown})"
        return f"rank(s) {odd} saw it (losses by rank: {shown})"

    def clear(self) -> None:
        """Forget kept and staged values (after a rollback the steps are replayed)."""
        self._gathered.clear()
        self._staged.clear()


# torch >= 2.13 names it all_gather_single; older releases all_gather_into_tensor.
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _scalar(x: Number | None, device: torch.device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().reshape(()).to(device=device, dtype=torch.float32)
    return torch.tensor(math.nan if x is None else float(x), dtype=torch.float32, device=device)
