"""Loading a distributed checkpoint: verify every file, load into staging, then apply.

Order, every step agreed by all ranks (`collective.together`), so a failure on one rank
makes every rank raise and none is left in a collective:

1. read and verify ``guard.json`` (the manifest);
2. each rank verifies its share of the files against the manifest (`manifest.share`);
3. read the small files (scheduler, RNG), checked against the manifest again;
4. DCP loads model and optimizer into *staging* tensors: fresh CPU tensors (DTensors:
   fresh ones with the same placement), never the live parameters;
5. only then are the live model, optimizer, scheduler, RNG and guard overwritten.

So a damaged, missing or unreadable file, or a read failing half way, leaves the live
objects exactly as they were. The price: host memory for one copy of the model and
optimizer state (of this rank's shard) while loading.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.tensor import DTensor

from spikewatch_hooks.distributed.collective import dcp_call, group_of, together
from spikewatch_hooks.distributed.files import (
    check_small_states,
    load_small_states,
    read_header,
    read_verified,
)
from spikewatch_hooks.distributed.manifest import GUARD_FILE, share, verify
from spikewatch_hooks.state.rng import set_rng_state

if TYPE_CHECKING:
    from spikewatch_hooks.core.engine import GuardEngine

log = logging.getLogger(__name__)


def restore(engine: GuardEngine, source: Path) -> dict[str, Any]:
    """Verify the folder at ``source``, then load it into the engine's live objects;
    return the guard state. See the module docstring for the order of the steps."""
    group, rank, world = group_of(engine)
    header = together(group, lambda: read_header(source), f"read {source / GUARD_FILE}")
    files: dict[str, dict[str, Any]] = header["files"]
    together(group, lambda: verify(source, files, share(files, rank, world)), f"verify {source}")
    small = together(group, lambda: _read_small(engine, source, files, rank), f"read {source}")
    staged = _load_staged(engine, source, group)
    guard: dict[str, Any] = header["guard"]
    together(group, lambda: _apply(engine, staged, small, guard), f"load {source}")
    if small["derived"]:
        log.info("spikewatch: %s has no RNG state for rank %d; derived from rank 0's", source, rank)
    return guard


def _read_small(
    engine: GuardEngine, source: Path, files: dict[str, dict[str, Any]], rank: int
) -> dict[str, Any]:
    """The scheduler state (if both sides have one) and this rank's RNG state (rank 0's
    where this rank has none: more ranks than were saved)."""
    scheduler = None
    if (engine.schedulers or engine.updates.extras) and "scheduler.pt" in files:
        scheduler = read_verified(source / "scheduler.pt", files["scheduler.pt"])
        check_small_states(engine, scheduler)  # before any live object is touched
    own = f"rng-rank{rank}.pt"
    name = own if own in files else "rng-rank0.pt"
    rng = read_verified(source / name, files[name])
    return {"scheduler": scheduler, "rng": rng, "derived": name != own, "rank": rank}


def _load_staged(
    engine: GuardEngine, source: Path, group: dist.ProcessGroup | None
) -> dict[str, Any]:
    """DCP-load model and optimizer into fresh tensors shaped like the live ones."""
    # get_state_dict fills an empty state with zeros
    fresh = [not o.state for o in engine.optimizers]
    model_sd, optim_sd = get_state_dict(engine.model, tuple(engine.optimizers))
    staged = {"model": _blank(model_sd), "optimizer": _blank(optim_sd)}
    for opt, was_fresh in zip(engine.optimizers, fresh, strict=True):
        if was_fresh:  # the zeros are not needed: set_state_dict initialises the state
            opt.state.clear()
    dcp_call(source, lambda: dcp_load(staged, checkpoint_id=source, process_group=group))
    return staged


def _blank(value: Any) -> Any:
    """``value`` with every tensor replaced by an uninitialised one of its shape (DCP
    fills them all: its planner refuses a checkpoint that lacks one)."""
    if isinstance(value, DTensor):
        return torch.empty_like(value)  # same mesh and placement: DCP reshards into it
    if isinstance(value, torch.Tensor):
        return torch.empty_like(value, device="cpu")
    if isinstance(value, dict):
        return {key: _blank(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_blank(item) for item in value]
    return value


def _apply(
    engine: GuardEngine, staged: dict[str, Any], small: dict[str, Any], guard: dict[str, Any]
) -> None:
    """Overwrite the live objects with verified, fully loaded state."""
    set_state_dict(
        engine.model,
        tuple(engine.optimizers),
        model_state_dict=staged["model"],
        optim_state_dict=staged["optimizer"],
    )
    if small["scheduler"] is not None:
        load_small_states(engine, small["scheduler"])
    set_rng_state(small["rng"])
    if small["derived"]:
        # Rank 0's generators, then a seed drawn from them and offset by the rank, so
        # the new ranks draw different numbers, reproducibly.
        seed = int(torch.randint(0, 2**62, (1,)).item()) + small["rank"]
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
    engine.load_guard_state(guard)
