"""The ``spikewatch`` command line.

Each subcommand lives in its own module with a ``register(subparsers)`` function that
adds its parser and sets ``handler=run``, where ``run(args) -> int`` returns the exit
code. To add one, write that module and list its ``register`` in `SUBCOMMANDS`.
Errors spikewatch raises on purpose (`SpikewatchError`) become one line on stderr and
exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from spikewatch import __version__, demo_command
from spikewatch.errors import SpikewatchError
from spikewatch.forensics import quarantine_command
from spikewatch.replay import command as replay_command
from spikewatch.service import command as serve_command
from spikewatch.service import incidents_command

Register = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]

#: Every subcommand's ``register`` function, in the order ``--help`` lists them.
SUBCOMMANDS: tuple[Register, ...] = (
    demo_command.register,
    replay_command.register,
    serve_command.register,
    incidents_command.register,
    quarantine_command.register,
)


def build_parser() -> argparse.ArgumentParser:
    """The ``spikewatch`` argument parser with every subcommand of `SUBCOMMANDS`.

    Example:
        >>> args = build_parser().parse_args(["replay", "run.csv", "--json"])
        >>> args.command, args.path, args.json
        ('replay', 'run.csv', True)
    """
    parser = argparse.ArgumentParser(
        prog="spikewatch", description="Loss-spike watchdog for neural-network training."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in SUBCOMMANDS:
        register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line and return its exit code (2 for usage and input errors).

    Example:
        >>> main(["replay", "no-such-file.csv"])
        2
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error argparse printed
        return exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    try:
        code: int = args.handler(args)
    except SpikewatchError as exc:
        print(f"spikewatch {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"spikewatch {args.command}: interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":  # python -m spikewatch.cli
    sys.exit(main())
