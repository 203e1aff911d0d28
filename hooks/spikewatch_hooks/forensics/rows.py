"""Drop quarantined samples from a batch whose rows are its samples."""

from __future__ import annotations

from collections import UserDict
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import torch


def unquarantined(
    batch: Any,
    indices: tuple[int, ...],
    quarantined: Collection[int],
    count: Callable[[str, int], None],
) -> tuple[Any, tuple[int, ...] | None]:
    """``batch`` and ``indices`` without the quarantined samples; ``(None, None)`` when
    the whole batch must be skipped (all quarantined, or no per-sample rows to drop).

    ``count(name, n)`` adds to the guard's counters (``quarantined_samples_skipped``,
    ``quarantined_batches_skipped``).

    Example:
        >>> counts = {}
        >>> def count(name, n=1): counts[name] = counts.get(name, 0) + n
        >>> batch, kept = unquarantined(torch.tensor([[1], [2], [3]]), (7, 8, 9), {8}, count)
        >>> batch.tolist(), kept, counts
        ([[1], [3]], (7, 9), {'quarantined_samples_skipped': 1})
    """
    keep = [i not in quarantined for i in indices]
    if all(keep):
        return batch, indices
    count("quarantined_samples_skipped", keep.count(False))
    kept = drop_rows(batch, keep) if any(keep) else None
    if kept is None:
        count("quarantined_batches_skipped", 1)
        return None, None
    return kept, tuple(i for i, k in zip(indices, keep, strict=True) if k)


def drop_rows(batch: Any, keep: Sequence[bool]) -> Any:
    """``batch`` with only the rows where ``keep`` is True, or None when no part of it
    has one row per sample (then the whole batch must be skipped instead).

    Tensors with ``len(keep)`` rows, and lists of that length, are filtered; mappings
    (dicts, a tokenizer's ``BatchEncoding``), tuples and lists of such parts are walked;
    anything else is kept as it is.

    Example:
        >>> batch = {"x": torch.arange(6).reshape(3, 2), "y": torch.tensor([0, 1, 2]), "n": 3}
        >>> out = drop_rows(batch, [True, False, True])
        >>> out["x"].tolist(), out["y"].tolist(), out["n"]
        ([[0, 1], [4, 5]], [0, 2], 3)
        >>> drop_rows(torch.zeros(2, 5), [True, False, True]) is None
        True
    """
    found = [False]
    out = _walk(batch, list(keep), found)
    return out if found[0] else None


def _walk(part: Any, keep: list[bool], found: list[bool]) -> Any:
    n = len(keep)
    if isinstance(part, torch.Tensor):
        if part.dim() > 0 and part.shape[0] == n:
            found[0] = True
            return part[torch.tensor(keep, device=part.device)]
        return part
    if isinstance(part, Mapping):
        fields = {k: _walk(v, keep, found) for k, v in part.items()}
        # dict and UserDict subclasses (BatchEncoding) rebuild from a dict; others cannot
        # be relied on to, and a plain dict is what a collate function hands over anyway.
        return type(part)(fields) if isinstance(part, dict | UserDict) else fields
    if isinstance(part, tuple):
        walked = [_walk(v, keep, found) for v in part]
        return type(part)(*walked) if hasattr(part, "_fields") else tuple(walked)
    if isinstance(part, list):
        if len(part) == n and not any(isinstance(v, torch.Tensor | dict | list) for v in part):
            found[0] = True
            return [v for v, k in zip(part, keep, strict=True) if k]
        return [_walk(v, keep, found) for v in part]
    return part
