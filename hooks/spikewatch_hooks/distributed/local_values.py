"""A loss or grad norm given as a DTensor (FSDP2), as the plain tensor the guard reads.

``clip_grad_norm_`` over FSDP2 parameters returns the total norm as a replicated
DTensor; every rank holds the same value, so its local tensor is the value (no
collective). A ``Partial`` DTensor (a sum not yet reduced) is reduced with
``full_tensor()``: a collective, which every rank reaches because every rank calls
``guard.step`` at the same step.

Example:
    >>> import torch
    >>> plain_value(torch.tensor(2.0)), plain_value(1.5), plain_value(None)
    (tensor(2.), 1.5, None)
"""

from __future__ import annotations

from typing import TypeVar, cast

import torch
from torch.distributed.tensor import DTensor, Partial

_V = TypeVar("_V", bound=torch.Tensor | float | int | None)


def plain_value(value: _V) -> _V:
    """``value`` itself, or a DTensor's value as a plain tensor."""
    if not isinstance(value, DTensor):
        return value
    if any(isinstance(p, Partial) for p in value.placements):
        return cast("_V", value.full_tensor())
    return cast("_V", value.to_local())
