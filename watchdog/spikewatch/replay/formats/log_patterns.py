"""Patterns that find the step, loss, grad norm and lr in a plain-text training log.

Each built-in pattern copies the line one trainer prints (checked against its source):

==================  =================================================================
nanogpt             ``iter 100: loss 4.2345, time 123.45ms, mfu 12.34%`` (train.py)
llm.c               ``step    1/19073 | train loss 11.009390 | norm 15.4006 | lr 8.39e-07``
                    (train_gpt2.py), ``step    1/74 | loss 7.234567 (+0.00z)| norm ...``
                    (train_gpt2.cu), ``step 0: train loss 5.356086 (took 1234.5 ms)``
                    (train_gpt2.c), ``s:100 trl:3.2345 lr:0.000600 norm:0.35`` (main.log)
modded-nanogpt      ``step:100/6200 train_loss:4.2345 train_time:12345ms step_avg:...``
megatron            `` iteration      100/  500000 | ... | learning rate: 1.000E-04 |
                    ... | lm loss: 4.234567E+00 | loss scale: 1.0 | grad norm: 1.234 |``
==================  =================================================================

A pattern's ``line`` regex is searched in each line (so timestamps and rank prefixes
do no harm) and must capture ``step``; the other values come from its named groups or
from ``fields`` regexes searched in the same line (their order differs between
versions). A line that matches but has no loss (an evaluation line of the same step
series, a Megatron interval whose iterations were all skipped) is dropped as "no loss".
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from spikewatch.errors import ReplayInputError
from spikewatch.replay.formats.builder import ROLES

#: A number as the trainers print it: ``4.2345``, ``4.234567E+00``, ``8.39e-07``, ``nan``,
#: ``-nan`` (C's printf), ``inf``.
NUMBER = r"[-+]?(?:(?i:nan|inf(?:inity)?)|\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?)"
_EXAMPLE = r"step (?P<step>\d+) loss (?P<loss>\S+)"


@dataclass(frozen=True)
class LogPattern:
    """How to read one trainer's log lines; ``format`` is what the curve reports."""

    format: str
    line: re.Pattern[str]
    fields: Mapping[str, re.Pattern[str]] = field(default_factory=dict)

    def parse(self, text: str) -> dict[str, str] | None:
        """The raw values in one line, by role; None when the line is not a log line.

        Example:
            >>> NANOGPT.parse("iter 20: loss 4.1234, time 95.12ms, mfu 31.20%")
            {'step': '20', 'loss': '4.1234'}
            >>> NANOGPT.parse("step 0: train loss 10.9, val loss 10.9") is None
            True
        """
        match = self.line.search(text)
        if match is None:
            return None
        values = {k: v for k, v in match.groupdict().items() if v is not None}
        for role, regex in self.fields.items():
            found = regex.search(text)
            if found is not None:
                values[role] = found.group(1)
        return values


def _builtin(name: str, line: str, **fields: str) -> LogPattern:
    """A built-in pattern; ``{n}`` in a regex stands for `NUMBER`."""

    def compile_(regex: str) -> re.Pattern[str]:
        return re.compile(regex.replace("{n}", NUMBER))

    return LogPattern(
        format=f"text:{name}",
        line=compile_(line),
        fields={role: compile_(regex) for role, regex in fields.items()},
    )


NANOGPT = _builtin("nanogpt", r"\biter (?P<step>\d+): loss (?P<loss>{n}), time")
BUILTIN: tuple[LogPattern, ...] = (
    NANOGPT,
    _builtin(
        "llm.c",
        r"\bstep\s+(?P<step>\d+)/\d+\s*[|:]\s*(?:train )?loss (?P<loss>{n})",
        grad_norm=r"\bnorm ({n})",
        lr=r"\blr ({n})",
    ),
    _builtin("llm.c", r"\bstep (?P<step>\d+): train loss (?P<loss>{n}) \(took "),
    _builtin(
        "llm.c",
        r"^s:(?P<step>\d+) (?:trl:(?P<loss>{n}))?",
        lr=r"\blr:({n})",
        grad_norm=r"\bnorm:({n})",
    ),
    _builtin("modded-nanogpt", r"\bstep:(?P<step>\d+)/\d+ (?:train_loss:(?P<loss>{n}))?"),
    _builtin(
        "megatron",
        r"\biteration\s+(?P<step>\d+)/\s*\d+\s*\|",
        loss=r"\|\s*(?:lm )?loss:\s*({n})",
        lr=r"\|\s*learning rate:\s*({n})",
        grad_norm=r"\|\s*grad norm:\s*({n})",
    ),
)


def detect(lines: Sequence[str]) -> LogPattern | None:
    """The built-in pattern of the first line that yields a loss, if any.

    Example:
        >>> detect(["number of parameters: 10.65M",
        ...         "step 0: train loss 4.2874, val loss 4.2823",
        ...         "iter 0: loss 4.2649, time 9519.05ms, mfu -100.00%"]).format
        'text:nanogpt'
    """
    for text in lines:
        for pattern in BUILTIN:
            values = pattern.parse(text)
            if values is not None and "loss" in values:
                return pattern
    return None


def compile_pattern(regex: str) -> LogPattern:
    """A user's ``--pattern``: a regex searched in each line, with named groups ``step``,
    ``loss`` and optionally ``grad_norm`` and ``lr``.

    Raises:
        ReplayInputError: the regex does not compile, lacks ``step`` or ``loss``, or
            names a group that is none of these.

    Example:
        >>> compile_pattern(r"it=(?P<step>\\d+) l=(?P<loss>\\S+)").parse("it=3 l=2.5")
        {'step': '3', 'loss': '2.5'}
    """
    where = f"--pattern {regex!r}"
    try:
        compiled = re.compile(regex)
    except re.error as exc:
        raise ReplayInputError(
            f"{where}: not a valid regular expression ({exc.msg} at position {exc.pos}); "
            f"fix it, e.g. {_EXAMPLE!r}"
        ) from None
    unknown = sorted(set(compiled.groupindex) - set(ROLES))
    if unknown:
        raise ReplayInputError(
            f"{where}: group {unknown[0]!r} is not one of {', '.join(ROLES)}; rename it, "
            "or make it unnamed with (?:...)"
        )
    for role in ("step", "loss"):
        if role not in compiled.groupindex:
            raise ReplayInputError(
                f"{where}: no (?P<{role}>...) group; name the {role} group, e.g. {_EXAMPLE!r}"
            )
    return LogPattern(format="text", line=compiled)
