"""Drop quarantined samples from a batch whose rows are its samples."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def drop_rows(batch: Any, keep: Sequence[bool]) -> Any:
    """``batch`` with only the rows where ``keep`` is True, or None when no part of it
    has one row per sample (then the whole batch must be skipped instead).

    Tensors with ``len(keep)`` rows, and lists of that length, are filtered; dicts,
    tuples and lists of such parts are walked; anything else is kept as it is.

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
    if isinstance(part, dict):
        return type(part)({k: _walk(v, keep, found) for k, v in part.items()})
    if isinstance(part, tuple):
        walked = [_walk(v, keep, found) for v in part]
        return type(part)(*walked) if hasattr(part, "_fields") else tuple(walked)
    if isinstance(part, list):
        if len(part) == n and not any(isinstance(v, torch.Tensor | dict | list) for v in part):
            found[0] = True
            return [v for v, k in zip(part, keep, strict=True) if k]
        return [_walk(v, keep, found) for v in part]
    return part
