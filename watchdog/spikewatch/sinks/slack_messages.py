"""Slack Block Kit payloads for incidents, follow-ups and digests: pure functions, no I/O.

Every message carries ``blocks`` for people and a plain ``text`` fallback for
notifications and screen readers. User-supplied strings (run names, reasons) are
escaped, because Slack reads ``&``, ``<`` and ``>`` as markup.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from spikewatch.incidents import Incident
from spikewatch.service.status import RunStatus

Block = dict[str, Any]

#: Slack rejects messages with more than 50 blocks; the digest keeps room for its frame.
MAX_DIGEST_RUNS = 45
_HEADER_LIMIT = 150  # characters Slack allows in a header block
_KIND_LABELS = {
    "spike": "Spike",
    "level_shift": "Level shift",
    "nonfinite": "Non-finite values",
    "divergence": "Divergence",
}
_STATE_ORDER = {"halted": 0, "stalled": 1, "active": 2}
_STATE_ICONS = {"halted": ":red_circle:", "stalled": ":large_orange_circle:"}


@dataclass(frozen=True, slots=True)
class SlackMessage:
    """One message: ``text`` is the fallback, ``blocks`` the Block Kit layout."""

    text: str
    blocks: list[Block]


def escape(text: str) -> str:
    """Escape the three characters Slack treats as markup.

    Example:
        >>> escape("loss <5> & rising")
        'loss &lt;5&gt; &amp; rising'
    """
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def format_value(value: float | None) -> str:
    """Four significant digits; ``n/a`` when unknown; NaN and inf spelled out.

    Example:
        >>> [format_value(v) for v in (2.30000001, 1234567.0, float("nan"), None)]
        ['2.3', '1.235e+06', 'NaN', 'n/a']
    """
    if value is None:
        return "n/a"
    if math.isnan(value):
        return "NaN"
    return f"{value:.4g}"


def _median(values: Sequence[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else None


def loss_before(window: Sequence[tuple[int, float]], onset_step: int) -> float | None:
    """Median of the finite values before the onset (None when there are none).

    Example:
        >>> loss_before([(0, 2.0), (1, 2.2), (2, 2.4), (3, 9.0)], onset_step=3)
        2.2
    """
    return _median([v for s, v in window if s < onset_step])


def loss_peak(window: Sequence[tuple[int, float]], incident: Incident) -> float | None:
    """The value at the peak step, else the largest finite value from the onset on.

    Example:
        >>> from spikewatch.incidents import Incident
        >>> inc = Incident(id="i", run="r", kind="spike", metric="loss", onset_step=3,
        ...                peak_step=4, end_step=4, transient=True, score=9.0,
        ...                action="watch", detected_step=3, reason="")
        >>> loss_peak([(2, 2.0), (3, 9.0), (4, 12.0), (5, 2.1)], inc)
        12.0
    """
    for step, value in window:
        if step == incident.peak_step:
            return value
    return max(
        (v for s, v in window if s >= incident.onset_step and math.isfinite(v)), default=None
    )


def loss_after(window: Sequence[tuple[int, float]], end_step: int | None) -> float | None:
    """Median of the finite values after the end; the latest value while none are known.

    Example:
        >>> window = [(0, 2.0), (1, 9.0), (2, 2.2), (3, 2.4), (4, 2.6)]
        >>> loss_after(window, end_step=1), loss_after(window, end_step=None)
        (2.4, 2.6)
    """
    after = [v for s, v in window if end_step is not None and s > end_step]
    median = _median(after)
    if median is not None:
        return median
    return window[-1][1] if window else None


def _field(label: str, value: str) -> Block:
    return {"type": "mrkdwn", "text": f"*{label}*\n{value}"}


def _section(text: str) -> Block:
    return {"type": "section", "text": {"type": "mrkdwn", "text": text}}


def _header(text: str) -> Block:
    clipped = text if len(text) <= _HEADER_LIMIT else text[: _HEADER_LIMIT - 1] + "…"
    return {"type": "header", "text": {"type": "plain_text", "text": clipped, "emoji": True}}


def incident_message(
    incident: Incident,
    window: Sequence[tuple[int, float]],
    *,
    decision_reason: str | None = None,
    note: str | None = None,
) -> SlackMessage:
    """The incident message: header, eight fields, the reason, and an optional note.

    Example:
        >>> from spikewatch.incidents import Incident
        >>> inc = Incident(id="i7", run="run-1", kind="spike", metric="loss", onset_step=3,
        ...                peak_step=4, end_step=4, transient=True, score=9.0,
        ...                action="rollback", detected_step=4, reason="z=9")
        >>> msg = incident_message(inc, [(2, 2.0), (3, 9.0), (4, 12.0), (5, 2.1)])
        >>> msg.text
        'Spike in run-1 at step 4 (onset 3): loss 2 → peak 12 → 2.1; decision: rollback'
        >>> msg.blocks[0]["text"]["text"]
        ':rotating_light: Spike in run-1'
    """
    kind = _KIND_LABELS.get(incident.kind, incident.kind)
    run = escape(incident.run)
    before = format_value(loss_before(window, incident.onset_step))
    peak = format_value(loss_peak(window, incident))
    after = format_value(loss_after(window, incident.end_step))
    reason = escape(decision_reason or incident.reason or "no reason given")
    fields = [
        _field("Run", run),
        _field("Detected at step", str(incident.detected_step)),
        _field("Onset step", str(incident.onset_step)),
        _field("Metric", escape(incident.metric)),
        _field("Before (median)", before),
        _field("Peak", f"{peak} at step {incident.peak_step}"),
        _field("After", after),
        _field("Decision", f"`{escape(incident.action)}`"),
    ]
    context = f"incident `{escape(incident.id)}` · score {incident.score:.1f} · {incident.status}"
    blocks: list[Block] = [
        _header(f":rotating_light: {kind} in {incident.run}"),
        {"type": "section", "fields": fields},
        _section(f"*Reason*\n{reason}"),
        {"type": "context", "elements": [{"type": "mrkdwn", "text": context}]},
    ]
    text = (
        f"{kind} in {run} at step {incident.detected_step} (onset {incident.onset_step}): "
        f"{escape(incident.metric)} {before} → peak {peak} → {after}; "
        f"decision: {escape(incident.action)}"
    )
    if note:
        blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": escape(note)}]})
        text += f" ({note})"
    return SlackMessage(text=text, blocks=blocks)


def follow_up_message(run: str, incident_id: str, text: str, *, threaded: bool) -> SlackMessage:
    """A follow-up: the bare text in the incident's thread, else naming the incident.

    Example:
        >>> follow_up_message("run-1", "i7", "rolled back to step 300", threaded=False).text
        'Follow-up on incident `i7` in *run-1*: rolled back to step 300'
    """
    body = escape(text)
    if not threaded:
        body = f"Follow-up on incident `{escape(incident_id)}` in *{escape(run)}*: {body}"
    return SlackMessage(text=body, blocks=[_section(body)])


def format_period(period_s: float) -> str:
    """A digest period in words.

    Example:
        >>> format_period(86400), format_period(3600 * 6), format_period(900)
        ('24 h', '6 h', '15 min')
    """
    if period_s >= 3600:
        return f"{period_s / 3600:.3g} h"
    return f"{period_s / 60:.3g} min"


def _run_line(status: RunStatus) -> str:
    icon = _STATE_ICONS.get(status.state, ":large_green_circle:")
    step = "n/a" if status.last_step is None else str(status.last_step)
    return (
        f"{icon} *{escape(status.run)}* — {status.state}\n"
        f"step {step} · loss {format_value(status.loss)} · "
        f"incidents {status.incidents_total} ({status.incidents_open} open) · "
        f"rollbacks {status.rollbacks}"
    )


def digest_message(runs: Sequence[RunStatus], *, period_s: float) -> SlackMessage:
    """A summary of every run, halted and stalled ones first.

    Example:
        >>> from spikewatch.service.status import RunStatus
        >>> run = RunStatus(run="run-1", state="active", records=10, last_step=9,
        ...                 last_record_time=0.0, loss=2.5, grad_norm=None, lr=None,
        ...                 spike_score=0.0, incidents_total=2, rollbacks=1)
        >>> msg = digest_message([run], period_s=86400)
        >>> msg.text
        'spikewatch digest (last 24 h): 1 run (0 halted, 0 stalled), 2 incidents, 1 rollback'
        >>> print(msg.blocks[2]["text"]["text"])
        :large_green_circle: *run-1* — active
        step 9 · loss 2.5 · incidents 2 (0 open) · rollbacks 1
    """
    ordered = sorted(runs, key=lambda r: (_STATE_ORDER.get(r.state, 3), r.run))
    halted = sum(r.state == "halted" for r in runs)
    stalled = sum(r.state == "stalled" for r in runs)
    incidents = sum(r.incidents_total for r in runs)
    rollbacks = sum(r.rollbacks for r in runs)
    period = format_period(period_s)
    summary = (
        f"{len(runs)} run{'s' * (len(runs) != 1)} ({halted} halted, {stalled} stalled), "
        f"{incidents} incident{'s' * (incidents != 1)}, "
        f"{rollbacks} rollback{'s' * (rollbacks != 1)}"
    )
    blocks: list[Block] = [_header(f"spikewatch digest — last {period}"), _section(summary)]
    blocks += [_section(_run_line(r)) for r in ordered[:MAX_DIGEST_RUNS]]
    if len(ordered) > MAX_DIGEST_RUNS:
        more = f"… and {len(ordered) - MAX_DIGEST_RUNS} more runs (see /v1/runs)"
        blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": more}]})
    if not runs:
        blocks.append(_section(f"No runs reported in the last {period}."))
    return SlackMessage(text=f"spikewatch digest (last {period}): {summary}", blocks=blocks)
