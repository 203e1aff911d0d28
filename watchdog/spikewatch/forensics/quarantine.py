"""The quarantine file: samples a ``data`` verdict named, one JSON object per line.

Each line: ``{"run", "step", "position", "index", "loss", "reference_loss", "reason",
"time"}`` (``index``: the sample's dataset index; None when the hook could not tell
it, and then only the batch ``position`` is known). Lines are only ever appended, so a
crash mid-write loses at most the last line, which `read` then skips with a warning.
A resumed run and every later epoch skip the indices in it; ``spikewatch quarantine
FILE`` lists them for dataset cleaning.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from spikewatch.forensics.verdict import Verdict

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuarantineEntry:
    """One quarantined sample (see the module docstring for the fields)."""

    run: str
    step: int
    position: int
    index: int | None
    loss: float
    reference_loss: float | None
    reason: str
    time: float

    @classmethod
    def from_json(cls, data: dict[str, object]) -> QuarantineEntry:
        """One line of the file; a missing or mistyped field raises ``ValueError``."""
        index = data.get("index")
        ref = data.get("reference_loss")
        return cls(
            run=str(data["run"]),
            step=int(data["step"]),  # type: ignore[call-overload]
            position=int(data["position"]),  # type: ignore[call-overload]
            index=None if index is None else int(index),  # type: ignore[call-overload]
            loss=float(data["loss"]),  # type: ignore[arg-type]
            reference_loss=None if ref is None else float(ref),  # type: ignore[arg-type]
            reason=str(data.get("reason", "")),
            time=float(data.get("time", 0.0)),  # type: ignore[arg-type]
        )


def entries_of(verdict: Verdict, run: str) -> list[QuarantineEntry]:
    """The lines a ``data`` verdict adds: one per named sample."""
    now = time.time()
    return [
        QuarantineEntry(
            run=run,
            step=verdict.step,
            position=int(s["position"]),
            index=None if s.get("index") is None else int(s["index"]),
            loss=float(s["loss"]),
            reference_loss=verdict.reference_loss,
            reason=f"incident {verdict.incident}: {verdict.why}",
            time=now,
        )
        for s in verdict.samples
    ]


def append(path: str | os.PathLike[str], entries: Iterable[QuarantineEntry]) -> int:
    """Append ``entries`` to the file (created with its folder); return how many.

    Example:
        >>> import tempfile
        >>> folder = tempfile.mkdtemp()
        >>> e = QuarantineEntry(run="r", step=9, position=4, index=17, loss=5.5,
        ...                     reference_loss=2.0, reason="random bytes", time=0.0)
        >>> append(f"{folder}/q.jsonl", [e, e])
        2
        >>> quarantined_indices(f"{folder}/q.jsonl")
        {17}
    """
    lines = [json.dumps(asdict(e)) + "\n" for e in entries]
    if not lines:
        return 0
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("a", encoding="utf-8") as out:
        out.write("".join(lines))
        out.flush()
        os.fsync(out.fileno())
    return len(lines)


def read(path: str | os.PathLike[str]) -> list[QuarantineEntry]:
    """Every entry in the file ([] when it does not exist); bad lines are skipped with a
    warning naming the line (a line cut short by a crash, an edit by hand)."""
    target = Path(path)
    if not target.exists():
        return []
    out = []
    for number, line in enumerate(target.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(QuarantineEntry.from_json(json.loads(line)))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("spikewatch: %s line %d is not a quarantine entry (%s)", path, number, exc)
    return out


def quarantined_indices(path: str | os.PathLike[str]) -> set[int]:
    """The dataset indices in the file (entries without an index are not counted)."""
    return {e.index for e in read(path) if e.index is not None}
