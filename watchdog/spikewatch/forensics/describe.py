"""A verdict in words for people: its numbers and the samples it named (CLI, Slack).

Pure functions over a `Verdict`; `spikewatch incidents` and the Slack sink say a verdict
the same way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from spikewatch.forensics.verdict import Verdict

#: How each cause reads in a sentence.
CAUSE_WORDS = {"data": "bad data", "state": "the model's state", "unknown": "cause unknown"}


def _value(value: float | None) -> str:
    if value is None:
        return "n/a"
    return "NaN" if math.isnan(value) else f"{value:.4g}"


def loss_numbers(verdict: Verdict) -> str:
    """Suspect against reference median loss, and their ratio when both are known.

    Example:
        >>> v = Verdict(cause="data", incident="r:1", step=30, onset_step=10,
        ...             suspect_loss=5.6, reference_loss=2.0)
        >>> loss_numbers(v)
        'suspect loss 5.6 vs reference 2 (x2.8)'
        >>> loss_numbers(Verdict(cause="unknown", incident="r:1", step=30, onset_step=10))
        'suspect loss n/a vs reference n/a'
    """
    text = (
        f"suspect loss {_value(verdict.suspect_loss)} vs reference {_value(verdict.reference_loss)}"
    )
    ratio = verdict.ratio
    return text if ratio is None or not math.isfinite(ratio) else f"{text} (x{ratio:.2g})"


def dataset_indices(samples: Sequence[Mapping[str, Any]]) -> list[int]:
    """The named samples' dataset indices, sorted, each once (unknown ones left out).

    Example:
        >>> dataset_indices([{"index": 41}, {"index": 7}, {"index": None}, {"index": 7}])
        [7, 41]
    """
    return sorted({int(s["index"]) for s in samples if s.get("index") is not None})


def named_samples(samples: Sequence[Mapping[str, Any]], *, limit: int) -> str:
    """The first ``limit`` dataset indices and ``+N more``; samples whose index the hook
    could not tell are named by their batch's data position ("" when none were named).

    Example:
        >>> named_samples([{"position": 3, "index": i, "loss": 9.0} for i in range(12)],
        ...               limit=10)
        '0, 1, 2, 3, 4, 5, 6, 7, 8, 9 +2 more'
        >>> named_samples([{"position": 11, "index": 40, "loss": 9.0},
        ...                {"position": 12, "index": None, "loss": 8.0}], limit=10)
        '40; 1 without a dataset index (batch at data position 12)'
    """
    indices = dataset_indices(samples)
    parts = []
    if indices:
        shown = ", ".join(str(i) for i in indices[:limit])
        more = len(indices) - limit
        parts.append(f"{shown} +{more} more" if more > 0 else shown)
    unindexed = [s for s in samples if s.get("index") is None]
    if unindexed:
        positions = sorted({int(s["position"]) for s in unindexed})
        where = ", ".join(str(p) for p in positions[:limit]) + (" ..." * (len(positions) > limit))
        batch = "batch at data position" if len(positions) == 1 else "batches at data positions"
        parts.append(f"{len(unindexed)} without a dataset index ({batch} {where})")
    return "; ".join(parts)
