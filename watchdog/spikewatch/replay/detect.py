"""Guess a curve file's format from its name, then from its first bytes."""

from __future__ import annotations

import csv
import json
import os
import struct
from pathlib import Path

from spikewatch.errors import ReplayInputError
from spikewatch.replay import tensorboard
from spikewatch.replay.formats import hf, log_patterns, table, wandb

#: How much of a file is searched for a known log line: a modded-nanogpt log starts
#: with the whole training script, a Megatron log with pages of arguments.
TEXT_SNIFF_BYTES = 1 << 20


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
        (name == hf.STATE_FILE, "hf"),
    ]
    guess = next((fmt for hit, fmt in by_name if hit), None)
    if guess is not None or not p.exists():
        return guess
    if p.is_dir():
        return _folder_format(p)
    return _sniff(p)


def _folder_format(folder: Path) -> str | None:
    # An HF output folder often holds a runs/ TensorBoard folder as well; the trainer
    # state is preferred because it has the grad norm.
    if hf.has_state(folder):
        return "hf"
    if any(p.is_file() for p in folder.rglob("*tfevents*")):
        return "tensorboard"
    return None


def _sniff(path: Path) -> str | None:
    try:
        with path.open("rb") as stream:
            head = stream.read(TEXT_SNIFF_BYTES)
    except OSError:
        return None
    if len(head) >= 12:
        length_crc = struct.unpack_from("<I", head, 8)[0]
        if tensorboard.masked_crc32c(head[:8]) == length_crc:
            return "tensorboard"
    lines = [line for line in head.decode("utf-8", "replace").splitlines() if line.strip()]
    first = lines[0] if lines else ""
    try:
        row = json.loads(first)
    except ValueError:
        row = None
    if isinstance(row, dict):
        return "hf" if "log_history" in row else "jsonl"
    if first.lstrip().startswith("{"):
        return "hf"
    if _is_curve_header(first):
        return "wandb" if wandb.is_wandb(next(csv.reader([first]))) else "csv"
    if log_patterns.detect(lines) is not None:
        return "text"
    return "csv" if _is_table(lines) else None


def _is_curve_header(line: str) -> bool:
    """True for a CSV/TSV header naming a step and a loss column."""
    delimiter = "\t" if "\t" in line and "," not in line else ","
    header = next(csv.reader([line], delimiter=delimiter))
    try:
        roles = table.header_roles(header, where="")
    except ReplayInputError:
        return True  # a W&B chart export of several runs: the CSV reader says so
    return "step" in roles and "loss" in roles


def _is_table(lines: list[str]) -> bool:
    """True when the first two lines have the same number of commas (or tabs) > 0, so a
    CSV reader can say which column is missing; free text rarely lines up like that."""
    counts = [(line.count(","), line.count("\t")) for line in lines[:2]]
    if len(counts) == 1:
        return any(counts[0])
    return any(first > 0 and first == second for first, second in zip(*counts, strict=True))
