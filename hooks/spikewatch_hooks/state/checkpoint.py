"""Disk checkpoints: atomic write, checksum verified on load.

File layout: a header line ``SPIKEWATCH-CKPT 1 <sha256> <length>\\n`` followed by the
``torch.save`` payload. The file is written beside its final name, fsynced, renamed, and
the folder fsynced, so a crash leaves the old checkpoint or the new one, never half of
one. Any damage (a flipped byte anywhere, a truncation, a foreign file) is a
`CheckpointError` before ``torch.load`` sees a byte.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from spikewatch.errors import SpikewatchError

MAGIC = b"SPIKEWATCH-CKPT 1"
# The whole header, strictly: anything else (another byte, a case change, a sign, an
# underscore that int() would accept) is damage, never parsed leniently.
_HEADER = re.compile(rb"SPIKEWATCH-CKPT 1 ([0-9a-f]{64}) ([1-9][0-9]{0,17}|0)")
_HEADER_MAX = len(MAGIC) + 1 + 64 + 1 + 18 + 1  # a newline further on is not a header's
_TEMP = re.compile(r"\.(?P<name>.+)\.tmp-(?P<pid>[0-9]+)")
_OLDER = "resume from an older checkpoint"


class CheckpointError(SpikewatchError):
    """A checkpoint is missing, truncated or does not match its checksum."""


def save_checkpoint(path: str | os.PathLike[str], payload: dict[str, Any]) -> Path:
    """Write ``payload`` atomically to ``path``; return the path.

    Raises `CheckpointError` if the file cannot be written (a full disk, no permission);
    no temp file is left behind then, and the previous checkpoint at ``path`` is intact.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     p = save_checkpoint(Path(tmp, "ckpt.pt"), {"step": 7, "w": torch.ones(2)})
        ...     load_checkpoint(p)["step"]
        7
    """
    target = Path(path)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    body = buffer.getbuffer()
    header = b"%s %s %d\n" % (MAGIC, sha256(body).encode(), len(body))
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(target)
        atomic_write(target, (header, body))
    except OSError as exc:
        raise CheckpointError(
            f"{target}: cannot write checkpoint ({exc.strerror or exc}); free space on "
            "that disk, check its permissions, or pass another path"
        ) from exc
    return target


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and verify a checkpoint written by `save_checkpoint`.

    Raises `CheckpointError` naming the file if it is missing, damaged in any byte,
    truncated, or not a spikewatch checkpoint.
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise CheckpointError(
            f"{p}: cannot read checkpoint ({exc.strerror}); check the path, or {_OLDER}"
        ) from exc
    end = data.find(b"\n", 0, _HEADER_MAX)
    header = _HEADER.fullmatch(data[:end]) if end >= 0 else None
    if header is None:
        raise CheckpointError(
            f"{p}: not a spikewatch checkpoint, or its header is damaged; pass a file "
            f"saved by SpikeGuard.save_checkpoint, or {_OLDER}"
        )
    body = memoryview(data)[end + 1 :]
    if len(body) != int(header[2]) or sha256(body) != header[1].decode("ascii"):
        raise CheckpointError(f"{p}: checksum mismatch (truncated or corrupted); {_OLDER}")
    try:
        payload = torch.load(io.BytesIO(body), weights_only=True, map_location="cpu")
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        # Verified bytes that torch cannot read: written by an incompatible torch.
        raise CheckpointError(
            f"{p}: verified, but cannot be read by torch.load ({_first_line(exc)}); resume "
            f"with the torch version that wrote it, or {_OLDER}"
        ) from exc
    if not isinstance(payload, dict):
        raise CheckpointError(f"{p}: holds no checkpoint dictionary; {_OLDER}")
    return payload


def atomic_write(target: Path, chunks: Iterable[bytes | memoryview]) -> None:
    """Write ``chunks`` to a temp file beside ``target``, fsync it, rename it over
    ``target`` and fsync the folder (so the rename itself survives a power cut).

    On any failure, including ``KeyboardInterrupt``, the temp file is removed.
    """
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def remove_stale_temps(target: Path) -> None:
    """Remove temp files of ``target`` left by writers that died (kill -9, power cut):
    the pid in their name is not a running process. A live writer's file is kept."""
    for leftover in target.parent.glob(f".{glob_escape(target.name)}.tmp-*"):
        found = _TEMP.fullmatch(leftover.name)
        if found is None or found["name"] != target.name or _alive(int(found["pid"])):
            continue
        leftover.unlink(missing_ok=True)


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename, a new file) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256(data: bytes | memoryview) -> str:
    """The hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def glob_escape(name: str) -> str:
    """``name`` with glob wildcards escaped, for `Path.glob`."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process, or not a pid: not ours to judge
    return True


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
