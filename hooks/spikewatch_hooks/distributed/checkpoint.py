"""Sharded disk checkpoints through ``torch.distributed.checkpoint`` (DCP).

A checkpoint is a folder::

    .metadata, __0_0.distcp, ...  model and optimizer (DCP: each rank writes its share)
    rng-rank0.pt, rng-rank1.pt    each rank's RNG states (``torch.save``)
    scheduler.pt                  the LR scheduler's state (rank 0; identical on every rank)
    guard.json                    step, next data position, skip ledger, detector state,
                                  counters, lr scale, world size, the sha256 of
                                  scheduler.pt, and the sha256 of all that

Model and optimizer go through ``get_state_dict``/``set_state_dict``, which name every
tensor by its canonical name (no DDP ``module.`` prefix, FSDP shards as DTensors), so a
checkpoint saved on N ranks loads on M ranks, or in one process with no process group.
The guard's own state is identical on every rank (lockstep), so rank 0 writes it once.

Why a staging folder: everything is written into ``.<name>.partial`` beside the target,
``guard.json`` last; then rank 0 swaps it in (target -> ``.<name>.old``, partial ->
target, old removed), so a crash leaves the previous checkpoint or the new one.

Example (one process, no process group):
    >>> import tempfile, torch
    >>> from spikewatch_hooks.guard import SpikeGuard
    >>> model = torch.nn.Linear(2, 1)
    >>> guard = SpikeGuard(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     done = save_distributed(guard.engine, f"{tmp}/ckpt")
    ...     sorted(p.name for p in done.result().iterdir())
    ...     load_distributed(guard.engine, done.result())["step"]
    ['.metadata', '__0_0.distcp', 'guard.json', 'rng-rank0.pt']
    0
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import warnings
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import async_save as dcp_async_save
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from spikewatch_hooks.distributed.files import (
    FORMAT,
    GUARD_FILE,
    atomic_write,
    canonical,
    fsync_dir,
    read_header,
    read_verified,
    sha256,
    torch_bytes,
)
from spikewatch_hooks.state.checkpoint import CheckpointError
from spikewatch_hooks.state.rng import rng_state, set_rng_state

if TYPE_CHECKING:  # the engine calls these functions: no import back up at run time
    from spikewatch_hooks.core.engine import GuardEngine

log = logging.getLogger(__name__)
_T = TypeVar("_T")


@dataclass
class _Saves:
    pending: Future[Path] | None = None  # the save in flight; the next one waits for it
    group: dist.ProcessGroup | None = None  # async saves' own gloo group (see _async_group)


# Per-engine bookkeeping of saves in flight, held weakly: it ends with its engine.
_SAVES: weakref.WeakKeyDictionary[GuardEngine, _Saves] = weakref.WeakKeyDictionary()


def save_distributed(
    engine: GuardEngine, directory: str | os.PathLike[str], *, async_save: bool = False
) -> Future[Path]:
    """Write the engine's training state as a DCP checkpoint folder at ``directory``.

    Under ``torch.distributed`` every rank calls it at the same step. A save in flight
    is waited for first. Returns a future of the folder: already done unless
    ``async_save``, in which case the state is copied to CPU memory now (training may
    go on at once) and written in a background thread; ``result()`` raises a
    `CheckpointError` if that write failed. The folder is replaced as a whole.
    """
    target = Path(directory)
    saves = _SAVES.setdefault(engine, _Saves())
    _wait(saves)
    group, rank, world = _group(engine)
    staging = target.with_name(f".{target.name}.partial")
    _together(group, lambda: _prepare(target, staging) if rank == 0 else None, "prepare")
    rng_file, rng = staging / f"rng-rank{rank}.pt", torch_bytes(rng_state())
    _together(group, lambda: atomic_write(rng_file, rng), f"write {rng_file}")
    # Rank 0's small files are serialised now: training may change them during an async save.
    header = _guard_header(engine, world) if rank == 0 else None
    fresh = not engine.optimizer.state  # get_state_dict fills an empty state with zeros
    model_sd, optim_sd = get_state_dict(engine.model, engine.optimizer)
    state = {"model": model_sd, "optimizer": optim_sd}
    if not async_save:
        _dcp_call(target, lambda: dcp_save(state, checkpoint_id=staging, process_group=group))
        _forget_state(engine, fresh)
        _together(group, lambda: _commit(staging, target, header), f"commit {target}")
        done: Future[Path] = Future()
        done.set_result(target)
        return done
    writers = _async_group(saves, group)
    upload = _dcp_call(
        target, lambda: dcp_async_save(state, checkpoint_id=staging, process_group=writers)
    )
    _forget_state(engine, fresh)  # staged: the state was copied before async_save returned
    # A future, or (staging in the background) an AsyncSaveResponse holding one.
    uploaded = cast("Future[Any]", getattr(upload, "upload_completion", upload))
    saves.pending = _finish_later(uploaded, writers, staging, target, header)
    return saves.pending


def load_distributed(engine: GuardEngine, directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a `save_distributed` folder into the engine's live objects; return the guard
    state (``step``, ``next_position``, ``ledger``, ...).

    Works on the world size it was saved on, on another one, and in one process with no
    process group. A rank with no RNG file of its own (more ranks than were saved)
    derives its generators from rank 0's.
    """
    source = Path(directory)
    wait_for_save(engine)
    header = read_header(source)
    group, rank, _ = _group(engine)
    model_sd, optim_sd = get_state_dict(engine.model, engine.optimizer)
    state: dict[str, Any] = {"model": model_sd, "optimizer": optim_sd}
    _dcp_call(source, lambda: dcp_load(state, checkpoint_id=source, process_group=group))
    set_state_dict(
        engine.model,
        engine.optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
    )
    digest = header["scheduler_sha256"]
    if engine.scheduler is not None and digest is not None:
        engine.scheduler.load_state_dict(read_verified(source / "scheduler.pt", digest))
    _load_rng(source, rank)
    guard: dict[str, Any] = header["guard"]
    engine.load_guard_state(guard)
    return guard


