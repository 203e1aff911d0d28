"""The table `spikewatch incidents` prints: one row per incident, its verdict under it.

An incident with a forensics verdict gets a ``cause`` (``data``, ``state``,
``unknown``; ``-`` without one) and, under its row, the verdict's why, the action taken
and the first dataset indices it named (`spikewatch quarantine` lists them all).
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import Any

from spikewatch.errors import WireFormatError
from spikewatch.forensics.describe import named_samples
from spikewatch.forensics.verdict import Verdict

COLUMNS = (
    "run", "id", "kind", "onset_step", "detected_step", "action", "status", "cause", "reason",
)  # fmt: skip
#: Dataset indices shown under an incident (the rest: "+N more").
SHOWN_SAMPLES = 5
#: Where the verdict's lines wrap (unless ``--wide``).
LINE_WIDTH = 100
_MARK, _INDENT = "  └ ", "    "


def shorten(text: str, width: int) -> str:
    """``text`` cut at a word boundary to at most ``width`` characters, with an ellipsis.

    Example:
        >>> shorten("the loss jumped and did not come back", 24)
        'the loss jumped and did…'
        >>> shorten("short", 24)
        'short'
    """
    if len(text) <= width:
        return text
    cut = text[: width - 1]
    space = cut.rfind(" ")
    if text[width - 1] != " " and space > width // 2:  # mid-word: back to the last space
        cut = cut[:space]
    return cut.rstrip(" ,;:") + "…"


def format_table(incidents: list[dict[str, Any]], *, reason_width: int | None = 60) -> str:
    """Incidents as an aligned table; reasons shortened at a word to ``reason_width``
    characters with an ellipsis, verdicts wrapped at `LINE_WIDTH` (None: both whole,
    what ``--wide`` prints).

    Example:
        >>> print(format_table([{"run": "r", "id": "loss-spike-5", "kind": "spike",
        ...     "onset_step": 5, "detected_step": 5, "action": "watch", "status": "closed",
        ...     "reason": "one bad batch"}]))
        run  id            kind   onset_step  detected_step  action  status  cause  reason
        r    loss-spike-5  spike  5           5              watch   closed  -      one bad batch
    """
    if not incidents:
        return "no incidents"
    rows = [[str(i.get(c, "")) for c in COLUMNS] for i in incidents]
    for row, incident in zip(rows, incidents, strict=True):
        row[COLUMNS.index("cause")] = cause_of(incident)
    if reason_width is not None:
        for row in rows:
            row[-1] = shorten(row[-1], reason_width)
    widths = [max(len(c), *(len(r[k]) for r in rows)) for k, c in enumerate(COLUMNS)]
    lines = [_aligned(COLUMNS, widths)]
    wrap = None if reason_width is None else LINE_WIDTH
    for row, incident in zip(rows, incidents, strict=True):
        lines.append(_aligned(row, widths))
        if isinstance(incident.get("verdict"), dict):
            lines += verdict_lines(incident["verdict"], width=wrap)
    return "\n".join(lines)


def _aligned(values: Sequence[str], widths: list[int]) -> str:
    return "  ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)).rstrip()


def cause_of(incident: dict[str, Any]) -> str:
    """The verdict's cause, ``-`` when the incident has none.

    Example:
        >>> cause_of({"verdict": {"cause": "state"}}), cause_of({"verdict": None})
        ('state', '-')
    """
    verdict = incident.get("verdict")
    return str(verdict.get("cause", "?")) if isinstance(verdict, dict) else "-"


def verdict_lines(verdict: dict[str, Any], *, width: int | None = LINE_WIDTH) -> list[str]:
    """The lines under an incident's row: why, action, samples (wrapped at ``width``).

    Example:
        >>> v = Verdict(cause="data", incident="i", step=9, onset_step=5, why="bad batch",
        ...             action="skip the batches", samples=[
        ...                 {"position": 5, "index": i, "loss": 9.0} for i in range(8)])
        >>> print("\\n".join(verdict_lines(v.to_json())))
          └ why: bad batch
            action: skip the batches
            samples: 0, 1, 2, 3, 4 +3 more
    """
    try:
        parsed = Verdict.from_json(verdict)
    except WireFormatError as exc:  # written by hand, or by a newer spikewatch
        return [f"{_MARK}verdict unreadable: {exc}"]
    parts = [f"why: {parsed.why or 'no reason given'}", f"action: {parsed.action or 'none'}"]
    named = named_samples(parsed.samples, limit=SHOWN_SAMPLES)
    if named:
        parts.append(f"samples: {named}")
    lines: list[str] = []
    for part in parts:
        first = _MARK if not lines else _INDENT
        if width is None:
            lines.append(first + part)
        else:
            lines += textwrap.wrap(part, width, initial_indent=first,
                                   subsequent_indent=_INDENT + "  ")  # fmt: skip
    return lines
