"""The last few batches, kept on the host by data position, for the probe to re-read.

The cache holds references to the batches the loader yielded (no copy: a DataLoader
yields fresh tensors every time; a loop that edits a batch in place after training on
it must not rely on the probe). It is bounded by a count and by bytes, oldest out first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from spikewatch.validation import check_int


@dataclass(frozen=True)
class CachedBatch:
    """One batch: its data position, the optimizer step it was trained at, the batch,
    and its samples' dataset indices (None when the loader's indices are unknown)."""

    position: int
    step: int
    batch: Any
    indices: tuple[int, ...] | None
    nbytes: int


class BatchCache:
    """Up to ``max_batches`` recent batches and ``max_bytes`` of their tensors.

    Example:
        >>> cache = BatchCache(max_batches=2)
        >>> for p in range(3):
        ...     cache.remember(p, step=p, batch=torch.zeros(4, 2), indices=(4 * p,))
        >>> [b.position for b in cache.entries()], cache.nbytes
        ([1, 2], 64)
    """

    def __init__(self, max_batches: int = 64, max_bytes: int = 512 * 2**20) -> None:
        self.max_batches = check_int("probe_cache_batches", max_batches, minimum=1)
        self.max_bytes = check_int("probe_cache_bytes", max_bytes, minimum=1)
        self._kept: OrderedDict[int, CachedBatch] = OrderedDict()
        self.nbytes = 0
        self.too_big = 0  # batches larger than max_bytes alone: never kept

    def __len__(self) -> int:
        return len(self._kept)

    def remember(
        self, position: int, *, step: int, batch: Any, indices: tuple[int, ...] | None = None
    ) -> None:
        """Keep ``batch`` (trained at optimizer ``step``), dropping the oldest past the caps."""
        size = batch_bytes(batch)
        if size > self.max_bytes:
            self.too_big += 1
            return
        old = self._kept.pop(position, None)  # the same position again: after a rollback
        if old is not None:
            self.nbytes -= old.nbytes
        self._kept[position] = CachedBatch(position, step, batch, indices, size)
        self.nbytes += size
        while len(self._kept) > self.max_batches or self.nbytes > self.max_bytes:
            _, dropped = self._kept.popitem(last=False)
            self.nbytes -= dropped.nbytes

    def entries(self) -> Iterator[CachedBatch]:
        """The kept batches, oldest first."""
        return iter(list(self._kept.values()))

    def clear(self) -> None:
        """Forget every batch."""
        self._kept.clear()
        self.nbytes = 0


def batch_bytes(batch: Any) -> int:
    """Bytes of the tensors in a batch (nested dicts, lists, tuples; others count 0).

    Example:
        >>> batch_bytes({"x": torch.zeros(2, 3), "y": [torch.zeros(5, dtype=torch.int64)], "id": 7})
        64
    """
    if isinstance(batch, torch.Tensor):
        return batch.numel() * batch.element_size()
    if isinstance(batch, dict):
        return sum(batch_bytes(v) for v in batch.values())
    if isinstance(batch, list | tuple):
        return sum(batch_bytes(v) for v in batch)
    return 0
