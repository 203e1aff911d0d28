"""Replicated (DDP) snapshot state split across ranks: each rank keeps 1/world_size.

Under DDP every rank holds the same parameters and optimizer state, so keeping a full
copy per rank per slot multiplies host memory by the world size for nothing. The
entries of a slot are flattened, per (dtype, device), into one virtual vector of ``n``
elements; rank ``r`` keeps elements ``[r * c, (r + 1) * c)`` with ``c = ceil(n / world)``
(the last rank's tail is padding, so every rank's part has the same size, as
``all_gather_into_tensor`` needs). Taking a snapshot copies only this rank's part: no
collective. A restore gathers the parts back, one ``all_gather_into_tensor`` per
(dtype, device) (gloo implements it on the CPU, NCCL on GPUs), preceded by one tiny
all-gather of the layout's fingerprint, so ranks whose layouts differ (state that is
not replicated after all) get a `SnapshotError` instead of silently mixed tensors.

Every rank must take and restore the same snapshots at the same steps: the guard's
lockstep does exactly that.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from spikewatch_hooks.distributed.lockstep import PeerFailureError
from spikewatch_hooks.state.snapshots.plan import Entry, Key, SnapshotError, local

# torch >= 2.13 names it all_gather_single; older releases all_gather_into_tensor.
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass
class _Part:
    """The entries of one (dtype, device) and this rank's slice of their concatenation."""

    dtype: torch.dtype
    device: torch.device
    entries: list[tuple[Entry, int]]  # (entry, offset in the virtual vector)
    chunk: int
    buffer: torch.Tensor | None = None


class SplitStore:
    """This rank's 1/world_size part of ``entries`` (see the module docstring).

    Args:
        entries: what the slot holds (the same on every rank).
        group: the process group the state is replicated over (None: the world).
    """

    def __init__(self, entries: Sequence[Entry], group: dist.ProcessGroup | None = None) -> None:
        self.entries, self.group = tuple(entries), group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        parts: dict[tuple[torch.dtype, torch.device], _Part] = {}
        for e in self.entries:
            part = parts.setdefault((e.dtype, e.device), _Part(e.dtype, e.device, [], 0))
            offset = sum(x.numel for x, _ in part.entries)
            part.entries.append((e, offset))
        for part in parts.values():
            total = sum(e.numel for e, _ in part.entries)
            part.chunk = -(-total // self.world)
            part.buffer = torch.empty(
                part.chunk, dtype=part.dtype, pin_memory=part.device.type == "cuda"
            )
        self.parts = list(parts.values())
        self.fingerprint = _fingerprint(self.entries)

    @property
    def nbytes(self) -> int:
        """Host bytes this rank holds."""
        return sum(p.chunk * p.dtype.itemsize for p in self.parts)

    @property
    def pinned(self) -> bool:
        """True if any part is pinned (GPU entries: asynchronous copies)."""
        return any(p.buffer is not None and p.buffer.is_pinned() for p in self.parts)

    def copy_from(self, live: Mapping[Key, torch.Tensor]) -> None:
        """Copy this rank's slice of every entry into its buffer (no collective)."""
        with torch.no_grad():
            for part in self.parts:
                assert part.buffer is not None  # allocated in __init__
                low, high = self.rank * part.chunk, (self.rank + 1) * part.chunk
                for e, offset in part.entries:
                    a, b = max(low, offset), min(high, offset + e.numel)
                    if a >= b:
                        continue
                    src = local(live[e.key]).reshape(-1)[a - offset : b - offset]
                    part.buffer[a - low : b - low].copy_(src, non_blocking=src.is_cuda)

    def copy_to(self, targets: Mapping[Key, torch.Tensor]) -> None:
        """Gather every rank's part and copy the whole of each entry into ``targets``.

        A collective: every rank of the group calls it for the same snapshot.
        """
        self._check_layouts()
        with torch.no_grad():
            for part in self.parts:
                assert part.buffer is not None
                mine = part.buffer.to(part.device, non_blocking=True)
                full = torch.empty(self.world * part.chunk, dtype=part.dtype, device=part.device)
                self._gather(full, mine)
                for e, offset in part.entries:
                    targets[e.key].copy_(full[offset : offset + e.numel].view(e.shape))

    def _check_layouts(self) -> None:
        check_same_layout(self.entries, self.group, self.fingerprint)

    def _gather(self, out: torch.Tensor, mine: torch.Tensor) -> None:
        _gather(out, mine, self.group)


def check_same_layout(
    entries: Sequence[Entry], group: dist.ProcessGroup | None, fingerprint: int | None = None
) -> None:
    """Raise `SnapshotError` on every rank unless every rank has the same layout."""
    mine_id = _fingerprint(entries) if fingerprint is None else fingerprint
    device = torch.device("cpu")
    if dist.get_backend(group) == "nccl":  # NCCL gathers device tensors only
        device = torch.device("cuda", torch.cuda.current_device())
    mine = torch.tensor([mine_id], dtype=torch.int64, device=device)
    every = torch.empty(dist.get_world_size(group), dtype=torch.int64, device=device)
    _gather(every, mine, group)
    if bool((every != mine).any()):
        raise SnapshotError(
            f"rank {dist.get_rank(group)}: the ranks' snapshot layouts differ (their "
            "parameters or optimizer state are not replicated), so the split ring cannot "
            "rebuild them; build the guard with snapshot_split=False"
        )


def _gather(out: torch.Tensor, mine: torch.Tensor, group: dist.ProcessGroup | None) -> None:
    try:
        _ALL_GATHER(out, mine, group=group)
    except (RuntimeError, dist.DistBackendError) as exc:
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        raise PeerFailureError(
            f"rank {rank}/{world}: the snapshot ring's all-gather failed "
            f"({str(exc).splitlines()[0]}); a peer rank probably died or stalled"
        ) from exc


def _fingerprint(entries: Sequence[Entry]) -> int:
    text = repr([(e.key, tuple(e.shape), str(e.dtype)) for e in entries]).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:7], "big")
