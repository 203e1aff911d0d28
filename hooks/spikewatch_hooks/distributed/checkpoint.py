"""Sharded disk checkpoints through ``torch.distributed.checkpoint`` (DCP).

A checkpoint is a folder::

    .metadata, __0_0.distcp, ...  model and optimizer (DCP: each rank writes its share)
    rng-rank0.pt, rng-rank1.pt    each rank's RNG states (``torch.save``)
    scheduler.pt                  the LR schedulers' and GradScaler's state (rank 0;
                                  identical on every rank; `files.small_states`)
    guard.json                    step, next data position, skip ledger, detector state,
                                  counters, lr scale, world size, the manifest (size
                                  and sha256 of every other file), and the sha256 of
                                  all that; written last

Model and optimizer go through ``get_state_dict``/``set_state_dict``, which name every
tensor by its canonical name (no DDP ``module.`` prefix, FSDP shards as DTensors), so a
checkpoint saved on N ranks loads on M ranks, or in one process with no process group.
The guard's own state is identical on every rank (lockstep), so rank 0 writes it once.

Why a staging folder: everything is written into ``.<name>.partial`` beside the target,
``guard.json`` last; then rank 0 swaps it in (target -> ``.<name>.old``, partial ->
target, old removed), so a crash leaves the previous checkpoint or the new one. A save
that fails removes its staging folder (a full disk stays no fuller).

Loading verifies every file against the manifest before any live tensor is touched
(`restore`), so a damaged checkpoint is a `CheckpointError` naming the file, on every
rank, and training state stays as it was.

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
import os
import shutil
import weakref
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.checkpoint.state_dict_saver import async_save as dcp_async_save
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from spikewatch_hooks.distributed.collective import (
    dcp_call,
    dcp_error,
    group_of,
    together,
    together_gathered,
)
from spikewatch_hooks.distributed.files import FORMAT, small_states, torch_bytes, write_header
from spikewatch_hooks.distributed.manifest import GUARD_FILE, complete, own_digests
from spikewatch_hooks.distributed.restore import restore
from spikewatch_hooks.state.checkpoint import CheckpointError, atomic_write, fsync_dir
from spikewatch_hooks.state.rng import rng_state

if TYPE_CHECKING:  # the engine calls these functions: no import back up at run time
    from spikewatch_hooks.core.engine import GuardEngine


@dataclass
class _Saves:
    pending: Future[Path] | None = None  # the save in flight; the next one waits for it
    group: dist.ProcessGroup | None = None  # async saves' own gloo group (see _async_group)


@dataclass
class _Save:
    """One save under way: where it goes, and rank 0's small files."""

    target: Path
    staging: Path
    rank: int
    header: dict[str, Any] | None  # rank 0 only: guard state and scheduler, taken at once


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
    `CheckpointError` if that write failed. The folder is replaced as a whole; a
    failed save leaves the previous one and no staging folder.
    """
    target = Path(directory)
    saves = _SAVES.setdefault(engine, _Saves())
    _wait(saves)
    group, rank, world = group_of(engine)
    save = _Save(target, target.with_name(f".{target.name}.partial"), rank, None)
    together(group, lambda: _prepare(save) if rank == 0 else None, "prepare")
    try:
        rng_file, rng = save.staging / f"rng-rank{rank}.pt", torch_bytes(rng_state())
        together(group, lambda: atomic_write(rng_file, (rng,)), f"write {rng_file}")
        # Rank 0's small files are serialised now: training may change them during an async save.
        save.header = _guard_header(engine, world) if rank == 0 else None
        if not async_save:
            _save_now(engine, group, save)
            done: Future[Path] = Future()
            done.set_result(target)
            return done
        saves.pending = _save_in_background(engine, saves, group, save)
        return saves.pending
    except OSError as exc:
        _discard(save)
        raise _write_error(target, exc) from exc
    except BaseException:
        _discard(save)
        raise


def load_distributed(engine: GuardEngine, directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a `save_distributed` folder into the engine's live objects; return the guard
    state (``step``, ``next_position``, ``ledger``, ...).

    Every file is verified first (size and SHA-256 against the manifest in
    ``guard.json``); a missing, damaged or unreadable file raises `CheckpointError` on
    every rank and leaves the live model, optimizer, scheduler, RNG and guard unchanged.
    Works on the world size it was saved on, on another one, and in one process with no
    process group. A rank with no RNG file of its own (more ranks than were saved)
    derives its generators from rank 0's.
    """
    source = Path(directory)
    wait_for_save(engine)
    return restore(engine, source)


def wait_for_save(engine: GuardEngine) -> None:
    """Block until the engine's save in flight, if any, is written (or failed).

    Call it on every rank before ``destroy_process_group`` after an async save, so no
    background write is cut off; `save_distributed` and `load_distributed` call it too.
    """
    saves = _SAVES.get(engine)
    if saves is not None:
        _wait(saves)


