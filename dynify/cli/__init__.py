"""The ``dynify`` command line: a thin layer over the Python API.

Each command lives in its own module in this package and exposes ``add_parser(subparsers)``
and ``run(args) -> int``. Parsers are built without importing torch so that ``--help`` is
quick; the work (and the heavy imports) happens in ``run``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import re
import signal
import sys
import threading
import traceback
from collections.abc import Iterator, Sequence
from typing import NoReturn

from dynify._limits import (  # noqa: F401 (re-exported: the commands import them from here)
    COUNT,
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    SEED,
    SHARE,
    Limit,
    check_limits,
)
from dynify._version import __version__
from dynify.errors import DynifyError, TrainingDiverged, shorten
from dynify.logging import get_logger

__all__ = ["Limit", "check_limits", "interrupted", "main"]

# Command modules, in the order ``--help`` lists them. Later issues append here.
COMMANDS: tuple[str, ...] = ("convert", "inspect", "finetune", "search", "fold", "export")


class _Parser(argparse.ArgumentParser):
    """argparse with its errors in one line (no usage block), like every other bad input;
    subcommand parsers are of the same class."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.split(" ", 1)[1] if " " in self.prog else None
        help_hint = f"dynify {command} --help" if command else "dynify --help"
        self.exit(2, f"{self.prog}: error: {message} (see '{help_hint}')\n")


