"""Files of a distributed checkpoint: the checksummed ``guard.json`` and atomic writes."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from spikewatch_hooks.state.checkpoint import CheckpointError

GUARD_FILE = "guard.json"
FORMAT = "spikewatch-dcp 1"


def read_header(source: Path) -> dict[str, Any]:
    path = source / GUARD_FILE
    old = source.with_name(f".{source.name}.old")
    if not path.exists():
        fix = (
            f"an interrupted save left the previous checkpoint in {old}; rename it to {source}"
            if (old / GUARD_FILE).exists()
            else "the save did not finish or this is not a checkpoint folder; resume from "
            "an older checkpoint"
        )
        raise CheckpointError(f"{path} is missing: {fix}")
    try:
        wrapper = json.loads(path.read_text())
        body, digest = wrapper["checkpoint"], wrapper["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"{path}: unreadable ({exc}); the file is damaged, resume from an older checkpoint"
        ) from exc
    if not isinstance(body, dict) or sha256(canonical(body)) != digest:
        raise CheckpointError(
            f"{path}: checksum mismatch (edited, truncated or corrupted); "
            "resume from an older checkpoint"
        )
    if body.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: format {body.get('format')!r}, not {FORMAT!r}; resume with the "
            "spikewatch version that wrote it"
        )
    return body


def read_verified(path: Path, digest: str | None) -> Any:
    try:
        data = path.read_bytes()
        if digest is not None and sha256(data) != digest:
            raise CheckpointError(f"{path}: checksum mismatch; resume from an older checkpoint")
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise CheckpointError(
            f"{path}: unreadable ({exc}); resume from an older checkpoint"
        ) from exc


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def canonical(body: Any) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
