"""The file manifest of a distributed checkpoint: every file's size and SHA-256.

Written into ``guard.json`` (itself checksummed, and written last), so a folder whose
``guard.json`` verifies names every other file it must hold, byte for byte.

Who hashes what: at save, each rank hashes the files it wrote (its ``__<rank>_*.distcp``
shards and ``rng-rank<rank>.pt``), in parallel; rank 0 hashes the rest (``.metadata``,
``scheduler.pt``, anything DCP names differently). At load, the ranks split the files
between them by size and each verifies its share before any rank loads a byte: every
byte is read once, not once per rank. This relies on the folder being on storage every
rank sees, as loading on another world size does anyway.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from spikewatch_hooks.state.checkpoint import CheckpointError

GUARD_FILE = "guard.json"
_OLDER = "resume from an older checkpoint"


def own_digests(staging: Path, rank: int) -> dict[str, dict[str, Any]]:
    """The entries of the files ``rank`` wrote into ``staging``."""
    names = [
        p.name
        for p in staging.iterdir()
        if p.name == f"rng-rank{rank}.pt"
        or (p.name.startswith(f"__{rank}_") and p.name.endswith(".distcp"))
    ]
    return {name: entry(staging / name) for name in names}


def complete(staging: Path, digests: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Rank 0: ``digests`` plus an entry for every other file in ``staging`` (but
    ``guard.json``, which holds the manifest)."""
    files = dict(digests)
    for path in sorted(staging.iterdir()):
        if path.name not in files and path.name != GUARD_FILE:
            files[path.name] = entry(path)
    return dict(sorted(files.items()))


def entry(path: Path) -> dict[str, Any]:
    """A file's manifest entry: its size and SHA-256."""
    with path.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"bytes": path.stat().st_size, "sha256": digest}


def share(files: dict[str, dict[str, Any]], rank: int, world: int) -> list[str]:
    """The files ``rank`` verifies: largest first, each to the rank with the fewest
    bytes so far. Every rank computes the same split from the same manifest."""
    loads = [0] * world
    mine = []
    for name in sorted(files, key=lambda n: (-int(files[n]["bytes"]), n)):
        least = loads.index(min(loads))
        loads[least] += int(files[name]["bytes"])
        if least == rank:
            mine.append(name)
    return mine


def verify(source: Path, files: dict[str, dict[str, Any]], names: list[str]) -> None:
    """Check that each of ``names`` is in ``source`` with its manifest size and digest.

    Raises:
        CheckpointError: naming the first file that is missing, of another size, or
            whose bytes differ from those saved.
    """
    for name in names:
        path = source / name
        if Path(name).name != name or name in {"", ".", ".."}:
            raise CheckpointError(f"{source / GUARD_FILE}: lists {name!r}, not a file; {_OLDER}")
        try:
            size = path.stat().st_size
            found = entry(path) if size == files[name]["bytes"] else None
        except FileNotFoundError:
            raise CheckpointError(
                f"{path} is missing: the checkpoint is incomplete; {_OLDER}"
            ) from None
        except OSError as exc:
            raise CheckpointError(f"{path}: unreadable ({exc.strerror}); {_OLDER}") from exc
        if found is None:
            raise CheckpointError(
                f"{path}: {size} bytes, not {files[name]['bytes']} as saved: truncated or "
                f"damaged; {_OLDER}"
            )
        if found["sha256"] != files[name]["sha256"]:
            raise CheckpointError(f"{path}: checksum mismatch (corrupted); {_OLDER}")
