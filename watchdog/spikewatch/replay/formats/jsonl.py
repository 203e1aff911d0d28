"""JSON-lines curves: one object per line (LLaMA-Factory's ``trainer_log.jsonl`` too)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from spikewatch.errors import ReplayInputError
from spikewatch.replay.formats.builder import ROLES, CurveBuilder, pick, read_text
from spikewatch.replay.model import Curve

TRUNCATED = "truncated"


def json_rows(name: str, text: str, build: CurveBuilder) -> Iterator[tuple[int, dict[str, object]]]:
    """Yield ``(line number, object)`` for each non-blank line of ``text``.

    A last line cut off mid-object (the writer was stopped) is counted as dropped, not
    an error: the lines before it are good data.

    Example:
        >>> build = CurveBuilder(name="log.jsonl", unit="line")
        >>> list(json_rows("log.jsonl", '{"step": 1}\\n\\n{"step": 2, "lo', build))
        [(1, {'step': 1})]
        >>> dict(build.dropped)
        {'truncated': 1}
    """
    lines = text.splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines) and not text.endswith("\n"):
                build.drop(TRUNCATED)
                return
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


def read_jsonl(path: Path, name: str) -> Curve:
    """Read a JSON-lines curve; keys are matched by the aliases (``current_steps``, ...).

    Example:
        >>> import pathlib, tempfile
        >>> lines = ('{"current_steps": 10, "total_steps": 20, "loss": 2.5, "lr": 1e-4}\\n'
        ...          '{"current_steps": 10, "total_steps": 20, "eval_loss": 2.7}\\n'
        ...          '{"current_steps": 20, "total_steps": 20, "loss": 2.4}\\n')
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = pathlib.Path(tmp, "trainer_log.jsonl")
        ...     _ = path.write_text(lines)
        ...     curve = read_jsonl(path, str(path))
        >>> curve.steps, curve.lr, curve.dropped
        ([10, 20], [0.0001, None], {'no loss': 1})
    """
    build = CurveBuilder(name=name, unit="line")
    for number, row in json_rows(name, read_text(path, name), build):
        keys = {role: pick(row, role) for role in ROLES}
        values = {role: row[key] for role, key in keys.items() if key is not None}
        if keys["step"] is None and values.get("loss") is not None:
            raise build.fail(f"line {number}", "no step key", 'add "step": N to every line')
        build.add(f"line {number}", values)
    fix = 'write one object per line, e.g. {"step": 1, "loss": 2.31}'
    return build.curve(str(path), "jsonl", fix)
