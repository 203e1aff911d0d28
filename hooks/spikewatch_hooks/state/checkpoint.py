"""Disk checkpoints: atomic write, checksum verified on load.

File layout: a header line ``SPIKEWATCH-CKPT 1 <sha256> <length>\\n`` followed by the
``torch.save`` payload. The file is written beside its final name, fsynced, then renamed,
so a crash leaves the old checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import torch

from spikewatch.errors import SpikewatchError

MAGIC = b"SPIKEWATCH-CKPT 1"


class CheckpointError(SpikewatchError):
    """A checkpoint is missing, truncated or does not match its checksum."""


def save_checkpoint(path: str | os.PathLike[str], payload: dict[str, Any]) -> Path:
    """Write ``payload`` atomically to ``path``; return the path.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     p = save_checkpoint(Path(tmp, "ckpt.pt"), {"step": 7, "w": torch.ones(2)})
        ...     load_checkpoint(p)["step"]
        7
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    body = buffer.getvalue()
    header = b"%s %s %d\n" % (MAGIC, hashlib.sha256(body).hexdigest().encode(), len(body))
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    with tmp.open("wb") as f:
        f.write(header)
        f.write(body)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
    return target


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and verify a checkpoint written by `save_checkpoint`."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise CheckpointError(
            f"{p}: cannot read checkpoint ({exc.strerror}); check the path"
        ) from exc
    header, _, body = data.partition(b"\n")
    parts = header.split(b" ")
    if not header.startswith(MAGIC) or len(parts) != 4:
        raise CheckpointError(f"{p}: not a spikewatch checkpoint; pass a file saved by SpikeGuard")
    digest, length = parts[2].decode(), int(parts[3])
    if len(body) != length or hashlib.sha256(body).hexdigest() != digest:
        raise CheckpointError(
            f"{p}: checksum mismatch (truncated or corrupted); resume from an older checkpoint"
        )
    payload: dict[str, Any] = torch.load(io.BytesIO(body), weights_only=True, map_location="cpu")
    return payload
