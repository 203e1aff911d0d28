"""Read a logged training curve from CSV, JSON lines, HF trainer state or TensorBoard.

Every reader checks what it reads and fails with a one-line `ReplayInputError` that
names the file, the line (or field, or tag) and the fix. NaN and infinite losses are
data, not errors: ``nan``/``inf`` cells and the JSON literals ``NaN``/``Infinity`` parse.
Rows without a loss (evaluation entries, other metrics logged at the same step) are
skipped; a missing grad norm or learning rate inside a present column is NaN.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from spikewatch.errors import ReplayInputError
from spikewatch.replay import tensorboard
from spikewatch.replay.detect import detect_format
from spikewatch.replay.model import Curve
from spikewatch.replay.tensorboard import ScalarEvent

FORMATS = ("csv", "jsonl", "hf", "tensorboard")

#: Accepted column names / JSON keys / TensorBoard tags, best first, compared after
#: lower-casing and turning ``-`` and spaces into ``_``.
ALIASES: dict[str, tuple[str, ...]] = {
    "step": ("step", "global_step", "trainer/global_step", "_step", "iteration", "iter"),
    "loss": ("loss", "train/loss", "train_loss", "loss/train", "training_loss", "train/train_loss"),
    "grad_norm": ("grad_norm", "train/grad_norm", "gradient_norm", "grad_norm/total"),
    "lr": ("lr", "learning_rate", "train/learning_rate", "train/lr", "lr/train"),
}
_HF_KEYS = {"step": "step", "loss": "loss", "grad_norm": "grad_norm", "lr": "learning_rate"}


def _normalize(name: str) -> str:
    return name.strip().lower().replace("-", "_").replace(" ", "_")


def _pick(names: Iterable[str], role: str) -> str | None:
    """The name in ``names`` that is the best alias for ``role``, if any."""
    by_alias = {_normalize(n): n for n in reversed(list(names))}
    return next((by_alias[a] for a in ALIASES[role] if a in by_alias), None)


@dataclass
class _Builder:
    """Collects rows, checks steps increase and parses numbers, naming the source on error."""

    name: str
    unit: str
    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    has: set[str] = field(default_factory=set)
    last_where: str = ""

    def fail(self, where: str, problem: str, fix: str) -> ReplayInputError:
        source = f"{self.name} {where}" if self.name else where
        return ReplayInputError(f"{source}: {problem}; {fix}")

    def number(self, where: str, key: str, raw: object) -> float:
        # None is JSON null (what pandas and JavaScript write for NaN) or a missing key;
        # "" is an empty CSV cell. Both mean "no value here".
        if raw is None or raw == "":
            return math.nan
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return float(raw)
        if isinstance(raw, str):
            try:
                return float(raw)
            except ValueError:
                pass
        fix = f"fix the value or remove the {self.unit}"
        raise self.fail(where, f"{key}={raw!r} is not a number", fix)

    def step(self, where: str, raw: object) -> int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        value = math.nan if isinstance(raw, bool) else self.number(where, "step", raw)
        if not (math.isfinite(value) and value == int(value)):
            fix = f"fix the value or remove the {self.unit}"
            raise self.fail(where, f"step={raw!r} is not a whole number", fix)
        return int(value)

    def add(self, where: str, row: Mapping[str, object]) -> None:
        """Append one row whose ``row`` maps roles (step, loss, ...) to raw values."""
        step = self.step(where, row["step"])
        if self.steps and step <= self.steps[-1]:
            prev = f"step {self.steps[-1]} of {self.last_where}"
            if step == self.steps[-1]:
                raise self.fail(where, f"step {step} repeats {prev}", f"remove one {self.unit}")
            raise self.fail(
                where,
                f"step {step} comes after {prev} (steps must increase; was the run restarted?)",
                "sort by step, or keep only what was logged after the restart",
            )
        self.steps.append(step)
        self.loss.append(self.number(where, "loss", row["loss"]))
        for role, column in (("grad_norm", self.grad_norm), ("lr", self.lr)):
            if role in row:
                self.has.add(role)
            column.append(self.number(where, role, row.get(role)))
        self.last_where = where

    def curve(self, path: str, fmt: str, empty_fix: str) -> Curve:
        if not self.steps:
            raise ReplayInputError(f"{self.name}: no {self.unit} has a loss value; {empty_fix}")
        grad = self.grad_norm if "grad_norm" in self.has else None
        lr = self.lr if "lr" in self.has else None
        return Curve(path=path, format=fmt, steps=self.steps, loss=self.loss, grad_norm=grad, lr=lr)


def _read_text(path: Path, name: str) -> str:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ReplayInputError(
            f"{name} byte {exc.start}: not UTF-8 text; save the file as UTF-8 or pass --format"
        ) from None
    except OSError as exc:
        raise ReplayInputError(f"{name}: cannot read ({exc.strerror}); check the path") from None
    if not text.strip():
        raise ReplayInputError(f"{name}: the file is empty; point at the file the run logged to")
    return text


def _read_csv(path: Path, name: str) -> Curve:
    lines = _read_text(path, name).splitlines()
    first = next(i for i, line in enumerate(lines) if line.strip())
    delimiter = "\t" if "\t" in lines[first] and "," not in lines[first] else ","
    reader = csv.reader(lines[first:], delimiter=delimiter)
    header = next(reader)
    roles = {role: _pick(header, role) for role in ALIASES}
    for role in ("step", "loss"):
        if roles[role] is None:
            raise ReplayInputError(
                f"{name} line {first + 1}: no {role} column in header {delimiter.join(header)!r}; "
                f"name a column {' or '.join(ALIASES[role][:3])}"
            )
    index = {role: header.index(col) for role, col in roles.items() if col is not None}
    build = _Builder(name=name, unit="line")
    for cells in reader:
        values = {role: cells[i].strip() if i < len(cells) else "" for role, i in index.items()}
        if values["loss"]:
            build.add(f"line {first + reader.line_num}", values)
    return build.curve(str(path), "csv", "add rows below the header, e.g. 1,2.31")


def _json_rows(name: str, text: str) -> Iterable[tuple[int, dict[str, object]]]:
    lines = text.splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines) and not text.endswith("\n"):
                return  # the writer was stopped mid-line; the lines before are good data
            raise ReplayInputError(
                f"{name} line {number}: not valid JSON ({exc.msg} at column {exc.pos + 1}); "
                "fix or remove the line"
            ) from None
        if not isinstance(row, dict):
            raise ReplayInputError(
                f"{name} line {number}: expected a JSON object like "
                '{"step": 1, "loss": 2.3}; fix or remove the line'
            )
        yield number, row


def _read_jsonl(path: Path, name: str) -> Curve:
    build = _Builder(name=name, unit="line")
    for number, row in _json_rows(name, _read_text(path, name)):
        keys = {role: _pick(row, role) for role in ALIASES}
        if keys["loss"] is None:
            continue
        if keys["step"] is None:
            raise build.fail(f"line {number}", "no step key", 'add "step": N to every line')
        build.add(f"line {number}", {role: row[k] for role, k in keys.items() if k is not None})
    fix = 'write one object per line, e.g. {"step": 1, "loss": 2.31}'
    return build.curve(str(path), "jsonl", fix)


def _read_hf(path: Path, name: str) -> Curve:
    if path.is_dir():
        path, name = path / "trainer_state.json", os.path.join(name, "trainer_state.json")
    try:
        state = json.loads(_read_text(path, name))
    except json.JSONDecodeError as exc:
        raise ReplayInputError(
            f"{name} line {exc.lineno}: not valid JSON ({exc.msg}); pass the "
            "trainer_state.json the HF Trainer saves in each checkpoint folder"
        ) from None
    history = state.get("log_history") if isinstance(state, dict) else None
    if not isinstance(history, list):
        raise ReplayInputError(
            f"{name}: no log_history list; pass the trainer_state.json the HF Trainer "
            "saves in each checkpoint folder"
        )
    build = _Builder(name=name, unit="entry")
    for i, entry in enumerate(history):
        # Only the exact HF keys: the final summary entry has "train_loss", not "loss".
        if isinstance(entry, dict) and entry.get("loss") is not None:
            row = {role: entry[key] for role, key in _HF_KEYS.items() if key in entry}
            build.add(f"log_history[{i}]", {"step": None, **row})
    return build.curve(str(path), "hf", "set TrainingArguments(logging_steps=...) > 0")


def _tensorboard_series(files: list[Path]) -> dict[str, list[tuple[Path, ScalarEvent]]]:
    series: dict[str, list[tuple[Path, ScalarEvent]]] = {}
    for file in files:
        try:
            stream = file.open("rb")
        except OSError as exc:
            raise ReplayInputError(
                f"{file}: cannot read ({exc.strerror}); check the path"
            ) from None
        with stream:
            for event in tensorboard.iter_scalars(stream, name=str(file)):
                series.setdefault(event.tag, []).append((file, event))
    return series


def _read_tensorboard(path: Path, name: str) -> Curve:
    files = tensorboard.find_event_files(path)
    if all(file.stat().st_size == 0 for file in files):
        raise ReplayInputError(f"{name}: the file is empty; point at the file the run logged to")
    series = _tensorboard_series(files)
    loss_tag = _pick(series, "loss")
    if loss_tag is None:
        found = ", ".join(sorted(series)[:8]) or "none"
        raise ReplayInputError(
            f"{name}: no loss tag (scalar tags found: {found}); log the loss under a tag "
            "named loss, train/loss, train_loss or Loss/train"
        )
    extra = {role: _pick(series, role) for role in ("grad_norm", "lr")}
    by_step = {
        role: {e.step: e.value for _, e in series[tag]} for role, tag in extra.items() if tag
    }
    build = _Builder(name="", unit="record")
    for file, event in series[loss_tag]:
        row: dict[str, object] = {"step": event.step, "loss": event.value}
        row.update({role: values.get(event.step, math.nan) for role, values in by_step.items()})
        build.add(f"{file} record {event.record} (tag {loss_tag!r})", row)
    return build.curve(str(path), "tensorboard", "log the loss with add_scalar")


_READERS = {
    "csv": _read_csv,
    "jsonl": _read_jsonl,
    "hf": _read_hf,
    "tensorboard": _read_tensorboard,
}


def read_curve(path: str | os.PathLike[str], *, format: str | None = None) -> Curve:
    """Read a logged curve; ``format`` is one of `FORMATS`, or None to detect it.

    Args:
        path: a ``.csv``/``.tsv`` file (header ``step,loss[,grad_norm][,lr]``), a ``.jsonl``
            file (one ``{"step": .., "loss": ..}`` object per line), an HF
            ``trainer_state.json`` (or the checkpoint folder holding it), or a TensorBoard
            event file (or the run folder holding them).
        format: ``"csv"``, ``"jsonl"``, ``"hf"`` or ``"tensorboard"``; None detects it.

    Raises:
        ReplayInputError: the file is missing, empty, or not readable as a curve.

    Example:
        >>> import pathlib, tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = pathlib.Path(tmp, "run.csv")
        ...     _ = path.write_text("step,train_loss,grad-norm\\n1,2.5,1.0\\n2,nan,\\n")
        ...     curve = read_curve(path)
        >>> curve.format, curve.steps, curve.loss, curve.grad_norm, curve.lr
        ('csv', [1, 2], [2.5, nan], [1.0, nan], None)
    """
    name = os.fspath(path)
    p = Path(path)
    if not p.exists():
        raise ReplayInputError(f"{name}: no such file or folder; check the path")
    fmt = format.lower() if format is not None else detect_format(p)
    if fmt is None:
        raise ReplayInputError(
            f"{name}: cannot tell the format from the name or content; "
            f"pass --format (one of {', '.join(FORMATS)})"
        )
    if fmt not in _READERS:
        raise ReplayInputError(
            f"{name}: format {format!r} is not supported; use one of {', '.join(FORMATS)}"
        )
    if p.is_dir() and fmt in ("csv", "jsonl"):
        raise ReplayInputError(f"{name}: is a folder; pass the {fmt} file inside it")
    return _READERS[fmt](p, name)