def _out_of_memory(err: BaseException) -> bool:
    """An allocation that failed: torch's OutOfMemoryError, the CPU allocator's RuntimeError,
    Python's MemoryError."""
    import torch

    if isinstance(err, MemoryError | torch.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and "can't allocate memory" in str(err)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dynify",
        description=(
            "Turn static CNNs (any timm model) into dynamic-convolution networks "
            "(DY-CNN, CondConv): convert, inspect costs, fine-tune, and search which "
            "layers to convert under a compute budget."
        ),
        epilog="Run 'dynify COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"dynify {__version__}")
    parser.add_argument(
        "--debug",
        action="store_true",
        default=bool(os.environ.get("DYNIFY_DEBUG")),
        help="on an error, print its whole traceback and causes before the one-line message "
        "(also DYNIFY_DEBUG=1)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"dynify.cli.{name}")
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Everything, the parser and its imports included, runs inside the handlers: a Ctrl-C or
    # a bad input at any moment is one line on stderr, never a traceback (unless --debug).
    prog = "dynify"
    args: argparse.Namespace | None = None
    flags: dict[str, str] = {}
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 0
        prog = f"dynify {args.command}"
        flags = command_flags(parser, args.command)
        if _import_libraries():
            return interrupted(prog, exiting=argv is None)
        with _flags_in_log_messages(flags):
            return int(args.run(args) or 0)
    except (DynifyError, TrainingDiverged) as err:
        _debug_traceback(args, err)
        message = with_flags(str(err), getattr(err, "arguments", ()), flags)
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2 if isinstance(err, DynifyError) else 1
    except KeyboardInterrupt as interrupt:
        return interrupted(prog, exiting=argv is None, reason=str(interrupt))
    except (MemoryError, RuntimeError) as err:
        # Sizes a user chose (a batch, an image size, a class count) that no check above
        # priced: say so in one line; any other error is a bug and keeps its traceback.
        if not _out_of_memory(err):
            raise
        _debug_traceback(args, err)
        print(
            f"{prog}: error: out of memory ({shorten(str(err).splitlines()[0], 160)}); lower "
            "the sizes asked for (--batch-size, --img-size, --input-size, --num-classes)",
            file=sys.stderr,
        )
        return 2
    except BrokenPipeError:
        # Whoever read stdout has gone (``dynify convert ... | head``): stop quietly, and
        # keep Python from failing again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _debug_traceback(args: argparse.Namespace | None, err: BaseException) -> None:
    """With ``--debug`` (or ``DYNIFY_DEBUG=1``), the whole traceback, causes included."""
    debug = getattr(args, "debug", None) if args is not None else None
    if debug if debug is not None else os.environ.get("DYNIFY_DEBUG"):
        traceback.print_exception(err, file=sys.stderr)


def command_flags(parser: argparse.ArgumentParser, command: str) -> dict[str, str]:
    """The flag of each argparse destination of ``command`` (``{"batch_size":
    "--batch-size"}``): how the command line shows the Python argument names that library
    messages use. An on/off setting whose only flag is its negation (``--no-amp`` for
    ``amp``) has none: the negation would say the opposite."""
    flags: dict[str, str] = {}
    for action in parser._actions:  # argparse keeps its subparsers there, no public accessor
        if isinstance(action, argparse._SubParsersAction):
            sub = action.choices.get(command)
            for option in sub._actions if sub is not None else ():
                positive = [o for o in option.option_strings if not o.startswith("--no-")]
                if positive:
                    flags[option.dest] = max(positive, key=len)
    return flags


# Quoted values in messages (paths, names): never rewritten.
_QUOTED = re.compile(r"""('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")""")


def with_flags(message: str, arguments: Sequence[str], flags: dict[str, str]) -> str:
    """``message`` with each Python argument name it lists (``batch_size``) written as the
    command's flag (``--batch-size``) where it stands as a word outside quotes (a quoted
    path ``'runs/output/x'`` keeps its ``output``)."""
    names = [name for name in arguments if name in flags]
    if not names:
        return message
    pattern = re.compile(rf"(?<![\w-])({'|'.join(map(re.escape, names))})(?!\w)")
    parts = _QUOTED.split(message)  # odd indices are the quoted values
    return "".join(
        part if i % 2 else pattern.sub(lambda m: flags[m.group(1)], part)
        for i, part in enumerate(parts)
    )


class _FlagFilter(logging.Filter):
    """Shows, in a log record that lists the Python arguments it names (``extra=
    {"arguments": (...)}``), those names as the command's flags, as errors are shown."""

    def __init__(self, flags: dict[str, str]) -> None:
        super().__init__()
        self.flags = flags

    def filter(self, record: logging.LogRecord) -> bool:
        arguments = getattr(record, "arguments", ())
        if arguments:
            record.msg, record.args = with_flags(record.getMessage(), arguments, self.flags), ()
        return True


@contextlib.contextmanager
def _flags_in_log_messages(flags: dict[str, str]) -> Iterator[None]:
    """While a command runs, the ``dynify`` logger's handlers show argument names as flags
    (a handler's filter sees the records of every ``dynify.*`` logger)."""
    handlers = list(get_logger("dynify").handlers)  # the default handler exists from here
    flag_filter = _FlagFilter(flags)
    for handler in handlers:
        handler.addFilter(flag_filter)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(flag_filter)


def _import_libraries() -> bool:
    """Import torch and timm, which every command needs, with Ctrl-C held back until the
    imports are done; True when one came meanwhile.

    An interrupt inside a C extension's import (numpy's, under torch's) leaves the extension
    half-loaded, and the next import of it fails with an ImportError traceback instead of
    the KeyboardInterrupt: so the interrupt is taken only once the libraries are whole.
    """
    if threading.current_thread() is not threading.main_thread():
        import timm
        import torch

        return False
    pending: list[int] = []
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.default_int_handler:
        signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        import timm  # noqa: F401
        import torch  # noqa: F401
    finally:
        if previous is signal.default_int_handler:
            signal.signal(signal.SIGINT, previous)
    return bool(pending)


def interrupted(prog: str = "dynify", *, exiting: bool = True, reason: str = "") -> int:
    """Say that the command was interrupted, in one line (with ``reason``, what the command
    said of it, e.g. the search's "trial 3 will be run again on resume"); the exit status for
    it (130, as a shell reports a process ended by SIGINT).

    ``exiting``: the process ends next (``main()`` run as the program, reading
    ``sys.argv``), so a second Ctrl-C during Python's shutdown, which would print a
    traceback of its own, is ignored; a caller that passed ``argv`` keeps its Ctrl-C.
    """
    if exiting and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    print(f"{prog}: interrupted{f': {reason}' if reason else ''}", file=sys.stderr, flush=True)
    return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
