"""Which dataset indices each batch of a DataLoader holds, without changing its order.

A map-style DataLoader draws every batch's indices from its batch sampler. `attach`
puts a pass-through wrapper in front of that sampler: the same indices, drawn in the
same order with the same random numbers (so the data order is bit-identical), each
list also noted in the log of the pass (one pass per ``iter(loader)``: an epoch). The
loader hands batches out in the order their indices were drawn (its default
``in_order=True``, also with worker processes), so the n-th batch a pass yields holds
the n-th list drawn in it. A new pass starts a new log: lists drawn ahead by a pass
that was left unfinished never reach the next one. `recording` attaches for the
duration of a block (`guard.batches`); the framework callbacks attach at train start
and `detach` at train end.

What goes wrong safely: a pass that does not draw through the wrapper (an iterator
created before `attach`) notes nothing, and its batches' indices are None (unknown),
never another batch's.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch.utils.data import DataLoader, IterableDataset


class PassLog:
    """The index lists one pass over the loader drew, oldest first."""

    def __init__(self, skip: int = 0) -> None:
        self.drawn: deque[tuple[int, ...]] = deque()
        self.skip = skip  # lists a resumed loader draws but never yields

    def note(self, indices: Any) -> None:
        """One list drawn from the batch sampler."""
        if self.skip > 0:
            self.skip -= 1
            return
        self.drawn.append(tuple(int(i) for i in indices))

    def next_batch(self) -> tuple[int, ...] | None:
        """The indices of the batch the pass just yielded (None when not recorded)."""
        return self.drawn.popleft() if self.drawn else None


class SampleIndices:
    """The logs of a loader's passes; `next_batch` reads the newest pass's."""

    def __init__(self) -> None:
        self.log = PassLog()
        self.passes = 0  # passes begun (two per multi-worker iterator: it resets once)
        self._skip = 0

    def begin(self) -> PassLog:
        """A new pass over the loader: a fresh log (the previous pass is over)."""
        self.log, self._skip = PassLog(self._skip), 0
        self.passes += 1
        return self.log

    def skip_next_pass(self, batches: int) -> None:
        """The next pass draws ``batches`` lists it never yields (a resumed epoch's
        loader, accelerate's ``skip_first_batches``): leave them out of its log."""
        self._skip = batches

    def next_batch(self) -> tuple[int, ...] | None:
        """The indices of the batch the loader just yielded (None when not recorded)."""
        return self.log.next_batch()


class _Recording:
    """The wrapped batch sampler: each ``iter`` is a pass, noted in its own log."""

    def __init__(self, inner: Any, seen: SampleIndices) -> None:
        self.inner, self.seen = inner, seen

    def __iter__(self) -> Iterator[Any]:
        # Begun eagerly (not in a generator body): DataLoader iterators call iter() on
        # the sampler when they are created, so the pass exists before its first batch.
        return _Draws(iter(self.inner), self.seen.begin())

    def __len__(self) -> int:
        return len(self.inner)

    def __getattr__(self, name: str) -> Any:  # sampler, batch_size, drop_last, set_epoch
        if name in ("inner", "seen"):  # not set yet (copy, unpickle)
            raise AttributeError(name)
        return getattr(self.inner, name)


class _Draws:
    """One pass's iterator over the wrapped sampler."""

    def __init__(self, inner: Iterator[Any], log: PassLog) -> None:
        self.inner, self.log = inner, log

    def __iter__(self) -> _Draws:
        return self

    def __next__(self) -> Any:
        indices = next(self.inner)
        self.log.note(indices)
        return indices


def recordable(loader: object) -> bool:
    """Whether `recording` can tell ``loader``'s indices: a map-style DataLoader with a
    batch sampler, in-order delivery."""
    return (
        isinstance(loader, DataLoader)
        and not isinstance(loader.dataset, IterableDataset)
        and loader.batch_sampler is not None
        and getattr(loader, "in_order", True)
    )


def attach(loader: object) -> SampleIndices | None:
    """Record ``loader``'s batch indices from now on (None: not recordable).

    Example:
        >>> import torch
        >>> loader = DataLoader(torch.arange(6.0), batch_size=4)
        >>> seen = attach(loader)
        >>> [(b.long().tolist(), seen.next_batch()) for b in loader]
        [([0, 1, 2, 3], (0, 1, 2, 3)), ([4, 5], (4, 5))]
        >>> detach(loader); type(loader.batch_sampler).__name__
        'BatchSampler'
    """
    if not recordable(loader):
        return None
    assert isinstance(loader, DataLoader)
    current = loader.batch_sampler
    if isinstance(current, _Recording):  # attached already: one log for both
        return current.seen
    seen = SampleIndices()
    # DataLoader forbids setting batch_sampler after construction (it would desync its
    # length); the wrapper keeps the length and draws exactly what the original draws.
    object.__setattr__(loader, "batch_sampler", _Recording(current, seen))
    return seen


def detach(loader: object) -> None:
    """Put ``loader``'s own batch sampler back (nothing when `attach` did not wrap it)."""
    current = getattr(loader, "batch_sampler", None)
    if isinstance(current, _Recording):
        object.__setattr__(loader, "batch_sampler", current.inner)


def draws_through(batch_sampler: object, seen: SampleIndices) -> bool:
    """Whether ``batch_sampler`` draws through the recorder of ``seen``, itself or
    inside wrappers that keep theirs as ``.batch_sampler`` (accelerate's
    ``SkipBatchSampler`` and ``BatchSamplerShard``)."""
    for _ in range(8):  # wrappers nest a few deep; a cycle must not hang training
        if isinstance(batch_sampler, _Recording):
            return batch_sampler.seen is seen
        batch_sampler = getattr(batch_sampler, "batch_sampler", None)
        if batch_sampler is None:
            return False
    return False


@contextmanager
def recording(loader: object) -> Iterator[SampleIndices | None]:
    """Record ``loader``'s batch indices while the block runs (None: not recordable).

    Example:
        >>> import torch
        >>> data = torch.arange(10.0)
        >>> loader = DataLoader(data, batch_size=4, shuffle=True,
        ...                     generator=torch.Generator().manual_seed(0))
        >>> with recording(loader) as seen:
        ...     got = [(batch.long().tolist(), list(seen.next_batch())) for batch in loader]
        >>> all(b == i for b, i in got), type(loader.batch_sampler).__name__
        (True, 'BatchSampler')
    """
    wrapped = recordable(loader) and not isinstance(
        getattr(loader, "batch_sampler", None), _Recording
    )
    seen = attach(loader)
    try:
        yield seen
    finally:
        if wrapped:
            detach(loader)