def wait_for_save(engine: GuardEngine) -> None:
    """Block until the engine's save in flight, if any, is written (or failed).

    Call it on every rank before ``destroy_process_group`` after an async save, so no
    background write is cut off; `save_distributed` and `load_distributed` call it too.
    """
    saves = _SAVES.get(engine)
    if saves is not None:
        _wait(saves)


# -- saving ----------------------------------------------------------------------------
def _prepare(target: Path, staging: Path) -> None:
    """Rank 0: refuse to replace a folder that is not a checkpoint; clear old staging."""
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{target} is a file; pass a folder for a distributed checkpoint")
    if target.is_dir() and any(target.iterdir()) and not (target / GUARD_FILE).exists():
        raise CheckpointError(
            f"{target} holds files but no {GUARD_FILE}, so it is not a spikewatch "
            "checkpoint and would be replaced as a whole; pass a new or empty folder"
        )
    shutil.rmtree(staging, ignore_errors=True)  # a crashed save's leftovers
    staging.mkdir(parents=True)


def _guard_header(engine: GuardEngine, world: int) -> dict[str, Any]:
    scheduler = None if engine.scheduler is None else torch_bytes(engine.scheduler.state_dict())
    body = {
        "format": FORMAT,
        "world_size": world,
        "torch": torch.__version__,
        "guard": engine.guard_state(),
        "scheduler_sha256": None if scheduler is None else sha256(scheduler),
    }
    body = json.loads(json.dumps(body))  # plain JSON types, so the digest survives reading
    return {"body": body, "scheduler": scheduler}


