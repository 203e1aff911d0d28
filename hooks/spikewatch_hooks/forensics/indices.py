"""Which dataset indices each batch of a DataLoader holds, without changing its order.

A map-style DataLoader draws every batch's indices from its batch sampler. While
`guard.batches` iterates such a loader, `recording` puts a pass-through wrapper in front
of that sampler: the same indices, drawn in the same order with the same random
numbers (so the data order is bit-identical), each list also noted in a queue. The
loader hands batches out in the order their indices were drawn (its default
``in_order=True``, also with worker processes), so the n-th batch yielded holds the
n-th list drawn.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch.utils.data import DataLoader, IterableDataset


class _Recording:
    """Iterates the wrapped batch sampler, noting each list of indices it yields."""

    def __init__(self, inner: Any, drawn: deque[tuple[int, ...]]) -> None:
        self.inner, self.drawn = inner, drawn

    def __iter__(self) -> Iterator[Any]:
        for indices in self.inner:
            self.drawn.append(tuple(int(i) for i in indices))
            yield indices

    def __len__(self) -> int:
        return len(self.inner)

    def __getattr__(self, name: str) -> Any:  # sampler, batch_size, drop_last, set_epoch
        return getattr(self.inner, name)


class SampleIndices:
    """The dataset indices of the batches a loader yields, in order (`next_batch`)."""

    def __init__(self) -> None:
        self.drawn: deque[tuple[int, ...]] = deque()

    def next_batch(self) -> tuple[int, ...] | None:
        """The indices of the batch the loader just yielded (None when not recorded)."""
        return self.drawn.popleft() if self.drawn else None


def recordable(loader: object) -> bool:
    """Whether `recording` can tell ``loader``'s indices: a map-style DataLoader with a
    batch sampler, in-order delivery."""
    return (
        isinstance(loader, DataLoader)
        and not isinstance(loader.dataset, IterableDataset)
        and loader.batch_sampler is not None
        and getattr(loader, "in_order", True)
    )


@contextmanager
def recording(loader: object) -> Iterator[SampleIndices | None]:
    """Record ``loader``'s batch indices while the block runs (None: not recordable).

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader
        >>> data = torch.arange(10.0)
        >>> loader = DataLoader(data, batch_size=4, shuffle=True,
        ...                     generator=torch.Generator().manual_seed(0))
        >>> with recording(loader) as seen:
        ...     got = [(batch.long().tolist(), list(seen.next_batch())) for batch in loader]
        >>> all(b == i for b, i in got), type(loader.batch_sampler).__name__
        (True, 'BatchSampler')
    """
    if not recordable(loader):
        yield None
        return
    assert isinstance(loader, DataLoader)
    seen = SampleIndices()
    original = loader.batch_sampler
    # DataLoader forbids setting batch_sampler after construction (it would desync its
    # length); the wrapper keeps the length and draws exactly what the original draws.
    object.__setattr__(loader, "batch_sampler", _Recording(original, seen.drawn))
    try:
        yield seen
    finally:
        object.__setattr__(loader, "batch_sampler", original)
