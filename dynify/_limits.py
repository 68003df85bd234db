"""The values a numeric setting accepts: one definition for the command line's flags and the
library's settings (the search's ``trials``, ``seed``, ...).

A :class:`Limit` is a range (and whether it takes integers only, or ``None``); the shared
ones are named by what the number is (:data:`COUNT`, :data:`SEED`, ...). ``Limit.check``
refuses one value, :func:`check_limits` every attribute of an object (an argparse
namespace) that a table names; ``FinetuneSettings`` and ``SearchSettings`` keep a Limit per
numeric field. The
messages name the Python argument and list it in ``DynifyError.arguments``, so the command
line shows its flag instead.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from dynify.errors import DynifyError, quoted

__all__ = [
    "COUNT",
    "FRACTION",
    "NON_NEGATIVE",
    "NON_NEGATIVE_COUNT",
    "POSITIVE",
    "SEED",
    "SHARE",
    "Limit",
    "check_limits",
]


@dataclass(frozen=True)
class Limit:
    """The values a number accepts: an ``int`` (``integer``; a bool never counts) or any
    finite number, within ``low`` / ``high`` (inclusive unless ``low_open`` / ``high_open``);
    ``None`` too when ``optional`` (a setting's default, which messages leave unsaid).
    ``note`` says what the number means, in messages (``epochs per trial``)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    optional: bool = False
    note: str = ""

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.optional
        if isinstance(value, bool) or not isinstance(value, int if self.integer else int | float):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def check(self, name: str, value: Any) -> None:
        """Refuse ``value`` of the argument ``name`` unless accepted: one line naming it, the
        value and what is accepted (``epochs must be a positive integer, got 0``)."""
        if not self.accepts(value):
            raise DynifyError(f"{name} must be {self}, got {quoted(value)}", arguments=(name,))

    def but(self, **changes: Any) -> Limit:
        """This limit with some fields changed (``COUNT.but(optional=True)``)."""
        return replace(self, **changes)

    def __str__(self) -> str:
        if self.integer and self.low == 1 and not self.low_open and self.high is None:
            text = "a positive integer"
        else:
            text = "an integer" if self.integer else "a finite number"
            low, high = _number(self.low), _number(self.high)
            if self.low is not None and self.high is not None:
                left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
                text += f" in {left}{low}, {high}{right}"
            elif self.low is not None:
                text += f" {'>' if self.low_open else '>='} {low}"
            elif self.high is not None:
                text += f" {'<' if self.high_open else '<='} {high}"
        return f"{text} ({self.note})" if self.note else text


def _number(value: float | None) -> str:
    """A bound as a reader writes it: ``4294967295`` rather than ``4.29497e+09``."""
    if value is None:
        return ""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


# Shared limits, by what the number is.
COUNT = Limit(low=1, integer=True)  # images, epochs, classes, batch sizes, pixels, trials
NON_NEGATIVE = Limit(low=0)  # weight decay, a minimum learning rate
NON_NEGATIVE_COUNT = Limit(low=0, integer=True)  # worker processes, warm-up epochs
SEED = Limit(low=0, high=2**32 - 1, integer=True)  # what numpy's and torch's generators take
POSITIVE = Limit(low=0, low_open=True)  # learning rates, temperatures, norms, seconds
FRACTION = Limit(low=0, high=1, low_open=True)  # (0, 1]
SHARE = Limit(low=0, high=1)  # [0, 1]


def check_limits(values: object, limits: Mapping[str, Limit]) -> None:
    """Refuse, before any work, an attribute of ``values`` (an argparse namespace: ``limits``
    maps its destinations to their limits) outside its limit; ``None`` passes, and each item
    of a list or tuple is checked. One line naming the argument, the value and the accepted
    range (``num_classes must be a positive integer, got 0``; the command line writes
    ``--num-classes``)."""
    for name, limit in limits.items():
        value = getattr(values, name)
        if value is None:
            continue
        for item in value if isinstance(value, (list, tuple)) else (value,):
            limit.check(name, item)
