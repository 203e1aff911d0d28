"""The ``spikewatch replay`` subcommand: read a logged curve, replay it, report the events."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import TextIO

from spikewatch.errors import bad_value
from spikewatch.replay.model import Curve, ReplayReport
from spikewatch.replay.readers import FORMATS, read_curve
from spikewatch.replay.timeline import format_decisions

#: Curves longer than this get a progress bar (when stderr is a terminal).
PROGRESS_MIN_POINTS = 5000
PLOT_SUFFIXES = (".png", ".svg", ".pdf")
_COLUMNS = ("kind", "metric", "onset", "peak", "end", "transient", "score", "action")


class ProgressBar:
    """A one-line text progress bar, redrawn in place; called as ``bar(done, total)``.

    Example:
        >>> import io
        >>> out = io.StringIO()
        >>> bar = ProgressBar(out, width=10)
        >>> bar(500, 1000)
        >>> bar.close()
        >>> out.getvalue()
        '\\rreplay [#####.....]  50%  500/1000 steps\\n'
    """

    def __init__(self, stream: TextIO, *, width: int = 30, label: str = "replay") -> None:
        self.stream = stream
        self.width = width
        self.label = label
        self._shown = -1
        self._drawn = False

    def __call__(self, done: int, total: int) -> None:
        percent = 100 * done // total if total > 0 else 100
        if percent == self._shown:
            return  # redraw only when the number changes: terminals are slow
        self._shown = percent
        filled = self.width * percent // 100
        bar = "#" * filled + "." * (self.width - filled)
        self.stream.write(f"\r{self.label} [{bar}] {percent:3d}%  {done}/{total} steps")
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        """End the bar's line, so what is written next starts on a fresh one."""
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()


def format_table(report: ReplayReport) -> str:
    """The events as an aligned text table (one header line, one line per event).

    Example:
        >>> from spikewatch.replay.model import ReplayEvent
        >>> event = ReplayEvent(kind="spike", metric="loss", onset_step=300, peak_step=300,
        ...                     end_step=300, transient=True, score=14.21, action="watch",
        ...                     detected_step=300)
        >>> print(format_table(ReplayReport(points=600, events=[event])))
        kind   metric  onset  peak  end  transient  score  action
        spike  loss      300   300  300  yes         14.2  watch
    """
    rows = [_COLUMNS] + [
        (
            e.kind,
            e.metric,
            str(e.onset_step),
            str(e.peak_step),
            "open" if e.end_step is None else str(e.end_step),
            "-" if e.transient is None else "yes" if e.transient else "no",
            f"{e.score:.1f}",
            e.action,
        )
        for e in report.events
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    numeric = {2, 3, 4, 6}  # right-align numbers so digits line up
    lines = [
        "  ".join(
            cell.rjust(w) if i in numeric and n else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for n, row in enumerate(rows)
    ]
    return "\n".join(lines)


def format_summary(curve: Curve, report: ReplayReport) -> str:
    """One line: file, format, points, events and how many of each action.

    Example:
        >>> curve = Curve(path="run.csv", format="csv", steps=[1, 2], loss=[2.0, 1.9])
        >>> format_summary(curve, ReplayReport(points=2))
        'run.csv (csv): 2 points, 0 events'
        >>> curve.dropped = {"no loss": 3}
        >>> format_summary(curve, ReplayReport(points=2))
        'run.csv (csv): 2 points, 0 events, 3 rows dropped (3 no loss)'
    """
    events = len(report.events)
    text = f"{curve.path} ({curve.format}): {report.points} points, {events} event"
    text += "" if events == 1 else "s"
    counts = Counter(e.action for e in report.events)
    if counts:
        text += " (" + ", ".join(f"{n} {a}" for a, n in sorted(counts.items())) + ")"
    return text + _dropped_text(curve)


def _dropped_text(curve: Curve) -> str:
    """``", 12 rows dropped (12 no loss)"``, or nothing when every row became a point."""
    total = sum(curve.dropped.values())
    if not total:
        return ""
    reasons = ", ".join(f"{n} {why}" for why, n in sorted(curve.dropped.items()))
    return f", {total} row{'' if total == 1 else 's'} dropped ({reasons})"


def _check_plot_path(plot: str | None) -> None:
    """Fail before a long replay, not after it, when the plot could never be written."""
    if plot is None:
        return
    target = Path(plot)
    if target.suffix.lower() not in PLOT_SUFFIXES:
        raise bad_value("--plot", plot, "name a .png, .svg or .pdf file")
    if not target.parent.is_dir():
        raise bad_value("--plot", plot, f"create the folder {str(target.parent)!r} first")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``replay`` to the ``spikewatch`` command line."""
    parser = subparsers.add_parser(
        "replay",
        help="find loss spikes in a logged training curve",
        description="Replay a logged curve through the monitor and list what it would flag.",
    )
    parser.add_argument(
        "path",
        help="CSV/W&B export, JSONL, trainer_state.json or HF output folder, TensorBoard "
        "file/folder, or a nanoGPT/llm.c/modded-nanogpt/Megatron text log",
    )
    parser.add_argument("--format", choices=FORMATS, help="file format (default: detect)")
    parser.add_argument(
        "--pattern",
        metavar="REGEX",
        help="read a plain-text log: a regex searched in each line, with named groups "
        "step and loss (optional: grad_norm, lr), e.g. 'step (?P<step>\\d+) loss (?P<loss>\\S+)'",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--plot", metavar="FILE.png", help="also save a plot of curve and events")
    parser.add_argument("--no-progress", action="store_true", help="never show a progress bar")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Run ``spikewatch replay``; errors propagate as `SpikewatchError` to the CLI."""
    # Lazy: the monitor stack (ruptures, scipy) takes ~1 s to import; --help should not wait.
    from spikewatch.replay.analyze import analyze  # noqa: PLC0415

    _check_plot_path(args.plot)
    curve = read_curve(args.path, format=args.format, pattern=args.pattern)
    show = not args.no_progress and sys.stderr.isatty() and len(curve) > PROGRESS_MIN_POINTS
    bar = ProgressBar(sys.stderr) if show else None
    try:
        report = analyze(curve, progress=bar)
    finally:
        if bar is not None:
            bar.close()
    if args.plot is not None:
        _save_plot(curve, report, args.plot)
    if args.json:
        output = {**report.to_json(), "dropped": curve.dropped}  # rows not read, by reason
        sys.stdout.write(json.dumps(output, allow_nan=False, indent=2) + "\n")
    else:
        table = format_table(report) + "\n" if report.events else ""
        if report.decisions:  # every decision in order: an incident shows only its worst
            table += "\ndecisions\n" + format_decisions(report) + "\n\n"
        sys.stdout.write(table + format_summary(curve, report) + "\n")
    return 0


def _save_plot(curve: Curve, report: ReplayReport, path: str) -> None:
    from spikewatch.replay.plot import plot_report  # noqa: PLC0415  (matplotlib: only if asked)

    try:
        plot_report(curve, report, path)
    except OSError as exc:
        raise bad_value(
            "--plot", path, f"cannot write it ({exc.strerror}); pick another path"
        ) from None
