"""Plain-text training logs: one regex per line, built in for known trainers or ``--pattern``."""

from __future__ import annotations

from pathlib import Path

from spikewatch.errors import ReplayInputError
from spikewatch.replay.formats import log_patterns
from spikewatch.replay.formats.builder import CurveBuilder, read_text
from spikewatch.replay.formats.log_patterns import LogPattern
from spikewatch.replay.model import Curve

#: Why a non-blank line that no pattern matched was dropped. A log is mostly other
#: output (config dumps, timers, warnings), so the count is reported, not an error.
NO_MATCH = "no match"
_BUILTIN_NAMES = "nanoGPT, llm.c, modded-nanogpt or Megatron-LM"


def read_text_log(path: Path, name: str, *, pattern: LogPattern | None = None) -> Curve:
    """Read the lines of ``path`` that ``pattern`` (or the detected built-in one) matches.

    Example:
        >>> import pathlib, tempfile
        >>> log = ("Overriding config with config/train_shakespeare_char.py\\n"
        ...        "step 0: train loss 4.2874, val loss 4.2823\\n"
        ...        "iter 0: loss 4.2649, time 9519.05ms, mfu -100.00%\\n"
        ...        "iter 10: loss 3.1397, time 95.61ms, mfu 3.90%\\n")
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = pathlib.Path(tmp, "train.log")
        ...     _ = path.write_text(log)
        ...     curve = read_text_log(path, str(path))
        >>> curve.format, curve.steps, curve.loss, curve.dropped
        ('text:nanogpt', [0, 10], [4.2649, 3.1397], {'no match': 2})
    """
    lines = read_text(path, name).splitlines()
    chosen = pattern if pattern is not None else log_patterns.detect(lines)
    if chosen is None:
        raise ReplayInputError(
            f"{name}: no line looks like a {_BUILTIN_NAMES} log line; pass "
            r"--pattern with named groups step and loss, e.g. 'step (?P<step>\d+) loss "
            r"(?P<loss>\S+)'"
        )
    fix = "fix the value, or narrow the --pattern group to the number"
    build = CurveBuilder(name=name, unit="line", value_fix=fix if pattern else "")
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        values = chosen.parse(text)
        if values is None:
            build.drop(NO_MATCH)
        else:
            build.add(f"line {number}", values)
    empty_fix = "check --pattern against a line of the log (it is searched in every line)"
    return build.curve(str(path), chosen.format, empty_fix)
