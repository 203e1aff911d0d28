"""Preallocated host buffers holding whole copies of a snapshot's entries.

One flat buffer per dtype, allocated once per slot and reused: ``copy_`` into
preallocated memory runs at memory bandwidth where ``clone()`` or ``torch.save`` do not.
Buffers of entries on a GPU are pinned and filled with ``non_blocking`` copies, so
taking a snapshot never waits for the device (the ring records a CUDA event instead).

Example:
    >>> import torch
    >>> from spikewatch_hooks.state.snapshots.plan import plan
    >>> live = {("model", "w"): torch.ones(2, 3), ("model", "b"): torch.zeros(3)}
    >>> store = HostStore(plan(live).entries)
    >>> store.copy_from(live)
    >>> store.nbytes
    36
    >>> target = {k: torch.full_like(v, 7.0) for k, v in live.items()}
    >>> store.copy_to(target)
    >>> bool(torch.equal(target[("model", "w")], live[("model", "w")]))
    True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from spikewatch_hooks.state.snapshots.plan import Entry, Key, local


class HostStore:
    """Whole host copies of ``entries``: one flat (pinned for GPU entries) buffer per dtype."""

    def __init__(self, entries: Sequence[Entry]) -> None:
        self.entries = tuple(entries)
        sizes: dict[torch.dtype, int] = {}
        pinned: dict[torch.dtype, bool] = {}
        self._where: list[tuple[Entry, torch.dtype, int]] = []
        for e in self.entries:
            self._where.append((e, e.dtype, sizes.get(e.dtype, 0)))
            sizes[e.dtype] = sizes.get(e.dtype, 0) + e.numel
            pinned[e.dtype] = pinned.get(e.dtype, False) or e.device.type == "cuda"
        self.buffers = {
            dtype: torch.empty(n, dtype=dtype, device="cpu", pin_memory=pinned[dtype])
            for dtype, n in sizes.items()
        }
        # Views made once: making one costs more than copying a small tensor.
        self._views = [(e, self.view(e, d, o)) for e, d, o in self._where]

    @property
    def nbytes(self) -> int:
        """Host bytes held."""
        return sum(b.numel() * b.element_size() for b in self.buffers.values())

    @property
    def pinned(self) -> bool:
        """True if any buffer is pinned (a GPU entry: the copies are asynchronous)."""
        return any(b.is_pinned() for b in self.buffers.values())

    def view(self, entry: Entry, dtype: torch.dtype, offset: int) -> torch.Tensor:
        """The part of the flat buffer that holds ``entry``, shaped like it."""
        return self.buffers[dtype][offset : offset + entry.numel].view(entry.shape)

    def model(self) -> dict[str, torch.Tensor]:
        """The host copies of the model's entries, by tensor name."""
        return {e.key[1]: v for e, v in self._views if e.key[0] == "model"}

    def host(self, key: Key) -> torch.Tensor:
        """The host copy of the entry ``key``."""
        for e, v in self._views:
            if e.key == key:
                return v
        raise KeyError(key)

    def copy_from(self, live: Mapping[Key, torch.Tensor]) -> None:
        """Copy every entry's live local tensor into its buffer (asynchronous from a GPU)."""
        with torch.no_grad():
            for e, v in self._views:
                src = local(live[e.key])
                v.copy_(src, non_blocking=src.is_cuda)

    def copy_to(self, targets: Mapping[Key, torch.Tensor]) -> None:
        """Copy every buffer back into ``targets`` (local tensors), in place."""
        with torch.no_grad():
            for e, v in self._views:
                dst = targets[e.key]
                dst.copy_(v, non_blocking=dst.is_cuda)
