"""The ``dynify`` command line: a thin layer over the Python API.

Each command lives in its own module in this package and exposes ``add_parser(subparsers)``
and ``run(args) -> int``. Parsers are built without importing torch so that ``--help`` is
quick; the work (and the heavy imports) happens in ``run``.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
from collections.abc import Sequence

from dynify._version import __version__
from dynify.errors import DynifyError

__all__ = ["interrupted", "main"]

# Command modules, in the order ``--help`` lists them. Later issues append here.
COMMANDS: tuple[str, ...] = ("convert", "inspect", "finetune", "search")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dynify",
        description=(
            "Turn static CNNs (any timm model) into dynamic-convolution networks "
            "(DY-CNN, CondConv): convert, inspect costs, fine-tune, and search which "
            "layers to convert under a compute budget."
        ),
        epilog="Run 'dynify COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"dynify {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"dynify.cli.{name}")
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Everything, the parser and its imports included, runs inside the handlers: a Ctrl-C or
    # a bad input at any moment is one line on stderr, never a traceback.
    prog = "dynify"
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 0
        prog = f"dynify {args.command}"
        return int(args.run(args) or 0)
    except DynifyError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return interrupted(prog)


def interrupted(prog: str = "dynify") -> int:
    """Say that the command was interrupted, in one line; the exit status for it (130, as a
    shell reports a process ended by SIGINT)."""
    # A second Ctrl-C while Python shuts down would print a traceback of its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    print(f"{prog}: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
