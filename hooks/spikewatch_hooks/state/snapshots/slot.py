"""One slot of the snapshot ring, and the live tensors a restore of it writes into."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch

from spikewatch_hooks.distributed.split_ring import SplitStore
from spikewatch_hooks.state.snapshots.buffers import HostStore
from spikewatch_hooks.state.snapshots.plan import Entry, Key, Layout, LiveState, local
from spikewatch_hooks.state.snapshots.split import blank


@dataclass(eq=False)
class Snapshot:
    """The state after ``step`` optimizer steps; ``data_position`` is the next batch."""

    step: int
    data_position: int
    layout: Layout = field(default_factory=lambda: Layout(()))
    whole: HostStore | None = None
    split: SplitStore | None = None
    #: Per optimizer, per parameter: its non-tensor state values (None: no state yet).
    optimizer_state: list[list[dict[str, Any] | None]] = field(default_factory=list)
    optimizer_groups: list[list[dict[str, Any]]] = field(default_factory=list)
    schedulers: list[dict[str, Any]] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)
    rng: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    ready: torch.cuda.Event | None = None

    @property
    def nbytes(self) -> int:
        """Host bytes this rank holds for this snapshot's tensors."""
        return sum(s.nbytes for s in (self.whole, self.split) if s is not None)

    @property
    def model(self) -> dict[str, torch.Tensor]:
        """The host copies of the model's tensors by name (those held whole on this
        rank: under a split ring each rank holds only a part of the rest)."""
        return {} if self.whole is None else self.whole.model()

    def host(self, key: Key) -> torch.Tensor:
        """The host copy of one entry held whole on this rank, e.g.
        ``("optim", 0, 0, "exp_avg")``: optimizer 0, its first parameter."""
        if self.whole is None:
            raise KeyError(key)
        return self.whole.host(key)


def live_targets(snap: Snapshot, live: LiveState) -> dict[Key, torch.Tensor]:
    """The live local tensor for each entry of ``snap``; optimizer state made to
    match the snapshot's (dropped, or allocated where the snapshot has more)."""
    wanted: dict[tuple[int, int], dict[str, Entry]] = {}
    for e in snap.layout.entries:
        if e.key[0] == "optim":
            wanted.setdefault((e.key[1], e.key[2]), {})[e.key[3]] = e
    model = live.model_tensors()
    targets = {e.key: local(model[e.key]) for e in snap.layout.entries if e.key[0] == "model"}
    for i, opt in enumerate(live.optimizers):
        for j, p in enumerate(live.params(i)):
            saved = snap.optimizer_state[i][j]
            if saved is None:
                opt.state.pop(p, None)
                continue
            state, tensors = opt.state[p], wanted.get((i, j), {})
            for key in [k for k in state if k not in saved and k not in tensors]:
                del state[key]
            state.update(copy.deepcopy(saved))
            for key, e in tensors.items():
                now = state.get(key)
                if not (isinstance(now, torch.Tensor) and _fits(local(now), e)):
                    state[key] = now = blank(e)
                targets[e.key] = local(now)
    return targets


def small_state(state: dict[str, Any] | None) -> dict[str, Any] | None:
    if not state:
        return None
    return {k: copy.deepcopy(v) for k, v in state.items() if not isinstance(v, torch.Tensor)}


def _fits(t: torch.Tensor, e: Entry) -> bool:
    return t.shape == e.shape and t.dtype == e.dtype and t.device == e.device
