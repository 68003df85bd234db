"""User-facing errors.

Everything a user can get wrong (a model name, a recipe key, a budget string, a data path)
raises :class:`DynifyError` with one line that names the file, key or value at fault and
what would be accepted. The command line prints that line and exits with status 2; Python
callers catch it like any other exception (it is also a ``ValueError``).

A message names what a Python caller passed (``batch_size``); ``arguments`` lists those
names, and the command line shows each as its flag (``--batch-size``). The exception's
``__cause__`` keeps the error underneath (a model's own bug, a driver's message): the
command line prints it with ``--debug``.

:class:`TrainingDiverged` is not bad input: training ran and its loss stopped being finite.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

__all__ = [
    "QUOTE_LIMIT",
    "DynifyError",
    "DynifyTypeError",
    "TrainingDiverged",
    "did_you_mean",
    "quoted",
    "shorten",
]


# How much of an untrusted value a message quotes.
QUOTE_LIMIT = 80


class DynifyError(ValueError):
    """Bad input: the message is one line meant for the user, with no traceback.

    ``arguments``: the Python argument names the message mentions (``"batch_size"``), which
    the command line rewrites as its flags (``--batch-size``).
    """

    def __init__(self, message: str, *, arguments: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.arguments: tuple[str, ...] = tuple(arguments)


class DynifyTypeError(DynifyError, TypeError):
    """Bad input of the wrong type (``from_conv`` given a module that is not a conv)."""


class TrainingDiverged(RuntimeError):
    """Training ran and its loss became NaN or infinite: not a bad input but a failed run
    (the command line exits 1 with one line; ``--debug`` shows where). ``arguments``: the
    settings its hint names (``lr``), as for :class:`DynifyError`."""

    def __init__(self, message: str, *, arguments: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.arguments: tuple[str, ...] = tuple(arguments)


def did_you_mean(value: str, choices: Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest choice, or an empty string (always
    for a value longer than :data:`QUOTE_LIMIT`: a hostile key can be megabytes, and the
    fuzzy match costs its length times every choice's)."""
    if len(str(value)) > QUOTE_LIMIT:
        return ""
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def shorten(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters at a word boundary, with an ellipsis.

    For error messages that quote another library's (possibly long) message: a cut never
    falls mid-word, so what is left reads as words.
    """
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    room = max(limit - 1, 1)  # one character for the ellipsis
    if text[room] == " ":  # the cut falls between two words
        head = text[:room]
    elif " " in text[:room]:
        head = text[:room].rsplit(" ", 1)[0]
    else:  # one word longer than the limit: nothing better than cutting it
        head = text[:room]
    return head.rstrip(" ,;:(") + "…"


def quoted(value: Any, *, limit: int = QUOTE_LIMIT) -> str:
    """``repr(value)`` for a message, cut to about ``limit`` characters (untrusted values)."""
    if isinstance(value, str | bytes) and len(value) > 4 * limit:
        value = value[: 4 * limit]  # repr of a megabyte string costs a megabyte
    elif isinstance(value, list | tuple) and len(value) > limit:
        value = [*value[:limit], ...]
    return shorten(repr(value), limit)
