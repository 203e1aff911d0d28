"""Read a logged training curve from any supported format (`read_curve`).

Every reader checks what it reads and fails with a one-line `ReplayInputError` that
names the file, the line (or field, or tag) and the fix. NaN and infinite losses are
data, not errors: ``nan``/``inf`` cells and the JSON literals ``NaN``/``Infinity`` parse.
A blank cell, a missing key or a JSON ``null`` is *no value* at that step (see
`spikewatch.replay.formats.builder`); rows without a loss are dropped and counted in
`Curve.dropped`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from spikewatch.errors import ReplayInputError
from spikewatch.replay.detect import detect_format
from spikewatch.replay.formats import hf, jsonl, log_patterns, table, text_log, tfevents
from spikewatch.replay.model import Curve

_READERS: dict[str, Callable[[Path, str], Curve]] = {
    "csv": table.read_csv,
    "wandb": table.read_csv,
    "jsonl": jsonl.read_jsonl,
    "hf": hf.read_hf,
    "tensorboard": tfevents.read_tensorboard,
    "text": text_log.read_text_log,
}
FORMATS = tuple(_READERS)


def _format(p: Path, name: str, format: str | None, pattern: str | None) -> str:
    if pattern is not None:
        if format is not None and format.lower() != "text":
            raise ReplayInputError(
                f"{name}: --pattern reads plain-text logs, not {format}; drop --format or --pattern"
            )
        return "text"
    fmt = format.lower() if format is not None else detect_format(p)
    if fmt is None and p.is_dir():
        raise ReplayInputError(
            f"{name}: no trainer_state.json, checkpoint-N/trainer_state.json or "
            "events.out.tfevents.* file in this folder; pass the run's output or log folder"
        )
    if fmt is None:
        raise ReplayInputError(
            f"{name}: cannot tell the format from the name or content; pass --format "
            f"(one of {', '.join(FORMATS)}), or --pattern REGEX for a plain-text log"
        )
    if fmt not in _READERS:
        raise ReplayInputError(
            f"{name}: format {format!r} is not supported; use one of {', '.join(FORMATS)}"
        )
    return fmt


def read_curve(
    path: str | os.PathLike[str], *, format: str | None = None, pattern: str | None = None
) -> Curve:
    """Read a logged curve; ``format`` is one of `FORMATS`, or None to detect it.

    Args:
        path: a ``.csv``/``.tsv`` file (header ``step,loss[,grad_norm][,lr]``, or a W&B
            history or chart export), a ``.jsonl`` file (one ``{"step": .., "loss": ..}``
            object per line, e.g. LLaMA-Factory's ``trainer_log.jsonl``), an HF
            ``trainer_state.json`` (or a checkpoint folder, or the output folder holding
            ``checkpoint-N`` folders), a TensorBoard event file (or the run folder), or a
            nanoGPT / llm.c / modded-nanogpt / Megatron-LM text log.
        format: one of `FORMATS`; None detects it.
        pattern: a regex with named groups ``step``, ``loss`` (and optionally
            ``grad_norm``, ``lr``) searched in each line of a plain-text log.

    Raises:
        ReplayInputError: the file is missing, empty, or not readable as a curve.

    Example:
        >>> import pathlib, tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = pathlib.Path(tmp, "run.csv")
        ...     _ = path.write_text("step,train_loss,grad-norm\\n1,2.5,1.0\\n2,nan,\\n3,,\\n")
        ...     curve = read_curve(path)
        >>> curve.format, curve.steps, curve.loss, curve.grad_norm, curve.lr, curve.dropped
        ('csv', [1, 2], [2.5, nan], [1.0, None], None, {'no loss': 1})
    """
    name = os.fspath(path)
    p = Path(path)
    compiled = log_patterns.compile_pattern(pattern) if pattern is not None else None
    if not p.exists():
        raise ReplayInputError(f"{name}: no such file or folder; check the path")
    fmt = _format(p, name, format, pattern)
    if p.is_dir() and fmt in ("csv", "wandb", "jsonl", "text"):
        raise ReplayInputError(f"{name}: is a folder; pass the {fmt} file inside it")
    if fmt == "text":
        return text_log.read_text_log(p, name, pattern=compiled)
    return _READERS[fmt](p, name)
