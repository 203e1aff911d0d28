"""Get each step's loss and grad norm to the host without a host-device sync.

On a GPU, ``.item()`` / ``float()`` / ``.cpu()`` on a CUDA tensor wait for the whole
stream to drain. Here the values are stacked on the device, copied asynchronously into
a pinned host slot, and read only once a CUDA event says the copy is done (usually one
step later). CPU tensors are copied into the same slots and are ready at once.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import torch

Number = torch.Tensor | float | int


@dataclass
class _Pending:
    step: int
    position: int
    lr: float | None
    slot: int
    event: torch.cuda.Event | None


@dataclass(frozen=True)
class StepValues:
    """Host-side values of one step."""

    step: int
    position: int
    lr: float | None
    loss: float
    grad_norm: float | None


class ValuePipe:
    """A ring of host slots holding (loss, grad norm) per step until they are read.

    Example:
        >>> pipe = ValuePipe()
        >>> pipe.push(0, 0, 1e-3, torch.tensor(2.5), torch.tensor(0.5))
        >>> pipe.push(1, 1, 1e-3, torch.tensor(float("nan")), None)
        >>> [(v.step, v.loss, v.grad_norm) for v in pipe.ready()]
        [(0, 2.5, 0.5), (1, nan, None)]
    """

    def __init__(self, slots: int = 64) -> None:
        self._host = torch.empty((slots, 2), dtype=torch.float32)
        self._rows = self._host.unbind(0)  # views made once: indexing per step costs ~us
        self._pinned = False
        self._pending: deque[_Pending] = deque()
        self._next = 0
        self.overwritten = 0

    def push(
        self, step: int, position: int, lr: float | None, loss: Number, grad_norm: Number | None
    ) -> None:
        """Queue one step's values; never waits for the device."""
        slot = self._next
        self._next = (self._next + 1) % self._host.shape[0]
        if len(self._pending) == self._host.shape[0]:
            self._pending.popleft()  # the reader fell a full ring behind: drop, count
            self.overwritten += 1
        event = self._copy(slot, loss, grad_norm)
        has_grad = grad_norm is not None
        self._pending.append(_Pending(step, position, lr, slot if has_grad else ~slot, event))

    def __len__(self) -> int:
        return len(self._pending)

    def latest(self) -> tuple[float, float | None] | None:
        """The newest (loss, grad norm) if already on the host (CPU tensors), else None."""
        if not self._pending or self._pending[-1].event is not None:
            return None
        p = self._pending[-1]
        loss, grad = self._rows[p.slot if p.slot >= 0 else ~p.slot].tolist()
        return loss, grad if p.slot >= 0 else None

    def ready(self) -> list[StepValues]:
        """Values whose copies have landed, oldest first (stops at the first not ready)."""
        out: list[StepValues] = []
        while self._pending:
            p = self._pending[0]
            if p.event is not None and not p.event.query():  # type: ignore[no-untyped-call]
                break
            self._pending.popleft()
            slot = p.slot if p.slot >= 0 else ~p.slot
            loss, grad = self._rows[slot].tolist()
            out.append(StepValues(p.step, p.position, p.lr, loss, grad if p.slot >= 0 else None))
        return out

    def clear(self) -> None:
        """Forget values not read yet (a rollback abandons those steps)."""
        self._pending.clear()

    def _copy(self, slot: int, loss: Number, grad_norm: Number | None) -> torch.cuda.Event | None:
        row = self._rows[slot]
        if _cpu_scalar(loss) and _cpu_scalar(grad_norm):
            with torch.no_grad():  # the common CPU case: one dispatch, straight into the slot
                torch.stack((loss, grad_norm), out=row)  # type: ignore[arg-type]
            return None
        tensors = [x for x in (loss, grad_norm) if isinstance(x, torch.Tensor)]
        if not tensors:
            row[0], row[1] = float(loss), _as_float(grad_norm)
            return None
        device = tensors[0].device
        vals = torch.stack([_on(x, device) for x in (loss, grad_norm)])
        if device.type != "cuda":
            row.copy_(vals)
            return None
        if not self._pinned:
            self._host = self._host.pin_memory()
            self._rows = self._host.unbind(0)
            self._pinned = True
            row = self._rows[slot]
        row.copy_(vals, non_blocking=True)
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record()
        return event


def _on(x: Number | None, device: torch.device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().reshape(()).to(torch.float32)
    return torch.tensor(_as_float(x), dtype=torch.float32, device=device)


def _as_float(x: Number | None) -> float:
    return math.nan if x is None else float(x)


def _cpu_scalar(x: Number | None) -> bool:
    return (
        isinstance(x, torch.Tensor)
        and x.dim() == 0
        and x.dtype == torch.float32
        and x.device.type == "cpu"
    )
