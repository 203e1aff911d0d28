"""In-memory snapshots of the whole training state, for rollbacks far cheaper than disk.

Buffers are allocated once per slot and reused (``copy_`` into preallocated, pinned
memory runs at memory bandwidth; ``clone()`` or ``torch.save`` do not), and restored
in place into the live tensors, so the optimizer's references to parameters stay valid.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from spikewatch_hooks.state.rng import rng_state, set_rng_state


@dataclass
class Snapshot:
    """The state after ``step`` optimizer steps; ``data_position`` is the next batch."""

    step: int
    data_position: int
    model: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer_state: list[dict[str, Any]] = field(default_factory=list)
    optimizer_groups: list[dict[str, Any]] = field(default_factory=list)
    schedulers: list[dict[str, Any]] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)
    rng: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    ready: torch.cuda.Event | None = None

    @property
    def nbytes(self) -> int:
        """Bytes held by this snapshot's tensors."""
        tensors = list(self.model.values()) + [
            v for s in self.optimizer_state for v in s.values() if isinstance(v, torch.Tensor)
        ]
        return sum(t.numel() * t.element_size() for t in tensors)


class SnapshotRing:
    """The last ``keep`` snapshots of model, optimizers, schedulers, extras and RNG state.

    Args:
        model: the live model.
        optimizer: the optimizer, or a sequence of them (each one's state is snapshotted).
        scheduler: None, one LR scheduler, or a sequence of them.
        keep: how many snapshots to hold.
        extras: other objects with ``state_dict()``/``load_state_dict()`` that shape the
            update (a ``GradScaler``), by name; deep-copied into each snapshot.

    Example:
        >>> model = nn.Linear(2, 1)
        >>> opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        >>> ring = SnapshotRing(model, opt, keep=2)
        >>> _ = ring.take(step=0, data_position=0)
        >>> before = model.weight.detach().clone()
        >>> model(torch.ones(1, 2)).sum().backward(); opt.step()
        >>> bool(torch.equal(model.weight, before))
        False
        >>> ring.restore(ring.newest_at_or_before(0))
        >>> bool(torch.equal(model.weight, before)), len(opt.state)
        (True, 0)
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
        scheduler: Any = None,
        *,
        keep: int = 4,
        extras: Mapping[str, Any] | None = None,
    ) -> None:
        self.model = model
        self.optimizers = _as_list(optimizer)
        self.schedulers = _as_list(scheduler)
        self.extras = dict(extras or {})
        self.keep = keep
        #: A snapshot step kept whatever comes after (a rollback waiting for approval).
        self.pinned: int | None = None
        self._slots: list[Snapshot] = []
        self._spare: list[Snapshot] = []

    def __len__(self) -> int:
        return len(self._slots)

    @property
    def steps(self) -> list[int]:
        """Steps of the snapshots held, oldest first."""
        return [s.step for s in self._slots]

    @property
    def nbytes(self) -> int:
        """Bytes held by all snapshots."""
        return sum(s.nbytes for s in self._slots + self._spare)

    def take(self, step: int, data_position: int, extra: dict[str, Any] | None = None) -> Snapshot:
        """Copy the current state into a (reused) slot and return it."""
        if len(self._slots) >= self.keep:
            oldest = 1 if self._slots[0].step == self.pinned and len(self._slots) > 1 else 0
            if self._slots[oldest].step == self.pinned:
                return self._slots[oldest]  # a ring of one, pinned: nothing may be overwritten
            snap = self._slots.pop(oldest)
        elif self._spare:
            snap = self._spare.pop()
        else:
            snap = Snapshot(step=step, data_position=data_position)
        snap.step, snap.data_position = step, data_position
        _copy_into(snap.model, self.model.state_dict())
        self._copy_optimizer(snap)
        snap.schedulers = [copy.deepcopy(s.state_dict()) for s in self.schedulers]
        snap.extras = {k: copy.deepcopy(v.state_dict()) for k, v in self.extras.items()}
        snap.rng = rng_state()
        snap.extra = copy.deepcopy(extra or {})
        snap.ready = _record_event(snap.model)
        self._slots.append(snap)
        return snap

    def newest_at_or_before(self, step: int) -> Snapshot | None:
        """The newest snapshot taken at or before ``step`` (None if there is none)."""
        candidates = [s for s in self._slots if s.step <= step]
        return candidates[-1] if candidates else None

    def oldest(self) -> Snapshot | None:
        """The oldest snapshot held."""
        return self._slots[0] if self._slots else None

    def restore(self, snap: Snapshot | None) -> None:
        """Load ``snap`` into the live model, optimizer, scheduler and RNGs, in place.

        Snapshots newer than ``snap`` belong to the abandoned future and are dropped.
        """
        if snap is None:
            raise ValueError("no snapshot to restore; take one first")
        if snap.ready is not None:
            snap.ready.synchronize()
        live = self.model.state_dict()
        with torch.no_grad():
            for name, buf in snap.model.items():
                live[name].copy_(buf, non_blocking=True)
        self._restore_optimizer(snap)
        for scheduler, saved in zip(self.schedulers, snap.schedulers, strict=True):
            scheduler.load_state_dict(copy.deepcopy(saved))
        for name, saved in snap.extras.items():
            self.extras[name].load_state_dict(copy.deepcopy(saved))
        set_rng_state(snap.rng)
        newer = [s for s in self._slots if s.step > snap.step]
        self._slots = [s for s in self._slots if s.step <= snap.step]
        self._spare.extend(newer)

    def _params(self) -> list[tuple[torch.optim.Optimizer, torch.Tensor]]:
        """Every (optimizer, parameter) pair, optimizer by optimizer, group by group."""
        return [(o, p) for o in self.optimizers for g in o.param_groups for p in g["params"]]

    def _copy_optimizer(self, snap: Snapshot) -> None:
        params = self._params()
        if len(snap.optimizer_state) != len(params):
            snap.optimizer_state = [{} for _ in params]
        for saved, (opt, p) in zip(snap.optimizer_state, params, strict=True):
            state = opt.state.get(p, {})
            for key in list(saved):
                if key not in state:
                    del saved[key]
            _copy_into(saved, state)
        snap.optimizer_groups = [
            {k: copy.deepcopy(v) for k, v in g.items() if k != "params"}
            for o in self.optimizers
            for g in o.param_groups
        ]

    def _restore_optimizer(self, snap: Snapshot) -> None:
        with torch.no_grad():
            for saved, (opt, p) in zip(snap.optimizer_state, self._params(), strict=True):
                if not saved:
                    opt.state.pop(p, None)
                    continue
                state = opt.state[p]
                for key, value in saved.items():
                    _restore_value(state, key, value, p.device)
        groups = [g for o in self.optimizers for g in o.param_groups]
        for group, saved_group in zip(groups, snap.optimizer_groups, strict=True):
            group.update(copy.deepcopy(saved_group))


def _copy_into(buffers: dict[str, Any], source: dict[str, Any]) -> None:
    """Copy ``source`` into ``buffers``, allocating (pinned) CPU buffers on first use."""
    for key, value in source.items():
        if not isinstance(value, torch.Tensor):
            buffers[key] = copy.deepcopy(value)
            continue
        buf = buffers.get(key)
        if (
            not isinstance(buf, torch.Tensor)
            or buf.shape != value.shape
            or buf.dtype != value.dtype
        ):
            buf = torch.empty(
                value.shape, dtype=value.dtype, device="cpu", pin_memory=value.is_cuda
            )
            buffers[key] = buf
        buf.copy_(value.detach(), non_blocking=value.is_cuda)


def _restore_value(state: dict[str, Any], key: str, value: Any, device: torch.device) -> None:
    if not isinstance(value, torch.Tensor):
        state[key] = copy.deepcopy(value)
        return
    live = state.get(key)
    if isinstance(live, torch.Tensor) and live.shape == value.shape and live.dtype == value.dtype:
        live.copy_(value, non_blocking=live.is_cuda)
    else:
        # Adam keeps "step" on the CPU unless capturable/fused; keep the saved placement
        # for scalars and move the rest next to the parameter.
        target = "cpu" if value.dim() == 0 and not value.is_cuda else device
        state[key] = value.to(target, copy=True)


def _record_event(buffers: dict[str, torch.Tensor]) -> torch.cuda.Event | None:
    if any(b.is_pinned() for b in buffers.values()):
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record()
        return event
    return None


def _as_list(value: Any) -> list[Any]:
    """None -> [], one object -> [it], a list or tuple -> a list of its items."""
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
