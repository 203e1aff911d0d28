"""Files of a distributed checkpoint: the checksummed ``guard.json`` (which holds the
manifest of every other file) and reading a small file against its manifest entry."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from spikewatch_hooks.distributed.manifest import GUARD_FILE
from spikewatch_hooks.state.checkpoint import CheckpointError, atomic_write, sha256

if TYPE_CHECKING:
    from spikewatch_hooks.core.engine import GuardEngine

# 2: guard.json holds a manifest (size and SHA-256 of every file); 1 had none.
FORMAT = "spikewatch-dcp 2"
_OLDER = "resume from an older checkpoint"


def read_header(source: Path) -> dict[str, Any]:
    """Read and verify ``guard.json``; return its body (guard state, manifest, ...)."""
    path = source / GUARD_FILE
    old = source.with_name(f".{source.name}.old")
    if not path.exists():
        fix = (
            f"an interrupted save left the previous checkpoint in {old}; rename it to {source}"
            if (old / GUARD_FILE).exists()
            else f"the save did not finish or this is not a checkpoint folder; {_OLDER}"
        )
        raise CheckpointError(f"{path} is missing: {fix}")
    try:
        wrapper = json.loads(path.read_text())
        body, digest = wrapper["checkpoint"], wrapper["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc}); the file is damaged, {_OLDER}") from exc
    if not isinstance(body, dict) or sha256(canonical(body)) != digest:
        raise CheckpointError(
            f"{path}: checksum mismatch (edited, truncated or corrupted); {_OLDER}"
        )
    if body.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: format {body.get('format')!r}, not {FORMAT!r}; resume with the "
            "spikewatch version that wrote it"
        )
    files = body.get("files")
    if not isinstance(files, dict) or not {".metadata", "rng-rank0.pt"} <= files.keys():
        raise CheckpointError(f"{path}: its file manifest is incomplete; {_OLDER}")
    if not all(_is_entry(entry) for entry in files.values()):
        raise CheckpointError(f"{path}: its file manifest is malformed; {_OLDER}")
    return body


def _is_entry(entry: Any) -> bool:
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("bytes"), int)
        and isinstance(entry.get("sha256"), str)
    )


def write_header(staging: Path, body: dict[str, Any]) -> None:
    """Write ``guard.json`` (``body`` and the SHA-256 of it) atomically into ``staging``."""
    text = json.dumps({"sha256": sha256(canonical(body)), "checkpoint": body}, indent=1)
    atomic_write(staging / GUARD_FILE, (text.encode(),))


def read_verified(path: Path, entry: dict[str, Any]) -> Any:
    """``torch.load`` a small file after checking it against its manifest ``entry``
    again (it is read here anyway; this closes the gap since it was verified)."""
    try:
        data = path.read_bytes()
        if len(data) != entry["bytes"] or sha256(data) != entry["sha256"]:
            raise CheckpointError(f"{path}: checksum mismatch (corrupted); {_OLDER}")
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc}); {_OLDER}") from exc


def torch_bytes(obj: Any) -> bytes:
    """``obj`` as ``torch.save`` writes it."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def canonical(body: Any) -> bytes:
    """``body`` as JSON in one spelling, so its digest does not depend on formatting."""
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


#: Tags ``scheduler.pt`` holding several schedulers and extras (one scheduler and no
#: extras is its plain state dict, as written before there could be more).
_SMALL = "spikewatch-small-states 2"


def small_states(engine: GuardEngine) -> Any:
    """What ``scheduler.pt`` holds: None, one scheduler's state dict, or (several
    schedulers, or a GradScaler) a tagged mapping of them all."""
    schedulers = [s.state_dict() for s in engine.schedulers]
    extras = {k: v.state_dict() for k, v in engine.updates.extras.items()}
    if not extras and len(schedulers) <= 1:
        return schedulers[0] if schedulers else None
    return {"format": _SMALL, "schedulers": schedulers, "extras": extras}


def check_small_states(engine: GuardEngine, saved: Any) -> None:
    """Raise `CheckpointError` if ``saved`` holds another number of schedulers than the
    engine has (checked before any live object is touched)."""
    tagged = isinstance(saved, dict) and saved.get("format") == _SMALL
    count = len(saved["schedulers"]) if tagged else 1
    if engine.schedulers and count != len(engine.schedulers):
        raise CheckpointError(
            f"the checkpoint holds {count} scheduler(s), the guard has "
            f"{len(engine.schedulers)}; pass the same schedulers, in the same order"
        )


def load_small_states(engine: GuardEngine, saved: Any) -> None:
    """Load what `small_states` wrote (either shape) into the live objects."""
    check_small_states(engine, saved)
    tagged = isinstance(saved, dict) and saved.get("format") == _SMALL
    schedulers = saved["schedulers"] if tagged else [saved]
    extras = saved["extras"] if tagged else {}
    for scheduler, state in zip(engine.schedulers, schedulers, strict=False):
        scheduler.load_state_dict(state)
    for name, obj in engine.updates.extras.items():
        if name in extras:
            obj.load_state_dict(extras[name])
