"""User-facing errors.

Everything a user can get wrong (a model name, a recipe key, a budget string, a data path)
raises :class:`DynifyError` with one line that names the file, key or value at fault and
what would be accepted. The command line prints that line and exits with status 2; Python
callers catch it like any other exception (it is also a ``ValueError``).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["DynifyError", "did_you_mean"]


class DynifyError(ValueError):
    """Bad input: the message is one line meant for the user, with no traceback."""


def did_you_mean(value: str, choices: Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
