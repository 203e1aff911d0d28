"""In-memory snapshots of the whole training state, for rollbacks far cheaper than disk.

What a slot holds (`plan`): the parameters some optimizer updates, the model's
persistent buffers and every optimizer's state, by this rank's local tensors (FSDP2
DTensor shards included); frozen parameters are left out unless ``include_frozen``.
Where it is held: preallocated host buffers reused slot after slot (`buffers`),
restored in place into the live tensors, so the optimizers' references stay valid.
Replicated state (DDP) can be split across ranks (`distributed.split_ring`): each rank
keeps 1/world_size of every slot and a restore gathers the rest, one collective per
dtype. Schedulers and ``extras`` (a GradScaler, ...) are small: deep copies.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from spikewatch_hooks.distributed.split_ring import SplitStore, check_same_layout
from spikewatch_hooks.state.rng import rng_state, set_rng_state
from spikewatch_hooks.state.snapshots.budget import slot_estimate, slots_within
from spikewatch_hooks.state.snapshots.buffers import HostStore
from spikewatch_hooks.state.snapshots.plan import Key, Layout, LiveState, SnapshotError, plan
from spikewatch_hooks.state.snapshots.slot import Snapshot, live_targets, small_state
from spikewatch_hooks.state.snapshots.split import split_entries, wants_split

__all__ = ["Snapshot", "SnapshotRing"]

log = logging.getLogger("spikewatch_hooks")


class SnapshotRing:
    """The last ``keep`` snapshots of model, optimizers, schedulers, extras and RNGs.

    Args:
        model: the module being trained (plain, DDP- or FSDP2-wrapped).
        optimizer: an optimizer, or a sequence of them: all are snapshotted together.
        scheduler: None, a scheduler or a sequence of them.
        keep: how many snapshots to hold.
        extras: name -> object with ``state_dict()``/``load_state_dict()`` (a GradScaler),
            snapshotted by deep copy.
        split: split replicated state across ranks (None: when the model is DDP-wrapped
            in a group of more than one rank; False: full copies on every rank, restore
            without a collective; True: split whenever the group has > 1 rank).
        group: the process group the state is replicated over (None: the world).
        include_frozen: also copy parameters no optimizer updates (for a run whose code
            edits frozen weights by hand; otherwise a rollback leaves them as they are).
        budget_bytes: cap on this rank's snapshot host memory (None: no cap); see
            `budget`.

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
        split: bool | None = None,
        group: dist.ProcessGroup | None = None,
        include_frozen: bool = False,
        budget_bytes: int | None = None,
    ) -> None:
        self.model = model
        self.optimizers: list[torch.optim.Optimizer] = _as_list(optimizer)
        self.schedulers = _as_list(scheduler)
        self.extras = dict(extras or {})
        for name, obj in self.extras.items():
            if not (callable(getattr(obj, "state_dict", None))
                    and callable(getattr(obj, "load_state_dict", None))):  # fmt: skip
                raise SnapshotError(
                    f"extras[{name!r}] is a {type(obj).__name__} without state_dict() and "
                    "load_state_dict(); pass objects that have both (a GradScaler does)"
                )
        self.live = LiveState(model, self.optimizers, include_frozen=include_frozen)
        tensors = self.live.tensors()
        layout = plan(tensors)  # refuses what it cannot copy, now
        self._planned = (_identity(tensors), layout)
        self.split = wants_split(split, model, layout, group)
        self.group, self.budget_bytes = group, budget_bytes
        if self.split:
            check_same_layout(layout.entries, group)
        self.keep = self._slots_in_budget(keep, layout)
        #: A snapshot step kept whatever comes after (a rollback waiting for approval).
        self.pinned: int | None = None
        self._slots: list[Snapshot] = []
        self._spare: list[Snapshot] = []

    def __len__(self) -> int:
        return len(self._slots)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The first optimizer (the one most loops have)."""
        return self.optimizers[0]

    @property
    def steps(self) -> list[int]:
        """Steps of the snapshots held, oldest first."""
        return [s.step for s in self._slots]

    @property
    def nbytes(self) -> int:
        """Host bytes this rank holds for snapshots (slots and reusable spares)."""
        return sum(s.nbytes for s in self._slots + self._spare)

    def clear(self) -> None:
        """Forget every snapshot (after loading a checkpoint: the ring restarts there)."""
        self._spare.extend(self._slots)
        self._slots = []

    def take(self, step: int, data_position: int, extra: dict[str, Any] | None = None) -> Snapshot:
        """Copy the current state into a (reused) slot and return it."""
        tensors = self.live.tensors()
        layout = self._layout(tensors)
        snap = self._free_slot(layout)
        if any(s is snap for s in self._slots):
            return snap  # a ring of one, pinned: nothing may be overwritten
        snap.step, snap.data_position = step, data_position
        if snap.layout.signature != layout.signature:
            snap.whole = snap.split = None  # free the old buffers before allocating
            snap.layout, (snap.whole, snap.split) = layout, self._stores(layout)
        for store in (snap.whole, snap.split):
            if store is not None:
                store.copy_from(tensors)
        self._copy_small(snap)
        snap.rng = rng_state()
        snap.extra = copy.deepcopy(extra or {})
        snap.ready = _record_event(snap)
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
        """Load ``snap`` into the live model, optimizers, schedulers, extras and RNGs,
        in place (under a split ring: a collective, on every rank at the same step).

        Snapshots newer than ``snap`` belong to the abandoned future and are dropped.
        """
        if snap is None:
            raise ValueError("no snapshot to restore; take one first")
        if snap.ready is not None:
            snap.ready.synchronize()
        targets = live_targets(snap, self.live)
        for store in (snap.whole, snap.split):
            if store is not None:
                store.copy_to(targets)
        for opt, groups in zip(self.optimizers, snap.optimizer_groups, strict=True):
            for group, saved_group in zip(opt.param_groups, groups, strict=True):
                group.update(copy.deepcopy(saved_group))
        for sched, state in zip(self.schedulers, snap.schedulers, strict=True):
            sched.load_state_dict(copy.deepcopy(state))
        for name, state in snap.extras.items():
            self.extras[name].load_state_dict(copy.deepcopy(state))
        set_rng_state(snap.rng)
        newer = [s for s in self._slots if s.step > snap.step]
        self._slots = [s for s in self._slots if s.step <= snap.step]
        self._spare.extend(newer)

    # -- helpers ------------------------------------------------------------------------
    def _slots_in_budget(self, keep: int, layout: Layout) -> int:
        """How many slots the budget holds (estimated: `budget`); logged when
        fewer than ``keep``; a `SnapshotError` when not even one."""
        world = dist.get_world_size(self.group) if self.split else 1
        estimate = slot_estimate(self._slot_bytes(layout), self.optimizers, split_world=world)
        fits = slots_within(budget=self.budget_bytes, keep=keep, slot_bytes=estimate)
        if fits < keep:
            log.warning(
                "spikewatch: snapshot_budget_bytes=%d holds %d of keep_snapshots=%d slots "
                "(%d bytes each on this rank); the ring keeps %d",
                self.budget_bytes, fits, keep, estimate, fits,
            )  # fmt: skip
        return fits

    def _layout(self, tensors: dict[Key, torch.Tensor]) -> Layout:
        """The layout of ``tensors``, planned again only when they are other tensors
        (optimizer state appeared, a checkpoint was loaded): planning costs ~10 us each."""
        identity = _identity(tensors)
        if self._planned[0] != identity:
            self._planned = (identity, plan(tensors))
        return self._planned[1]

    def _slot_bytes(self, layout: Layout) -> int:
        whole, parts = split_entries(layout, self.split)
        world = dist.get_world_size(self.group) if self.split else 1
        return sum(e.nbytes for e in whole) + -(-sum(e.nbytes for e in parts) // world)

    def _stores(self, layout: Layout) -> tuple[HostStore | None, SplitStore | None]:
        whole, parts = split_entries(layout, self.split)
        return (
            HostStore(whole) if whole else None,
            SplitStore(parts, self.group) if parts else None,
        )

    def _free_slot(self, layout: Layout) -> Snapshot:
        """A slot to fill: a new or spare one, or the oldest (not pinned) one when the
        ring is full or another slot would break the budget."""
        need = self._slot_bytes(layout)
        if self.budget_bytes is not None and self.nbytes + need > self.budget_bytes:
            self._spare.clear()
            if self._slots and self.nbytes + need > self.budget_bytes:
                self._shrink(need)
        if len(self._slots) >= self.keep:
            oldest = 1 if self._slots[0].step == self.pinned and len(self._slots) > 1 else 0
            if self._slots[oldest].step == self.pinned:
                return self._slots[oldest]
            return self._slots.pop(oldest)
        return self._spare.pop() if self._spare else Snapshot(step=-1, data_position=0)

    def _shrink(self, need: int) -> None:
        """The slots outgrew the budget (optimizer state appeared): keep fewer."""
        fits = max(1, min(self.keep, (self.budget_bytes or 0) // max(need, 1)))
        if fits < self.keep:
            log.warning(
                "spikewatch: snapshots grew to %d bytes per slot on this rank; "
                "snapshot_budget_bytes=%s holds %d (keep was %d)",
                need, self.budget_bytes, fits, self.keep,
            )  # fmt: skip
            self.keep = fits
        while len(self._slots) > self.keep:
            oldest = 1 if self._slots[0].step == self.pinned else 0
            self._slots.pop(oldest)

    def _copy_small(self, snap: Snapshot) -> None:
        """Non-tensor optimizer state, param groups, schedulers and extras (deep copies)."""
        snap.optimizer_state = [
            [small_state(opt.state.get(p)) for p in self.live.params(i)]
            for i, opt in enumerate(self.optimizers)
        ]
        snap.optimizer_groups = [
            [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in o.param_groups]
            for o in self.optimizers
        ]
        snap.schedulers = [copy.deepcopy(s.state_dict()) for s in self.schedulers]
        snap.extras = {n: copy.deepcopy(o.state_dict()) for n, o in self.extras.items()}


def _identity(tensors: dict[Key, torch.Tensor]) -> tuple[Any, ...]:
    # The same tensor objects with the same shapes need no new plan (``p.data = ...``
    # keeps the object but may change the shape, so the shape is part of it).
    return tuple((key, id(t), t.shape, t.dtype, t.device) for key, t in tensors.items())


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _record_event(snap: Snapshot) -> torch.cuda.Event | None:
    if any(s is not None and s.pinned for s in (snap.whole, snap.split)):
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record()
        return event
    return None