# -- saving ----------------------------------------------------------------------------
def _prepare(save: _Save) -> None:
    """Rank 0: refuse to replace a folder that is not a checkpoint; clear old staging."""
    target = save.target
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{target} is a file; pass a folder for a distributed checkpoint")
    if target.is_dir() and any(target.iterdir()) and not (target / GUARD_FILE).exists():
        raise CheckpointError(
            f"{target} holds files but no {GUARD_FILE}, so it is not a spikewatch "
            "checkpoint and would be replaced as a whole; pass a new or empty folder"
        )
    shutil.rmtree(save.staging, ignore_errors=True)  # a crashed save's leftovers
    save.staging.mkdir(parents=True)


def _save_now(engine: GuardEngine, group: dist.ProcessGroup | None, save: _Save) -> None:
    state, fresh = _state(engine)
    try:
        dcp_call(
            save.target,
            lambda: dcp_save(state, checkpoint_id=save.staging, process_group=group),
        )
    finally:
        _forget_state(engine, fresh)
    _finish(group, save)


def _save_in_background(
    engine: GuardEngine, saves: _Saves, group: dist.ProcessGroup | None, save: _Save
) -> Future[Path]:
    """Start DCP's async save; return the future every rank gets: done once every
    rank's share is written and checksummed and rank 0 has committed, so a load right
    after ``result()`` on any rank finds the checkpoint."""
    writers = _async_group(saves, group)
    state, fresh = _state(engine)
    try:
        upload = dcp_call(
            save.target,
            lambda: dcp_async_save(state, checkpoint_id=save.staging, process_group=writers),
        )
    finally:
        _forget_state(engine, fresh)  # staged: the state was copied before async_save returned
    # A future, or (staging in the background) an AsyncSaveResponse holding one.
    uploaded = cast("Future[Any]", getattr(upload, "upload_completion", upload))
    finished: Future[Path] = Future()

    def finish(done: Future[Any]) -> None:  # on DCP's upload thread, or here if done already
        try:
            together(writers, lambda: _raise_for(done, save.target), "write its share")
            _finish(writers, save)
            finished.set_result(save.target)
        except Exception as exc:  # whatever it is, the waiters must hear of it
            _discard(save)
            finished.set_exception(_write_error(save.target, exc))

    uploaded.add_done_callback(finish)
    return finished


def _finish(group: dist.ProcessGroup | None, save: _Save) -> None:
    """Once every rank's files are written: each rank checksums its own, rank 0 the
    rest, writes the manifest into guard.json and swaps the folder in."""
    gathered = together_gathered(
        group, lambda: own_digests(save.staging, save.rank), f"checksum {save.staging}"
    )
    digests = {name: entry for part in gathered for name, entry in part.items()}
    together(group, lambda: _commit(save, digests), f"commit {save.target}")


def _commit(save: _Save, digests: dict[str, dict[str, Any]]) -> None:
    """Rank 0: scheduler.pt, then guard.json (with the manifest) last, then the swap."""
    if save.header is None:
        return
    staging, target = save.staging, save.target
    if save.header["scheduler"] is not None:
        atomic_write(staging / "scheduler.pt", (save.header["scheduler"],))
    write_header(staging, {**save.header["body"], "files": complete(staging, digests)})
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def _guard_header(engine: GuardEngine, world: int) -> dict[str, Any]:
    states = small_states(engine)
    scheduler = None if states is None else torch_bytes(states)
    body = {
        "format": FORMAT,
        "world_size": world,
        "torch": torch.__version__,
        "guard": engine.guard_state(),
    }
    body = json.loads(json.dumps(body))  # plain JSON types, so the digest survives reading
    return {"body": body, "scheduler": scheduler}


def _discard(save: _Save) -> None:
    # Rank 0, after every rank agreed the save failed: its partial files would only
    # take space (a full disk is a common cause) until the next save cleared them.
    if save.rank == 0:
        shutil.rmtree(save.staging, ignore_errors=True)


def _state(engine: GuardEngine) -> tuple[dict[str, Any], list[bool]]:
    """Model and optimizer state by canonical names, and whether the optimizer was
    fresh: get_state_dict fills an empty state with zeros (and Adam a step count)."""
    fresh = [not o.state for o in engine.optimizers]
    model_sd, optim_sd = get_state_dict(engine.model, tuple(engine.optimizers))
    return {"model": model_sd, "optimizer": optim_sd}, fresh


def _forget_state(engine: GuardEngine, fresh: list[bool]) -> None:
    # Drop the zeros again so a save before the first step leaves training as it was.
    for opt, was_fresh in zip(engine.optimizers, fresh, strict=True):
        if was_fresh:
            opt.state.clear()


def _write_error(target: Path, exc: Exception) -> Exception:
    """An OSError (a full disk, no permission) as a `CheckpointError` with the fix."""
    if not isinstance(exc, OSError):
        return exc
    return CheckpointError(
        f"{target}: cannot write checkpoint ({exc.strerror or exc}); free space on that "
        "disk, check its permissions, or pass another folder"
    )


def _raise_for(done: Future[Any], target: Path) -> None:
    error = done.exception()
    if error is not None:
        raise dcp_error(target, error)


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
