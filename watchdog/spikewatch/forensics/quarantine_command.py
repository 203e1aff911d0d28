"""``spikewatch quarantine FILE``: the samples forensics quarantined, for dataset cleaning.

One row per dataset index (how often it was quarantined, its worst loss against the
reference of that probe, the runs, the first step), then the entries whose index the
hook could not tell, by their batch's data position; ``--indices`` prints only the
sorted indices (for a script that drops them from the data set), ``--json`` the entries.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from spikewatch.errors import SpikewatchError
from spikewatch.forensics.quarantine import QuarantineEntry, read

_FIX = "pass the quarantine file the trainer writes (JSON lines, one sample per line)"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``quarantine`` to the command line."""
    p = subparsers.add_parser(
        "quarantine",
        help="list the samples forensics quarantined (a quarantine file)",
        description="List a quarantine file by dataset index, for cleaning the data set.",
    )
    p.add_argument("path", metavar="FILE", help="the quarantine file (JSON lines)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print the entries as JSON lines")
    out.add_argument("--indices", action="store_true", help="print only the sorted dataset indices")
    p.set_defaults(handler=run)


@dataclass(frozen=True)
class Group:
    """The entries of one dataset index (or of one batch position without an index)."""

    key: int
    entries: list[QuarantineEntry]

    @property
    def worst(self) -> QuarantineEntry:
        """The entry with the highest loss (its reference is the one shown)."""
        return max(self.entries, key=lambda e: e.loss)

    def row(self) -> list[str]:
        """The table row: key, times, max loss, its reference, runs, first step."""
        runs = sorted({e.run for e in self.entries})
        shown = ", ".join(runs[:3]) + (f" +{len(runs) - 3}" if len(runs) > 3 else "")
        ref = self.worst.reference_loss
        return [
            str(self.key), str(len(self.entries)), f"{self.worst.loss:.4g}",
            "n/a" if ref is None else f"{ref:.4g}", shown, str(min(e.step for e in self.entries)),
        ]  # fmt: skip


def groups(
    entries: Sequence[QuarantineEntry], key: Callable[[QuarantineEntry], int | None]
) -> list[Group]:
    """``entries`` grouped by ``key`` (None: left out), sorted by it.

    Example:
        >>> e = [QuarantineEntry(run="r", step=s, position=p, index=i, loss=l,
        ...                      reference_loss=2.0, reason="", time=0.0)
        ...      for s, p, i, l in [(9, 4, 17, 5.5), (30, 8, 3, 7.0), (50, 2, 17, 8.0)]]
        >>> [(g.key, len(g.entries), g.worst.loss) for g in groups(e, lambda x: x.index)]
        [(3, 1, 7.0), (17, 2, 8.0)]
    """
    by_key: dict[int, list[QuarantineEntry]] = {}
    for entry in entries:
        k = key(entry)
        if k is not None:
            by_key.setdefault(k, []).append(entry)
    return [Group(k, by_key[k]) for k in sorted(by_key)]


def _table(header: Sequence[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    return [
        "  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip()
        for line in [list(header), *rows]
    ]


def format_report(entries: Sequence[QuarantineEntry], path: str) -> str:
    """The listing: indices, then entries without an index by position, then a total.

    Example:
        >>> e = [QuarantineEntry(run="gpt", step=530, position=p, index=i, loss=9.0,
        ...                      reference_loss=2.0, reason="", time=0.0)
        ...      for p, i in [(501, 4711), (501, 17), (502, None)]]
        >>> print(format_report(e, "q.jsonl"))
        index  times  max_loss  ref_loss  runs  first_step
        17     1      9         2         gpt   530
        4711   1      9         2         gpt   530
        <BLANKLINE>
        without a dataset index, by the batch's data position:
        position  times  max_loss  ref_loss  runs  first_step
        502       1      9         2         gpt   530
        <BLANKLINE>
        q.jsonl: 3 entries, 2 dataset indices, 1 entry without an index
    """
    if not entries:
        return f"{path}: no quarantined samples"
    columns = ("times", "max_loss", "ref_loss", "runs", "first_step")
    lines: list[str] = []
    indexed = groups(entries, lambda e: e.index)
    if indexed:
        lines += _table(("index", *columns), [g.row() for g in indexed])
    unindexed = [e for e in entries if e.index is None]
    if unindexed:
        by_position = groups(unindexed, lambda e: e.position)
        lines += ["", "without a dataset index, by the batch's data position:"] if lines else []
        lines += _table(("position", *columns), [g.row() for g in by_position])
    n, k, u = len(entries), len(indexed), len(unindexed)
    total = (
        f"{path}: {n} entr{'y' if n == 1 else 'ies'}, {k} dataset ind{'ex' if k == 1 else 'ices'}"
        f", {u} entr{'y' if u == 1 else 'ies'} without an index"
    )
    return "\n".join([*lines, "", total])


def load(path: str) -> list[QuarantineEntry]:
    """The file's entries; raises `SpikewatchError` naming the path and the fix when it
    is missing, unreadable, or holds lines but no quarantine entry."""
    target = Path(path)
    if not target.is_file():
        what = "is a directory" if target.is_dir() else "does not exist"
        raise SpikewatchError(f"{path!r} {what}: {_FIX}")
    try:
        entries = read(target)
        lines = sum(1 for line in target.read_text(encoding="utf-8").splitlines() if line.strip())
    except UnicodeDecodeError as exc:
        raise SpikewatchError(f"{path!r} is not UTF-8 text ({exc}): {_FIX}") from None
    except OSError as exc:
        raise SpikewatchError(f"{path!r} cannot be read ({exc}): check its permissions") from None
    if lines and not entries:
        plural = "s" * (lines != 1)
        raise SpikewatchError(
            f"{path!r} holds no quarantine entry in its {lines} line{plural}: {_FIX}"
        )
    return entries


def run(args: argparse.Namespace) -> int:
    """Print the quarantine file's listing, its indices, or its entries."""
    entries = load(args.path)
    if args.json:
        text = "".join(json.dumps(dataclasses.asdict(e)) + "\n" for e in entries)
    elif args.indices:
        indices = sorted({e.index for e in entries if e.index is not None})
        text = "".join(f"{i}\n" for i in indices)
    else:
        text = format_report(entries, args.path) + "\n"
    sys.stdout.write(text)
    return 0
