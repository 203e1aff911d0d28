"""The Slack message for a forensics verdict, posted in its incident's thread (pure).

It says what the probe found (the cause), the numbers behind it (suspect against
reference loss), what the policy did with it, and either the samples it named (the
first `SHOWN_SAMPLES` dataset indices) or, when it could not tell, why.
"""

from __future__ import annotations

import math

from spikewatch.forensics.describe import CAUSE_WORDS, loss_numbers, named_samples
from spikewatch.forensics.verdict import Verdict
from spikewatch.sinks.slack_messages import Block, SlackMessage, escape, format_value

#: Dataset indices listed in the message (the rest are "+N more").
SHOWN_SAMPLES = 10
_ICONS = {"data": ":mag:", "state": ":brain:", "unknown": ":grey_question:"}
_SECTION_LIMIT = 2900  # characters Slack allows in a section's text is 3000


def _clip(text: str) -> str:
    return text if len(text) <= _SECTION_LIMIT else text[: _SECTION_LIMIT - 1] + "…"


def _field(label: str, value: str) -> Block:
    return {"type": "mrkdwn", "text": _clip(f"*{label}*\n{value}")}


def _section(text: str) -> Block:
    return {"type": "section", "text": {"type": "mrkdwn", "text": _clip(text)}}


def _found(verdict: Verdict) -> Block | None:
    """What the probe named: samples, else outlier batches (None: it named nothing)."""
    if verdict.samples:
        count = len(verdict.samples)
        names = escape(named_samples(verdict.samples, limit=SHOWN_SAMPLES))
        return _section(f"*Samples named* ({count}; dataset indices)\n{names}")
    if verdict.outlier_positions:
        positions = ", ".join(str(p) for p in verdict.outlier_positions[:SHOWN_SAMPLES])
        more = len(verdict.outlier_positions) - SHOWN_SAMPLES
        positions += f" +{more} more" if more > 0 else ""
        return _section(f"*Outlier batches* (data positions)\n{positions}")
    return None


def _probed(verdict: Verdict) -> str:
    where = f"incident `{escape(verdict.incident)}`"
    batches = len(verdict.suspect_positions)
    if not batches:
        return f"{where} · no suspect batch probed"
    cost = f" ({verdict.forward_passes} forward passes, {verdict.seconds:.1f} s)"
    return f"{where} · {batches} suspect batches probed" + (cost * bool(verdict.forward_passes))


def verdict_message(
    run: str, incident_id: str, verdict: Verdict, *, threaded: bool
) -> SlackMessage:
    """The verdict's Block Kit message (naming the incident when it has no thread).

    Example:
        >>> v = Verdict(cause="data", incident="loss-spike-500", step=530, onset_step=500,
        ...             suspect_positions=[500, 501], outlier_positions=[501],
        ...             suspect_loss=5.6, reference_loss=2.0,
        ...             samples=[{"position": 501, "index": 4711, "loss": 9.5}],
        ...             why="1 of 2 suspect batches stand out", action="skip the batches")
        >>> msg = verdict_message("gpt-1b", v.incident, v, threaded=True)
        >>> print(msg.text)  # doctest: +NORMALIZE_WHITESPACE
        Forensics: bad data. suspect loss 5.6 vs reference 2 (x2.8); action: skip the
        batches; samples: 4711
        >>> print(msg.blocks[2]["text"]["text"])
        *Samples named* (1; dataset indices)
        4711
    """
    cause = CAUSE_WORDS.get(verdict.cause, verdict.cause)
    numbers = loss_numbers(verdict)
    action = escape(verdict.action or "none reported")
    title = f"{_ICONS.get(verdict.cause, '')} *Forensics: {cause}*".strip()
    if not threaded:
        title += f" (incident `{escape(incident_id)}` in *{escape(run)}*)"
    suspect = format_value(verdict.suspect_loss)
    ratio = verdict.ratio
    if ratio is not None and math.isfinite(ratio):
        suspect += f" (x{ratio:.2g} the reference)"
    fields = [
        _field("Cause", f"`{verdict.cause}`"),
        _field("Action", action),
        _field("Suspect loss (median)", suspect),
        _field("Reference loss (median)", format_value(verdict.reference_loss)),
    ]
    blocks: list[Block] = [_section(title), {"type": "section", "fields": fields}]
    found = _found(verdict)
    if found is not None:
        blocks.append(found)
    label = "Why the probe could not tell" if verdict.cause == "unknown" else "Why"
    blocks.append(_section(f"*{label}*\n{escape(verdict.why or 'no reason given')}"))
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": _probed(verdict)}]})
    text = f"Forensics: {cause}. {numbers}; action: {action}"
    if verdict.samples:
        text += f"; samples: {escape(named_samples(verdict.samples, limit=SHOWN_SAMPLES))}"
    elif verdict.cause == "unknown":
        text += f"; {escape(verdict.why)}"
    if not threaded:
        text += f" (incident {escape(incident_id)} in {escape(run)})"
    return SlackMessage(text=text, blocks=blocks)
