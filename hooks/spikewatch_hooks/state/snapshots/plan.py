"""Which tensors a snapshot copies: the ring's layout.

A snapshot copies only what can change between two snapshots:

- parameters some optimizer updates (in one of its param groups, ``requires_grad``);
  frozen ones (``requires_grad=False``, or in no param group) are left out unless
  ``include_frozen`` (a LoRA model's backbone would otherwise dominate every slot);
- the model's persistent buffers (BatchNorm running statistics change every step);
- every tensor in every optimizer's per-parameter state.

Under FSDP2 (``fully_shard``) parameters and optimizer state are DTensors: the layout
holds each rank's *local shard* (``DTensor.to_local()``, which shares the parameter's
storage, so an in-place copy restores the sharded parameter itself). Anything else the
ring cannot copy faithfully is refused with a `SnapshotError` naming it and the fix.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    >>> model[0].requires_grad_(False)  # doctest: +ELLIPSIS
    Linear(...)
    >>> opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    >>> live = LiveState(model, [opt])
    >>> [e.key for e in plan(live.tensors()).entries]
    [('model', '1.weight'), ('model', '1.bias')]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter

from spikewatch.errors import ConfigError

#: ("model", name) or ("optim", optimizer index, parameter index, state key).
Key = tuple[Any, ...]


class SnapshotError(ConfigError):
    """The snapshot ring cannot copy this model or state; the message says why and the fix."""


@dataclass(frozen=True, slots=True)
class DTensorSpec:
    """What rebuilding a missing DTensor optimizer state needs (mesh, placements, size)."""

    mesh: Any
    placements: tuple[Any, ...]
    shape: torch.Size
    stride: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Entry:
    """One tensor a snapshot copies: its key and the local (this rank's) shape."""

    key: Key
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device
    spec: DTensorSpec | None = None

    @property
    def numel(self) -> int:
        """Elements of the local tensor."""
        return int(self.shape.numel())

    @property
    def nbytes(self) -> int:
        """Bytes of the local tensor."""
        return self.numel * self.dtype.itemsize


@dataclass(frozen=True, slots=True)
class Layout:
    """The entries of one snapshot, in a fixed order (the same on every rank under DDP)."""

    entries: tuple[Entry, ...]

    @property
    def signature(self) -> tuple[tuple[Any, ...], ...]:
        """What must match for a slot's buffers to be reused."""
        return tuple((e.key, tuple(e.shape), e.dtype, e.device) for e in self.entries)

    @property
    def nbytes(self) -> int:
        """Bytes of one full copy of every entry."""
        return sum(e.nbytes for e in self.entries)

    @property
    def sharded(self) -> bool:
        """True if any entry is a DTensor shard (FSDP2): each rank holds its own part."""
        return any(e.spec is not None for e in self.entries)


class LiveState:
    """The live tensors of a model and its optimizers, by `Key`.

    Args:
        model: the module being trained (DDP- or FSDP2-wrapped alike).
        optimizers: every optimizer that updates it.
        include_frozen: also copy parameters no optimizer updates.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizers: Sequence[torch.optim.Optimizer],
        *,
        include_frozen: bool = False,
    ) -> None:
        self.model, self.optimizers, self.include_frozen = model, list(optimizers), include_frozen

    def params(self, index: int) -> list[torch.Tensor]:
        """Optimizer ``index``'s parameters, in param-group order."""
        return [p for g in self.optimizers[index].param_groups for p in g["params"]]

    def model_tensors(self) -> dict[Key, torch.Tensor]:
        """Every parameter and persistent buffer of the model, frozen or not."""
        found: dict[Key, torch.Tensor] = {}
        found.update((("model", name), p) for name, p in self.model.named_parameters())
        found.update((("model", name), buf) for name, buf in _persistent_buffers(self.model))
        return found

    def tensors(self) -> dict[Key, torch.Tensor]:
        """Every live tensor a snapshot copies (DTensors as they are)."""
        updated = {
            id(p) for i in range(len(self.optimizers)) for p in self.params(i) if p.requires_grad
        }
        found: dict[Key, torch.Tensor] = {}
        for name, p in self.model.named_parameters():
            if self.include_frozen or id(p) in updated:
                found[("model", name)] = p
        for name, buf in _persistent_buffers(self.model):
            found[("model", name)] = buf
        for i, opt in enumerate(self.optimizers):
            for j, q in enumerate(self.params(i)):
                for key, value in opt.state.get(q, {}).items():
                    if isinstance(value, torch.Tensor):
                        found[("optim", i, j, key)] = value
        return found


def plan(tensors: Mapping[Key, torch.Tensor]) -> Layout:
    """The layout of ``tensors``; a `SnapshotError` for one the ring cannot copy."""
    return Layout(tuple(_entry(key, t) for key, t in tensors.items()))


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t``, sharing its storage (a DTensor's local shard)."""
    return (t.to_local() if isinstance(t, DTensor) else t).detach()


def _entry(key: Key, t: torch.Tensor) -> Entry:
    _check(key, t)
    spec = None
    if isinstance(t, DTensor):
        spec = DTensorSpec(t.device_mesh, tuple(t.placements), t.shape, t.stride())
    part = local(t)
    _check(key, part)
    return Entry(key, part.shape, part.dtype, part.device, spec)


def _check(key: Key, t: torch.Tensor) -> None:
    """Refuse what an in-place copy into a dense host buffer would not restore."""
    where = _describe(key)
    if isinstance(t, (UninitializedParameter, UninitializedBuffer)):
        raise SnapshotError(
            f"{where} is not initialised yet (a lazy module): the snapshot ring cannot "
            "copy it; run one forward pass before building the guard"
        )
    if not (isinstance(t, DTensor) or type(t) in (torch.Tensor, nn.Parameter, nn.Buffer)):
        raise SnapshotError(
            f"{where} is a {type(t).__name__}, a tensor subclass the snapshot ring cannot "
            "copy in place (it copies plain tensors and FSDP2 DTensor shards); keep it "
            "out of the optimizer, or convert it to a plain tensor before training"
        )
    if t.layout != torch.strided:
        raise SnapshotError(
            f"{where} has layout {t.layout}: the snapshot ring copies dense tensors only; "
            "use dense parameters and optimizer state (e.g. t.to_dense())"
        )
    if t.is_meta:
        raise SnapshotError(
            f"{where} is on the meta device (no data to snapshot); materialise the model "
            "(to_empty() and load or initialise its weights) before building the guard"
        )


def _describe(key: Key) -> str:
    if key[0] == "model":
        return f"model tensor {key[1]!r}"
    return f"state {key[3]!r} of parameter {key[2]} of optimizer {key[1]}"


def _persistent_buffers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The buffers ``state_dict`` holds (non-persistent ones are rebuilt, not trained)."""
    found: list[tuple[str, torch.Tensor]] = []
    seen: set[int] = set()
    for prefix, module in model.named_modules():
        skip = module._non_persistent_buffers_set
        for name, buf in module._buffers.items():
            if buf is None or name in skip or id(buf) in seen:
                continue
            seen.add(id(buf))
            found.append((f"{prefix}.{name}" if prefix else name, buf))
    return found