def _commit(staging: Path, target: Path, header: dict[str, Any] | None) -> None:
    """Rank 0, once every rank's files are written: guard.json last, then the swap."""
    if header is None:
        return
    if header["scheduler"] is not None:
        atomic_write(staging / "scheduler.pt", header["scheduler"])
    body = header["body"]
    text = json.dumps({"sha256": sha256(canonical(body)), "checkpoint": body}, indent=1)
    atomic_write(staging / GUARD_FILE, text.encode())
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def _finish_later(
    upload: Future[Any],
    writers: dist.ProcessGroup | None,
    staging: Path,
    target: Path,
    header: dict[str, Any] | None,
) -> Future[Path]:
    """The future every rank gets: done once every rank's share is written and rank 0 has
    committed, so a load right after ``result()`` on any rank finds the checkpoint."""
    finished: Future[Path] = Future()

    def uploaded(done: Future[Any]) -> None:
        error = done.exception()
        if error is not None:
            raise _dcp_error(target, error)

    def finish(done: Future[Any]) -> None:  # on DCP's upload thread, or here if done already
        try:
            _together(writers, lambda: uploaded(done), f"write its share of {target}")
            _together(writers, lambda: _commit(staging, target, header), f"commit {target}")
            finished.set_result(target)
        except Exception as exc:  # whatever it is, the waiters must hear of it
            finished.set_exception(exc)

    upload.add_done_callback(finish)
    return finished


def _forget_state(engine: GuardEngine, fresh: bool) -> None:
    # get_state_dict gave an empty optimizer state zeros (and Adam a step count); drop
    # them again so a save before the first step leaves training exactly as it was.
    if fresh:
        engine.optimizer.state.clear()


def _async_group(saves: _Saves, group: dist.ProcessGroup | None) -> dist.ProcessGroup | None:
    # A background save's collectives get their own gloo group, so they never interleave
    # with the training thread's (the guard's all-gather, DDP's all-reduce).
    if saves.group is None and dist.is_available() and dist.is_initialized():
        ranks = None if group is None else dist.get_process_group_ranks(group)
        saves.group = dist.new_group(
            ranks, backend="gloo", use_local_synchronization=ranks is not None
        )
    return saves.group


def _wait(saves: _Saves) -> None:
    if saves.pending is not None:
        saves.pending.exception()  # its failure was reported to whoever held its future
        saves.pending = None


# -- loading ---------------------------------------------------------------------------
def _load_rng(source: Path, rank: int) -> None:
    own = source / f"rng-rank{rank}.pt"
    if own.exists():
        set_rng_state(read_verified(own, None))
        return
    # More ranks than were saved: rank 0's generators, then a seed drawn from them and
    # offset by the rank, so the new ranks draw different numbers, reproducibly.
    set_rng_state(read_verified(source / "rng-rank0.pt", None))
    seed = int(torch.randint(0, 2**62, (1,)).item()) + rank
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    log.info("spikewatch: %s has no RNG state for rank %d; derived from rank 0's", source, rank)


# -- helpers ---------------------------------------------------------------------------
def _group(engine: GuardEngine) -> tuple[dist.ProcessGroup | None, int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        return None, 0, 1
    group = None if engine.lockstep is None else engine.lockstep.group
    return group, dist.get_rank(group), dist.get_world_size(group)


def _together(group: dist.ProcessGroup | None, work: Callable[[], None], what: str) -> None:
    """Every rank runs its ``work``; if it failed on any rank, every rank raises, so none
    is left waiting in the next collective."""
    failure: Exception | None = None
    try:
        work()
    except Exception as exc:  # sent to every rank below, raised as is here
        failure = exc
    if dist.is_available() and dist.is_initialized():
        # Objects, not a tensor: this also works on an NCCL-only group.
        errors: list[str | None] = [None] * dist.get_world_size(group)
        dist.all_gather_object(errors, None if failure is None else str(failure), group=group)
        bad = [(rank, error) for rank, error in enumerate(errors) if error is not None]
        if failure is None and bad:
            raise CheckpointError(f"rank {bad[0][0]} could not {what}: {bad[0][1]}")
    if failure is not None:
        raise failure


def _dcp_call(where: Path, call: Callable[[], _T]) -> _T:
    with warnings.catch_warnings():  # one process without a group is a supported case
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            return call()
        except (RuntimeError, OSError, ValueError, CheckpointException) as exc:
            raise _dcp_error(where, exc) from exc


def _dcp_error(where: Path, exc: BaseException) -> CheckpointError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return CheckpointError(
        f"{where}: torch.distributed.checkpoint failed ({first}); check the folder "
        "(space, permissions) and that model and optimizer match the saved ones"
    )
