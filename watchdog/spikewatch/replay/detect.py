"""Guess a curve file's format from its name, then from its first bytes."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from spikewatch.replay import tensorboard


def detect_format(path: str | os.PathLike[str]) -> str | None:
    """Guess the format from the file name, then from the first bytes; None if unsure.

    Example:
        >>> detect_format("runs/x/trainer_state.json"), detect_format("loss.CSV")
        ('hf', 'csv')
    """
    p = Path(path)
    name = p.name.lower()
    by_name = [
        ("tfevents" in name, "tensorboard"),
        (name.endswith((".csv", ".tsv")), "csv"),
        (name.endswith((".jsonl", ".ndjson")), "jsonl"),
        (name == "trainer_state.json", "hf"),
    ]
    guess = next((fmt for hit, fmt in by_name if hit), None)
    if guess is not None or not p.exists():
        return guess
    if p.is_dir():
        return "hf" if (p / "trainer_state.json").is_file() else "tensorboard"
    return _sniff(p)


def _sniff(path: Path) -> str | None:
    try:
        with path.open("rb") as stream:
            head = stream.read(4096)
    except OSError:
        return None
    if len(head) >= 12:
        length_crc = struct.unpack_from("<I", head, 8)[0]
        if tensorboard.masked_crc32c(head[:8]) == length_crc:
            return "tensorboard"
    first = next(
        (line for line in head.decode("utf-8", "replace").splitlines() if line.strip()), ""
    )
    try:
        row = json.loads(first)
    except ValueError:
        row = None
    if isinstance(row, dict):
        return "hf" if "log_history" in row else "jsonl"
    if first.lstrip().startswith("{"):
        return "hf"
    return "csv" if "," in first or "\t" in first else None
