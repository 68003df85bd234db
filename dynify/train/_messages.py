"""Which Python argument names a message may list in ``DynifyError.arguments``.

The command line rewrites a listed name where it stands as a word outside quotes; a value a
message shows unquoted (a data source such as ``/data/output/cifar``) could contain one and
become ``/data/--output/cifar``. So a name is listed only when none of those values
contains it (the message then shows that name as it is)."""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["listable"]


def listable(names: Iterable[str], *quoted: object) -> tuple[str, ...]:
    """The ``names`` that occur as a word in none of the ``quoted`` values' texts."""
    texts = [str(value) for value in quoted]
    return tuple(
        name
        for name in names
        if not any(re.search(rf"(?<![\w-]){re.escape(name)}(?!\w)", text) for text in texts)
    )
