"""Hugging Face Trainer curves: ``log_history`` of a ``trainer_state.json``.

The Trainer writes ``trainer_state.json`` into every ``checkpoint-N`` folder (the
history up to step N) and, at the end of training, into the output folder itself.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from spikewatch.errors import ReplayInputError
from spikewatch.replay.formats.builder import CurveBuilder, read_text
from spikewatch.replay.model import Curve

STATE_FILE = "trainer_state.json"
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
_HF_KEYS = {"step": "step", "loss": "loss", "grad_norm": "grad_norm", "lr": "learning_rate"}
_STATE_FIX = "pass the trainer_state.json the HF Trainer saves in each checkpoint folder"


def checkpoint_states(folder: Path) -> list[tuple[int, Path]]:
    """``(N, path)`` of every ``checkpoint-N/trainer_state.json`` in ``folder``, by N.

    Example:
        >>> import pathlib, tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     for n in (900, 1000, 50):
        ...         pathlib.Path(tmp, f"checkpoint-{n}").mkdir()
        ...         _ = pathlib.Path(tmp, f"checkpoint-{n}", STATE_FILE).write_text("{}")
        ...     pathlib.Path(tmp, "checkpoint-best").mkdir()
        ...     [n for n, _ in checkpoint_states(pathlib.Path(tmp))], has_state(pathlib.Path(tmp))
        ([50, 900, 1000], True)
    """
    found = []
    for child in folder.iterdir():
        match = _CHECKPOINT.fullmatch(child.name)
        if match and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child / STATE_FILE))
    return sorted(found)


def has_state(folder: Path) -> bool:
    """True for a checkpoint folder or an output folder holding checkpoints."""
    return (folder / STATE_FILE).is_file() or bool(checkpoint_states(folder))


def _load(path: Path, name: str) -> list[object]:
    try:
        state = json.loads(read_text(path, name))
    except json.JSONDecodeError as exc:
        raise ReplayInputError(
            f"{name} line {exc.lineno}: not valid JSON ({exc.msg}); {_STATE_FIX}"
        ) from None
    history = state.get("log_history") if isinstance(state, dict) else None
    if not isinstance(history, list):
        raise ReplayInputError(f"{name}: no log_history list; {_STATE_FIX}")
    return history


def _newest_state(folder: Path, name: str) -> tuple[Path, str, list[object]]:
    """The state file of ``folder`` with the longest history: the top-level one (written
    when training ended) or the newest checkpoint's, whichever covers more steps."""
    candidates = []
    if (folder / STATE_FILE).is_file():
        candidates.append(folder / STATE_FILE)
    states = checkpoint_states(folder)
    if states:
        candidates.append(states[-1][1])  # largest N (compared as numbers)
    best: tuple[Path, str, list[object]] | None = None
    for path in candidates:
        label = os.path.join(name, str(path.relative_to(folder)))
        history = _load(path, label)
        if best is None or len(history) > len(best[2]):
            best = (path, label, history)
    if best is None:
        raise ReplayInputError(
            f"{name}: no {STATE_FILE} and no checkpoint-N/{STATE_FILE} in this folder; "
            "pass the Trainer's output_dir or one checkpoint folder"
        )
    return best


def read_hf(path: Path, name: str) -> Curve:
    """Read the ``log_history`` of a state file, a checkpoint folder or an output folder.

    Example:
        >>> import json, pathlib, tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     for n in (10, 20):
        ...         ckpt = pathlib.Path(tmp, f"checkpoint-{n}")
        ...         ckpt.mkdir()
        ...         history = [{"loss": 2.0 - s / 100, "step": s} for s in range(5, n + 1, 5)]
        ...         _ = (ckpt / "trainer_state.json").write_text(
        ...             json.dumps({"log_history": history}))
        ...     curve = read_hf(pathlib.Path(tmp), tmp)
        >>> curve.steps, curve.path.endswith("checkpoint-20/trainer_state.json")
        ([5, 10, 15, 20], True)
    """
    if path.is_dir():
        path, name, history = _newest_state(path, name)
    else:
        history = _load(path, name)
    build = CurveBuilder(name=name, unit="entry")
    for i, entry in enumerate(history):
        if not isinstance(entry, dict):
            build.drop("not an object")
            continue
        # Only the exact HF keys: the final summary entry has "train_loss", not "loss".
        row = {role: entry[key] for role, key in _HF_KEYS.items() if key in entry}
        build.add(f"log_history[{i}]", {"step": None, **row})
    return build.curve(str(path), "hf", "set TrainingArguments(logging_steps=...) > 0")
