"""The ``spikewatch demo`` subcommand (the trainer side is imported only when it runs)."""

from __future__ import annotations

import argparse
import json
import sys

from spikewatch.errors import SpikewatchError
from spikewatch.validation import check_int


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``demo`` to the command line."""
    p = subparsers.add_parser(
        "demo",
        help="train a tiny model with bad batches: spike -> rollback -> recovery",
        description="Train a tiny language model on CPU three times (clean; bad batches "
        "without the guard; bad batches with it) and compare the held-out losses.",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument(
        "--plot",
        default="spikewatch-demo.png",
        metavar="FILE.png",
        help="chart of the three runs (default: %(default)s; '' for none)",
    )
    p.add_argument("--steps", type=int, default=600, help="optimizer steps per run")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (default 0: 1 on up to 2 cores, else half the cores, at most 4)",
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress on stderr (a bar on a terminal, a line every 10 s otherwise)",
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo; print a summary (or JSON)."""
    steps = check_int("--steps", args.steps, minimum=100)
    threads = check_int("--threads", args.threads, minimum=0)
    try:
        from spikewatch_hooks.demo.run import format_summary, run_demo  # noqa: PLC0415
        from spikewatch_hooks.demo.scenario import DemoSettings  # noqa: PLC0415
    except ImportError as exc:
        raise SpikewatchError(
            f"the demo trains a model and needs torch ({exc}); "
            "install it with pip install 'spikewatch[torch]'"
        ) from exc
    settings = DemoSettings.for_steps(steps)
    progress = None if args.no_progress else sys.stderr
    summary = run_demo(settings, plot=args.plot or None, progress=progress, threads=threads)
    sys.stdout.write(
        (json.dumps(summary, indent=2) if args.json else format_summary(summary)) + "\n"
    )
    return 0
